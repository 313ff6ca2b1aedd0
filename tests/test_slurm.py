"""SLURM, for real: a local cluster (tests/slurm_cluster.py) runs srun and sbatch jobs that call init().

The cluster has this host (partition `local`) and two emulated nodes n1, n2 (partition `emulated`).
"""
from __future__ import annotations

import json
import re
import socket
import sys
import time

import procs
import pytest
from scripts.dist_report import read_reports

from accel.distributed import slurm_port

pytestmark = [pytest.mark.slurm, pytest.mark.multiprocess]
REPORT = "tests/scripts/dist_report.py"
GLOO_ON_CPU = ["--backend", "gloo", "--device", "cpu"]  # explicit: the same test on a one-GPU machine
PROGRAM = " ".join([REPORT, *GLOO_ON_CPU])


def test_srun_two_tasks_run_the_check(cluster):
    output = procs.check(cluster.run(["srun", "--ntasks=2", "--overcommit", "--time=2",
                                      sys.executable, "-m", "accel", "check", "--backend", "gloo"],
                                     ACCEL_DEVICE="cpu"))
    for rank in (0, 1):
        assert re.search(rf"rank {rank}/2 local {rank}/2 .*launcher slurm, backend gloo.*all_reduce 3 "
                         r"\(expected 3\).*replicas identical: yes; ok", output), output
    assert "check passed on 2 process(es)" in output


def test_sbatch_single_node_template_completes(cluster, tmp_path):
    output = tmp_path / "job.out"
    job_id = cluster.sbatch(["--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1", "--overcommit",
                             "--time=3", str(procs.REPO_ROOT / "slurm" / "single_node.sbatch")], output,
                            PYTHON=sys.executable, PROGRAM=PROGRAM)
    state = cluster.wait(job_id, output)
    log = output.read_text()
    assert state == "COMPLETED", log
    reports = read_reports(log)
    assert sorted(reports) == [0, 1], log
    for rank, report in reports.items():
        assert (report["launcher"], report["world_size"], report["all_reduce"]) == ("slurm", 2, 3.0)
        assert int(report["SLURM_PROCID"]) == rank and report["local_rank"] == int(report["SLURM_LOCALID"])
        # the rendezvous came from the nodelist and the job id, with no MASTER_* given
        assert report["master_addr"] == report["nodelist_first"] == socket.gethostname().split(".")[0]
        assert report["master_port"] == slurm_port(int(job_id), 0)


def test_sbatch_failure_is_reported_as_failed(cluster, tmp_path):
    output = tmp_path / "job.out"
    job_id = cluster.sbatch(["--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1", "--overcommit",
                             "--time=1", str(procs.REPO_ROOT / "slurm" / "single_node.sbatch")], output,
                            PYTHON="false", PROGRAM="")
    assert cluster.wait(job_id, output, limit=60) == "FAILED"


def test_two_emulated_nodes_two_tasks_each(cluster):
    # n1 and n2 do not resolve, so the rendezvous address is given; everything else is SLURM's.
    output = procs.check(cluster.run(
        ["srun", "--partition=emulated", "--nodes=2", "--ntasks-per-node=2", "--overcommit", "--time=2",
         sys.executable, REPORT, *GLOO_ON_CPU], MASTER_ADDR="127.0.0.1"))
    reports = read_reports(output)
    assert sorted(reports) == [0, 1, 2, 3], output
    for rank, report in reports.items():
        node = rank // 2  # srun's default block distribution
        assert (report["launcher"], report["world_size"], report["all_reduce"]) == ("slurm", 4, 10.0)
        assert report["SLURMD_NODENAME"] == f"n{node + 1}" and int(report["SLURM_NODEID"]) == node
        assert report["local_rank"] == int(report["SLURM_LOCALID"]) == rank % 2
        assert report["local_world_size"] == 2 and report["nodelist_first"] == "n1"


def test_sbatch_multi_node_template_torchrun_per_node(cluster, tmp_path):
    output = tmp_path / "job.out"
    job_id = cluster.sbatch(["--partition=emulated", "--nodes=2", "--gpus-per-node=0", "--cpus-per-task=1",
                             "--time=3", str(procs.REPO_ROOT / "slurm" / "multi_node.sbatch")], output,
                            PYTHON=sys.executable, PROGRAM=PROGRAM, GPUS_PER_NODE="1",
                            RDZV_HOST="127.0.0.1", RDZV_PORT=str(procs.free_port()))
    state = cluster.wait(job_id, output)
    log = output.read_text()
    assert state == "COMPLETED", log
    reports = read_reports(log)
    assert sorted(reports) == [0, 1], log
    for report in reports.values():
        assert (report["launcher"], report["world_size"], report["all_reduce"]) == ("torchrun", 2, 3.0)
        assert (report["local_rank"], report["local_world_size"]) == (0, 1)  # one worker per node
    assert {report["SLURMD_NODENAME"] for report in reports.values()} == {"n1", "n2"}


# ------------------------------------------------------------------------- the demo survives requeues

def _demo_job(cluster, tmp_path):
    """Submit slurm/demo.sbatch (2 tasks, a quick epoch) and wait until it has written a checkpoint."""
    out, log = tmp_path / "demo", tmp_path / "demo.log"
    job = cluster.sbatch(["--ntasks=2", "--overcommit", "--time=5", str(procs.REPO_ROOT / "slurm" / "demo.sbatch")],
                         log, PYTHON=sys.executable, OUT=str(out),
                         DEMO_ARGS="--quick --epochs 1 --checkpoint-every 3 --device cpu")
    deadline = time.monotonic() + 180
    while not list((out / "checkpoints").glob("checkpoint-*.pt")):
        if time.monotonic() > deadline:
            cluster.run(["scancel", job], 30)
            pytest.fail(f"job {job} wrote no checkpoint in 180 s:\n{log.read_text() if log.exists() else ''}")
        time.sleep(0.2)
    return job, out, log


def _release_requeued(cluster, job, limit=120):
    """A requeued job waits out a begin-time delay (about 2 minutes); start it now instead.

    Not in the same second as the requeue: slurmd revoked the job's credential when it killed the
    first run, at one-second resolution, and refuses a credential issued within that second
    ("Job credential revoked": the job ends FAILED without its script starting again). SLURM's own
    begin-time delay exists for that; 2 s is enough of it.
    """
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        shown = procs.check(cluster.run(["scontrol", "show", "job", "--oneliner", job], 30))
        if re.search(r"Restarts=[1-9]", shown) and "JobState=PENDING" in shown:
            time.sleep(2)
            procs.check(cluster.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], 30))
            return
        if re.search(r"JobState=(COMPLETED|FAILED|CANCELLED)", shown):
            return
        time.sleep(0.2)


def _check_resumed(cluster, job, out, log):
    _release_requeued(cluster, job)
    state = cluster.wait(job, log, limit=240)
    text = log.read_text()
    assert state == "COMPLETED", text
    report = json.loads((out / "report.json").read_text())
    assert report["launcher"] == "slurm" and report["world_size"] == 2
    assert report["resumes"] >= 1 and report["launcher_restarts"] >= 1, text
    assert len(report["history"]) == 1 and "resumed from" in text
    return text


def test_demo_sbatch_requeued_while_running_resumes_and_completes(cluster, tmp_path):
    job, out, log = _demo_job(cluster, tmp_path)
    procs.check(cluster.run(["scontrol", "requeue", job], 30))
    text = _check_resumed(cluster, job, out, log)
    assert f"job {job} (restart 1)" in text


def test_demo_sbatch_checkpoints_on_the_time_limit_signal_and_requeues_itself(cluster, tmp_path):
    # what --signal=USR1@90 does before the time limit, sent now
    job, out, log = _demo_job(cluster, tmp_path)
    procs.check(cluster.run(["scancel", "--signal=USR1", job], 30))
    text = _check_resumed(cluster, job, out, log)
    assert "stopped on SIGUSR1" in text and "checkpointed before the time limit; requeueing" in text
