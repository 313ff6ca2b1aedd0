"""The main job, `python -m accel demo --quick`, run for real: in one process, under torchrun, mpiexec
and a SLURM batch job (slurm/demo.sbatch on the local test cluster). Each run must write a coherent
report and both pictures."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

import procs

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
                           "--out", str(out)], timeout=180))
    check_report(out, world_size=2, launcher="torchrun")


@pytest.mark.mpi
@pytest.mark.multiprocess
def test_demo_under_mpiexec(tmp_path):
    mpiexec = shutil.which("mpiexec")
    if mpiexec is None:
        pytest.skip("mpiexec not found: pip install mpich")
    out = tmp_path / "demo"
    procs.check(procs.run([mpiexec, "-n", "2", sys.executable, "-m", "accel", "demo", "--quick", "--epochs", "1",
                           "--out", str(out)], timeout=180))
    check_report(out, world_size=2, launcher="mpi")


@pytest.mark.slurm
@pytest.mark.multiprocess
def test_demo_sbatch(cluster, tmp_path):
    out, log = tmp_path / "demo", tmp_path / "demo.log"
    job = cluster.sbatch(["--ntasks=2", "--overcommit", str(procs.REPO_ROOT / "slurm" / "demo.sbatch")], log,
                         PYTHON=sys.executable, OUT=str(out), DEMO_ARGS="--quick --epochs 1")
    state = cluster.wait(job, log, limit=240)
    assert state == "COMPLETED", log.read_text() if log.exists() else state
    check_report(out, world_size=2, launcher="slurm")
