import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/procs.py, tests/helpers.py

from helpers import chosen_seed  # noqa: E402

# every GPU test carries the `cuda` marker (also those only skipped "needs a CUDA GPU"): `pytest -m cuda` runs them all
pytest_plugins = ["accel.gpucheck.pytest_gpu_tests"]


def pytest_configure(config):
    os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture
def seed():
    """The test's seed: fixed by default; ACCEL_TEST_SEED picks another (see ``helpers.chosen_seed``)."""
    return chosen_seed()


# The local SLURM cluster is one session fixture for every test module that needs it (started once).
from slurm_cluster import cluster  # noqa: E402,F401
