"""MPI, for real: `mpiexec -n 2` (the mpich wheel's) runs init() and an all_reduce.

Without MASTER_ADDR, init() has mpi4py broadcast rank 0's address and a free port.
Skipped where mpiexec or mpi4py is missing, unless ACCEL_REQUIRE_MPI=1 (set by .ci/run) makes that a failure.
"""
import importlib.util
import os
import shutil
import sys
from pathlib import Path

import procs
import pytest
from scripts.dist_report import read_reports

pytestmark = [pytest.mark.mpi, pytest.mark.multiprocess]
SCRIPT = procs.REPO_ROOT / "tests" / "scripts" / "dist_report.py"


@pytest.fixture(scope="module")
def mpiexec() -> str:
    # The mpiexec beside this interpreter belongs to the MPI that its mpi4py wheel uses.
    beside = Path(sys.executable).parent / "mpiexec"
    found = str(beside) if beside.exists() else shutil.which("mpiexec")
    missing = [name for name, ok in (("mpiexec", found), ("mpi4py", importlib.util.find_spec("mpi4py")))
               if not ok]
    if missing:
        reason = f"{' and '.join(missing)} not found: pip install mpi4py mpich"
        if os.environ.get("ACCEL_REQUIRE_MPI") == "1":
            pytest.fail(f"ACCEL_REQUIRE_MPI=1 but {reason}")
        pytest.skip(reason)
    return found


def test_mpiexec_init_and_all_reduce(mpiexec):
    output = procs.check(procs.run([mpiexec, "-n", "2", sys.executable, str(SCRIPT), "--backend", "gloo", "--device", "cpu"], timeout=120))
    reports = read_reports(output)
    assert sorted(reports) == [0, 1], output
    for rank, report in reports.items():
        assert (report["launcher"], report["world_size"], report["backend"]) == ("mpi", 2, "gloo")
        assert int(report["PMI_RANK"]) == rank and report["local_world_size"] == 2
        assert report["master_addr"] is None  # nothing given: the address came through mpi4py
        assert report["all_reduce"] == 3.0 and report["group_world_size"] == 2
