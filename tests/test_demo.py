"""The main job, `python -m accel demo --quick`, run for real: in one process, under torchrun, mpiexec
and a SLURM batch job (slurm/demo.sbatch on the local test cluster). Each run must write a coherent
report and both pictures. Bad arguments and launch environments fail at once, in one line, before any work."""
from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import procs
import pytest

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def check_report(out: Path, *, world_size: int, launcher: str) -> dict:
    report = json.loads((out / "report.json").read_text())
    assert report["world_size"] == world_size and report["launcher"] == launcher
    assert 0.0 <= report["test_accuracy"] <= 1.0
    assert len(report["history"]) == report["epochs"] >= 1
    assert report["isgd"]["batches"] > 0 and report["isgd"]["extra_passes"] >= report["isgd"]["chased_batches"]
    # each forward/backward pass makes three GEMMs (output, grad input, grad weight); evaluation adds more
    assert report["out_of_core"]["calls"] >= 3 * (report["isgd"]["batches"] + report["isgd"]["extra_passes"])
    assert report["out_of_core"]["bytes_to_device"] > 0
    assert report["block_term"]["parameters"] < report["block_term"]["dense_parameters"]
    assert len(report["params_sha256"]) == 64 and report["resumes"] == 0
    assert report["checkpoints"]["saved_by_this_attempt"] >= report["epochs"]
    for picture in ("control_chart.png", "accuracy.png"):
        assert (out / picture).read_bytes()[:8] == PNG_SIGNATURE, picture
    return report


def test_demo_single_process(tmp_path):
    out = tmp_path / "demo"
    result = procs.check(procs.run([sys.executable, "-m", "accel", "demo", "--quick", "--out", str(out)],
                                   timeout=180))
    assert "test accuracy" in result and "ISGD" in result and "out-of-core head" in result
    report = check_report(out, world_size=1, launcher="single")
    assert report["test_accuracy"] > report["chance_accuracy"]  # two quick epochs already beat chance


@pytest.mark.multiprocess
def test_demo_nproc_relaunches_through_torchrun(tmp_path):
    out = tmp_path / "demo"
    procs.check(procs.run([sys.executable, "-m", "accel", "demo", "--quick", "--nproc", "2", "--epochs", "1",
                           "--device", "cpu", "--out", str(out)], timeout=180))
    check_report(out, world_size=2, launcher="torchrun")


@pytest.mark.mpi
@pytest.mark.multiprocess
def test_demo_under_mpiexec(tmp_path):
    mpiexec = shutil.which("mpiexec")
    if mpiexec is None:
        pytest.skip("mpiexec not found: pip install mpich")
    out = tmp_path / "demo"
    procs.check(procs.run([mpiexec, "-n", "2", sys.executable, "-m", "accel", "demo", "--quick", "--epochs", "1",
                           "--device", "cpu", "--out", str(out)], timeout=180))
    check_report(out, world_size=2, launcher="mpi")


@pytest.mark.slurm
@pytest.mark.multiprocess
def test_demo_sbatch(cluster, tmp_path):
    out, log = tmp_path / "demo", tmp_path / "demo.log"
    job = cluster.sbatch(["--ntasks=2", "--overcommit", str(procs.REPO_ROOT / "slurm" / "demo.sbatch")], log,
                         PYTHON=sys.executable, OUT=str(out), DEMO_ARGS="--quick --epochs 1 --device cpu")
    state = cluster.wait(job, log, limit=240)
    assert state == "COMPLETED", log.read_text() if log.exists() else state
    check_report(out, world_size=2, launcher="slurm")


# ------------------------------------------------------------------ input checked before any work

@pytest.mark.parametrize("arguments, complaint", [
    (["--epochs", "0"], "--epochs must be >= 1, got 0"),
    (["--epochs", "-1"], "--epochs must be >= 1, got -1"),
    (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    (["--nproc", "0"], "--nproc must be >= 1, got 0"),
    (["--nproc", "100000"], "--nproc 100000 is more than 8 processes per CPU core"),
    (["--checkpoint-every", "-1"], "--checkpoint-every must be >= 0"),
    (["--keep-checkpoints", "0"], "--keep-checkpoints must be >= 1, got 0"),
    (["--lr", "nan"], "--lr must be a positive number, got nan"),
    (["--lr", "0"], "--lr must be a positive number"),
    (["--sigma", "-1"], "--sigma must be a positive number"),
    (["--hidden-size", "0"], "--hidden-size must be >= 1"),
    (["--seed", "-3"], "--seed must be >= 0"),
    (["--timeout", "0"], "--timeout must be a positive number of seconds"),
    (["--max-restarts", "2"], "--max-restarts needs --nproc N > 1"),
    (["--max-restarts", "-1", "--nproc", "2"], "--max-restarts must be >= 0"),
    (["--nproc", "2", "--batch-size", "63"], "--batch-size 63 does not split evenly over 2 processes"),
])
def test_bad_arguments_fail_at_once_with_one_line(arguments, complaint, tmp_path, monkeypatch):
    from accel import cli, demo

    monkeypatch.setattr(demo, "train", _must_not_train)
    monkeypatch.setattr(demo, "_relaunch_through_torchrun", _must_not_train)
    with pytest.raises(SystemExit) as caught:
        cli.main(["demo", "--out", str(tmp_path / "out"), *arguments])
    message = str(caught.value.code)
    assert message.startswith("accel demo: error: ") and complaint in message and "\n" not in message


def test_an_output_directory_that_cannot_be_written_fails_before_training(tmp_path, monkeypatch):
    from accel import cli, demo

    monkeypatch.setattr(demo, "train", _must_not_train)
    with pytest.raises(SystemExit, match=r"--out /proc/forbidden/x: cannot write there"):
        cli.main(["demo", "--out", "/proc/forbidden/x"])
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    with pytest.raises(SystemExit, match="cannot write there"):
        cli.main(["demo", "--out", str(a_file / "out")])


def _must_not_train(*args, **kwargs):
    raise AssertionError("training started despite bad input")


@pytest.mark.parametrize("arguments, environment, complaint", [
    (["--epochs", "0"], {}, "--epochs must be >= 1, got 0"),
    (["--out", "/proc/forbidden/x"], {}, "cannot write there"),
    ([], {"RANK": "0", "WORLD_SIZE": "2"}, "WORLD_SIZE=2 but MASTER_ADDR is not set"),
    ([], {"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "no-such-host.invalid", "MASTER_PORT": "29555"},
     "'no-such-host.invalid' (MASTER_ADDR) does not resolve"),
])
def test_bad_input_from_the_command_line_is_one_line_without_traceback(arguments, environment, complaint,
                                                                      tmp_path):
    # a hang (a rendezvous waited for) would end in the subprocess timeout, failing the test
    result = procs.run([sys.executable, "-m", "accel", "demo", "--quick", "--out", str(tmp_path / "out"),
                        *arguments], timeout=120, env=procs.child_env(**environment))
    assert result.returncode != 0 and complaint in result.stdout, result.stdout
    assert "Traceback" not in result.stdout and "epoch 1/" not in result.stdout
    assert len(result.stdout.strip().splitlines()) == 1, result.stdout


@pytest.mark.parametrize("module, arguments", [("sklearn", []), ("matplotlib", []), ("sklearn", ["--nproc", "2"])])
def test_a_missing_optional_dependency_is_one_line_naming_the_extra(module, arguments, tmp_path):
    """Issue 24.3: without the [demo] extra the demo ended in a ModuleNotFoundError traceback."""
    blocked = tmp_path / "blocked"
    blocked.mkdir()
    (blocked / f"{module}.py").write_text(f"raise ImportError('not installed (test)', name={module!r})\n")
    env = procs.child_env()
    env["PYTHONPATH"] = os.pathsep.join([str(blocked), env["PYTHONPATH"]])
    result = procs.run([sys.executable, "-m", "accel", "demo", "--quick", "--out", str(tmp_path / "out"),
                        *arguments], timeout=120, env=env)
    assert result.returncode == 2, result.stdout
    assert result.stdout.strip().splitlines() == [result.stdout.strip()], result.stdout
    assert result.stdout.startswith("accel demo: ") and "pip install 'accel-train[demo]'" in result.stdout
    assert f"needs {module}, which is not installed" in result.stdout and "Traceback" not in result.stdout
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_the_training_device_is_the_one_init_bound(monkeypatch, tmp_path):
    """Issue 17.1: the demo used str methods on init()'s torch.device; every CUDA run raised AttributeError."""
    import torch

    from accel import cli, demo, distributed

    bound = distributed.DistInfo(0, 1, 0, 1, "single", None, torch.device("cuda", 1))
    calls = {}

    def fake_init(backend=None, timeout=None, device=None):
        calls["init"] = (backend, device)
        return bound

    def fake_train(args, info, device, watchdog=None):
        calls["device"] = device
        raise RuntimeError("stop here")

    monkeypatch.setattr(demo.distributed, "init", fake_init)
    monkeypatch.setattr(demo, "train", fake_train)
    with pytest.raises(RuntimeError, match="stop here"):
        cli.main(["demo", "--out", str(tmp_path)])
    assert calls == {"init": (None, None), "device": torch.device("cuda", 1)}


def test_digits_are_read_without_scikit_learn_and_equal_load_digits():
    """The demo's data must stay bit-identical while skipping the scikit-learn import at every (re)start."""
    import numpy as np
    from sklearn.datasets import load_digits

    from accel.demo.datasets import load_digit_images

    images, labels = load_digit_images()
    reference = load_digits()
    assert images.dtype == reference.images.dtype and labels.dtype == reference.target.dtype
    assert np.array_equal(images, reference.images) and np.array_equal(labels, reference.target)
    code = "import sys, accel.demo.datasets as d; d.moving_digits(sequences_per_image=1); print('sklearn' in sys.modules)"
    assert procs.check(procs.run([sys.executable, "-c", code], timeout=120)).strip() == "False"
