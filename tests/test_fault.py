"""The demo survives faults, for real on CPU: stopped and resumed, a truncated checkpoint, a worker killed
under torchrun with --max-restarts, a rank stopped with SIGSTOP. Each child has a hard time limit and only
what a test started is killed (by PID). Resumed runs must end with the uninterrupted run's parameters, bit
for bit (report.json's params_sha256)."""
from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import procs
import pytest

from accel.demo import EXIT_STALLED, EXIT_STOPPED, FAULT_VARIABLE, SLOW_VARIABLE
from accel.distributed import checkpoint

pytestmark = pytest.mark.slow
DEMO = [sys.executable, "-m", "accel", "demo", "--quick", "--epochs", "1", "--checkpoint-every", "5"]
NPROC = ["--nproc", "2", "--device", "cpu"]  # gloo on the CPU even on a one-GPU machine


def _report(out: Path) -> dict:
    return json.loads((out / "report.json").read_text())


def _same_run(report: dict, reference: dict) -> None:
    assert report["params_sha256"] == reference["params_sha256"]
    assert [(e["train_loss"], e["test_accuracy"]) for e in report["history"]] == \
        [(e["train_loss"], e["test_accuracy"]) for e in reference["history"]]
    assert report["isgd"]["batches"] == reference["isgd"]["batches"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    """An uninterrupted single-process run."""
    out = tmp_path_factory.mktemp("reference")
    procs.check(procs.run(DEMO + ["--out", str(out)], timeout=180))
    report = _report(out)
    assert report["resumes"] == 0 and report["launcher_restarts"] == 0
    return report


def _stop_at_step(out: Path, step: int) -> str:
    """A run stopped by SIGUSR1 after ``step`` (the test hook sends it): checkpoint, exit status 75."""
    stopped = procs.run(DEMO + ["--out", str(out)], timeout=180, env=procs.child_env(**{FAULT_VARIABLE: f"USR1@{step}"}))
    assert stopped.returncode == EXIT_STOPPED, stopped.stdout
    assert f"stopped on SIGUSR1 after step {step}; checkpoint saved" in stopped.stdout
    assert not (out / "report.json").exists()
    return stopped.stdout


def test_resume_after_a_clean_stop_is_bit_identical(reference, tmp_path):
    out = tmp_path / "run"
    _stop_at_step(out, 12)
    names = [path.name for path in checkpoint.list_checkpoints(out / "checkpoints")]
    assert names == [f"checkpoint-e00001-s0000000{step:02d}.pt" for step in (5, 10, 12)]
    resumed = procs.check(procs.run(DEMO + ["--out", str(out)], timeout=180))
    assert "resumed from" in resumed and "s000000012.pt (epoch 1, step 12)" in resumed
    report = _report(out)
    _same_run(report, reference)
    assert report["resumes"] == 1 and report["resumed_from"] == [names[-1]] and report["launcher_restarts"] == 0

    # --no-resume starts over: the old checkpoints go, and the run is the same run again
    again = procs.check(procs.run(DEMO + ["--out", str(out), "--no-resume"], timeout=180))
    assert "--no-resume: removed" in again and "resumed from" not in again
    assert _report(out)["resumes"] == 0
    _same_run(_report(out), reference)


def test_a_truncated_latest_checkpoint_is_skipped_for_the_one_before(reference, tmp_path):
    out = tmp_path / "run"
    _stop_at_step(out, 12)
    latest = checkpoint.list_checkpoints(out / "checkpoints")[-1]
    latest.write_bytes(latest.read_bytes()[:latest.stat().st_size // 3])  # as a crash of the disk would
    resumed = procs.check(procs.run(DEMO + ["--out", str(out)], timeout=180))
    assert f"checkpoint {latest.name} does not verify" in resumed and "truncated or corrupt" in resumed
    assert f"moved aside to {latest.name}.corrupt" in resumed
    assert "s000000010.pt (epoch 1, step 10)" in resumed
    report = _report(out)
    _same_run(report, reference)
    assert report["resumed_from"] == ["checkpoint-e00001-s000000010.pt"]

    # a checkpoint of another run (here: another number of epochs) is refused, naming the option
    other = [*DEMO[:DEMO.index("--epochs")], "--epochs", "2", *DEMO[DEMO.index("--epochs") + 2:]]
    refused = procs.run(other + ["--out", str(out)], timeout=180)
    assert refused.returncode != 0 and "belongs to a different run: --epochs 1 (this run: 2)" in refused.stdout
    assert "--no-resume to start over" in refused.stdout and "Traceback" not in refused.stdout


@pytest.mark.multiprocess
def test_torchrun_restarts_a_killed_worker_and_ends_with_the_same_parameters(tmp_path):
    uninterrupted, restarted = tmp_path / "uninterrupted", tmp_path / "restarted"
    procs.check(procs.run(DEMO + NPROC + ["--out", str(uninterrupted)], timeout=240))
    # rank 1 SIGKILLs itself after step 8 (mid-epoch; the last checkpoint is step 5)
    output = procs.check(procs.run(DEMO + NPROC + ["--max-restarts", "1", "--out", str(restarted)], timeout=240,
                                   env=procs.child_env(**{FAULT_VARIABLE: "KILL@8:1"})))
    assert "--max-restarts=1" in output and "exitcode: -9" in output, output
    assert "s000000005.pt (epoch 1, step 5)" in output
    report = _report(restarted)
    assert (report["launcher"], report["world_size"], report["backend"]) == ("torchrun", 2, "gloo")
    assert report["resumes"] == 1 and report["launcher_restarts"] == 1
    _same_run(report, _report(uninterrupted))


def test_a_run_over_checkpoints_that_are_all_corrupt_keeps_its_own(reference, tmp_path):
    """Issue 22.6: with every checkpoint corrupt, a fresh run's valid checkpoints were deleted as soon as written."""
    out = tmp_path / "run"
    _stop_at_step(out, 12)
    directory = out / "checkpoints"
    damaged = checkpoint.list_checkpoints(directory)
    for step in (30, 40, 45):  # corrupt files with later names than the fresh run will write
        (directory / f"checkpoint-e00002-s0000000{step}.pt").write_bytes(b"garbage")
    for path in damaged:
        path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])
    (directory / "checkpoint-e00001-s000000013.pt.x1y2.tmp").write_bytes(b"partial")  # a write that was killed
    output = procs.check(procs.run(DEMO + ["--out", str(out)], timeout=180))
    assert output.count("moved aside to") == 6 and "left by a write that did not finish" in output
    assert "resumed from" not in output
    report = _report(out)
    assert report["resumes"] == 0
    _same_run(report, reference)
    kept = checkpoint.list_checkpoints(directory)
    assert [path.name for path in kept] == ["checkpoint-e00001-s000000015.pt", "checkpoint-e00001-s000000020.pt",
                                            "checkpoint-e00002-s000000023.pt"]
    assert all(checkpoint.load(path)["config"]["epochs"] == 1 for path in kept)
    assert len(list(directory.glob("*.corrupt"))) == 6 and not list(directory.glob("*.tmp"))


@pytest.mark.multiprocess
def test_a_stopped_rank_makes_the_other_exit_within_the_timeout(tmp_path):
    """Rank 1 stops itself (SIGSTOP) after step 3; rank 0 must say so and exit, not wait silently."""
    timeout = 8
    port = str(procs.free_port())
    ranks, logs = [], []
    try:
        for rank in (0, 1):
            env = procs.child_env(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2",
                                  MASTER_ADDR="127.0.0.1", MASTER_PORT=port, **{FAULT_VARIABLE: "STOP@3:1"})
            logs.append(tmp_path / f"rank{rank}.log")
            ranks.append(procs.spawn(DEMO + ["--device", "cpu", "--timeout", str(timeout), "--out",
                                             str(tmp_path / "run")], env=env, output=logs[-1]))
        _wait_until_stopped(ranks[1].pid, limit=180, log=logs[1])
        # the promise: reported within --timeout plus a few seconds of the stop (the process
        # group's own timeout, the backstop, is minutes)
        status = ranks[0].wait(timeout=timeout + 15)
        message = logs[0].read_text()
        assert status == EXIT_STALLED, message
        assert "rank 0 of 2: a peer stopped responding: rank 1 sent no heartbeat" in message
        assert "while waiting in step 3: the stop-request all-reduce" in message
        assert "Traceback" not in message
    finally:
        for proc in ranks:
            procs.kill_tree(proc.pid)
            proc.wait(timeout=30)


@pytest.mark.multiprocess
def test_a_healthy_run_whose_steps_compute_longer_than_the_timeout_completes(tmp_path):
    """Issue 22.7: the watchdog timed each rank's own computing and ended healthy slow runs."""
    out = tmp_path / "run"
    # steps 2 and 3 compute 3 s longer on both ranks, step 5 4 s longer on rank 1 only (rank 0 waits in the
    # all-reduce meanwhile); the evaluation and checkpoints as usual; --timeout 2
    env = procs.child_env(**{SLOW_VARIABLE: "3@2-3,4@5:1"})
    output = procs.check(procs.run(DEMO + NPROC + ["--timeout", "2", "--out", str(out)], timeout=300, env=env))
    assert "stopped responding" not in output
    report = _report(out)
    assert (report["launcher"], report["world_size"]) == ("torchrun", 2) and report["isgd"]["batches"] > 5


@pytest.mark.multiprocess
@pytest.mark.parametrize("target", ["launcher", "process group"])
@pytest.mark.parametrize("signal_name", ["SIGTERM", "SIGKILL"])
def test_killing_the_nproc_launcher_leaves_no_process_of_the_run(tmp_path, target, signal_name):
    """Issue 22.5: torchrun and its workers (in sessions of their own) outlived a killed launcher."""
    log = tmp_path / "launcher.log"
    env = procs.child_env(**{SLOW_VARIABLE: "120@1"})  # the run is still in its first step when signalled
    launcher = procs.spawn(DEMO + NPROC + ["--out", str(tmp_path / "run")], env=env, output=log)
    processes: dict[int, int] = {}
    try:
        deadline = time.monotonic() + 180
        while "accel demo: rank 0 of 2" not in log.read_text():  # torchrun and both workers are up
            assert launcher.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        processes = procs.snapshot(launcher.pid)
        assert len(processes) >= 4, processes  # the launcher, torchrun, two workers
        number = getattr(signal, signal_name)
        if target == "launcher":
            os.kill(launcher.pid, number)
        else:
            os.killpg(launcher.pid, number)  # spawn() made the launcher a process group leader
        deadline = time.monotonic() + 10  # the promise: nothing of the run alive 10 s later
        while procs.survivors(processes) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert procs.survivors(processes) == [], log.read_text()
        assert launcher.wait(timeout=30) == (128 + number if number == signal.SIGTERM else -number)
        assert not (tmp_path / "run" / "report.json").exists()
    finally:
        procs.kill_processes(processes)
        procs.kill_tree(launcher.pid)
        launcher.wait(timeout=30)


def _wait_until_stopped(pid: int, *, limit: float, log: Path) -> float:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        if state == "T":
            return time.monotonic()
        if state == "Z":
            pytest.fail(f"rank 1 ended instead of stopping:\n{log.read_text()}")
        time.sleep(0.05)
    pytest.fail(f"rank 1 did not stop in {limit} s:\n{log.read_text()}")
