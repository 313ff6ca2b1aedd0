"""torchrun, for real: two gloo processes run init(), an all_reduce and one DDP step.

The tests ask for gloo on the CPU explicitly (arguments, or ACCEL_BACKEND / ACCEL_DEVICE), so they mean the
same on a machine with one GPU, where the default would be nccl with both ranks on that GPU."""
import sys

import procs
import pytest
from scripts.dist_report import read_reports

pytestmark = pytest.mark.multiprocess
SCRIPT = procs.REPO_ROOT / "tests" / "scripts" / "dist_report.py"
GLOO_ON_CPU = ("--backend", "gloo", "--device", "cpu")


def test_torchrun_init_all_reduce_and_replica_comparison():
    reports = read_reports(procs.check(procs.torchrun(SCRIPT, "--replicas", *GLOO_ON_CPU, nproc=2, timeout=120)))
    assert sorted(reports) == [0, 1]
    for rank, report in reports.items():
        assert (report["launcher"], report["world_size"], report["backend"]) == ("torchrun", 2, "gloo")
        assert report["device"] == "cpu"
        assert report["local_rank"] == int(report["LOCAL_RANK"]) == rank
        assert report["local_world_size"] == 2 and report["group_world_size"] == 2
        assert report["all_reduce"] == 3.0
        # the comparison used by `check` sees identical replicas as identical, and a changed one
        assert report["replica_difference_same"] == 0.0
        assert report["replica_difference_perturbed"] == pytest.approx(0.25)


def test_torchrun_check_command_takes_a_ddp_step_with_identical_replicas():
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "accel", "check", "--backend", "gloo"]
    output = procs.check(procs.run(cmd, timeout=120, env=procs.child_env(ACCEL_DEVICE="cpu")))
    for rank in (0, 1):
        lines = [line for line in output.splitlines() if line.startswith(f"rank {rank}/2 ")]
        assert len(lines) == 1, output
        assert "launcher torchrun, backend gloo" in lines[0] and "all_reduce 3 (expected 3)" in lines[0]
        assert "replicas identical: yes" in lines[0] and lines[0].endswith("; ok"), output
    assert "check passed on 2 process(es)" in output

