"""Launch environments and fixtures shared by the tests of accel.distributed and the CLI."""
from __future__ import annotations

import os

import procs
import pytest

from accel import distributed

# Task 3 of `srun -N2 --ntasks-per-node=2` on nodes gpu07 and gpu08.
SRUN_TWO_NODES_TASK_3 = {
    "SLURM_JOB_ID": "123456", "SLURM_STEP_ID": "2", "SLURM_PROCID": "3", "SLURM_LOCALID": "1",
    "SLURM_NODEID": "1", "SLURM_NTASKS": "4", "SLURM_STEP_NUM_TASKS": "4",
    "SLURM_STEP_NODELIST": "gpu[07-08]", "SLURM_JOB_NODELIST": "gpu[07-08]",
    "SLURM_STEP_TASKS_PER_NODE": "2(x2)", "SLURMD_NODENAME": "gpu08",
}


@pytest.fixture(name="clean_env")
def clean_env_fixture(monkeypatch):
    """``clean_env``: this process's environment without launcher variables, and no process group afterwards."""
    for name in list(os.environ):
        if name not in procs.child_env():
            monkeypatch.delenv(name)
    distributed.shutdown()
    yield monkeypatch
    distributed.shutdown()
