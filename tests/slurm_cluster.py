"""A real local SLURM cluster for tests: the session fixture `cluster` and its helpers.

`slurm/local_cluster.sh` starts munged + slurmctld + slurmd for this host (partition `local`) and two
emulated nodes n1, n2 (partition `emulated`, more slurmd on 127.0.0.1), and stops exactly those
daemons afterwards. Skipped where SLURM is not installed or we are not root, unless
ACCEL_REQUIRE_SLURM=1 (set by .ci/run, which installs SLURM) makes that a failure.
Use it with `from slurm_cluster import cluster` or `pytest_plugins = ["slurm_cluster"]`.
"""
from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import procs
import pytest

CLUSTER_SCRIPT = procs.REPO_ROOT / "slurm" / "local_cluster.sh"
FINAL_FAILURES = {"FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                  "DEADLINE", "PREEMPTED"}


@dataclass
class Cluster:
    state_dir: Path

    def env(self, **overrides: str) -> dict[str, str]:
        return procs.child_env(SLURM_CONF=str(self.state_dir / "slurm.conf"), **overrides)

    def run(self, cmd: list[str], timeout: float = 120, **overrides: str):
        return procs.run(cmd, timeout=timeout, env=self.env(**overrides))

    def sbatch(self, args: list[str], output: Path, **overrides: str) -> str:
        result = procs.check(self.run(["sbatch", "--parsable", f"--output={output}", *args], 30, **overrides))
        return result.strip().split(";")[0]

    def wait(self, job_id: str, output: Path, limit: float = 120) -> str:
        """Poll scontrol until the job ends; its final state. On the time limit, cancel it and fail."""
        deadline = time.monotonic() + limit
        while True:
            shown = procs.check(self.run(["scontrol", "show", "job", "--oneliner", job_id], 30))
            state = re.search(r"JobState=(\w+)", shown).group(1)
            if state == "COMPLETED" or state in FINAL_FAILURES:
                return state
            if time.monotonic() > deadline:
                self.run(["scancel", job_id], 30)
                log = output.read_text() if output.exists() else "(no output)"
                pytest.fail(f"job {job_id} still {state} after {limit}s:\n{shown}\n{log}")
            time.sleep(0.3)


@pytest.fixture(scope="session")
def cluster():
    tools = ("munged", "slurmctld", "slurmd", "srun", "sbatch", "scontrol", "sinfo")
    missing = [tool for tool in tools if shutil.which(tool) is None]
    reason = (f"SLURM not installed ({', '.join(missing)} missing): apt-get install -y "
              "--no-install-recommends slurmd slurmctld slurm-client munge") if missing else \
        "the local test cluster needs root" if os.geteuid() != 0 else None
    if reason:
        if os.environ.get("ACCEL_REQUIRE_SLURM") == "1":
            pytest.fail(f"ACCEL_REQUIRE_SLURM=1 but {reason}")
        pytest.skip(reason)
    # Not under pytest's tmp dir: munged (user munge) must be able to reach its socket's directory.
    state_dir = Path(tempfile.mkdtemp(prefix="accel-slurm-"))
    state_dir.chmod(0o755)
    started = procs.run(["bash", str(CLUSTER_SCRIPT), "start", "--state-dir", str(state_dir),
                         "--emulated-nodes", "2"], timeout=90)
    try:
        assert started.returncode == 0, f"local cluster did not start:\n{started.stdout}"
        yield Cluster(state_dir)
    finally:  # stops exactly the daemons the script recorded
        procs.check(procs.run(["bash", str(CLUSTER_SCRIPT), "stop", "--state-dir", str(state_dir)], timeout=90))
        shutil.rmtree(state_dir, ignore_errors=True)
