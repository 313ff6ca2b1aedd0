"""The test harness's own promise: a child that overruns its limit is killed with everything it started
(torchrun's workers live in sessions of their own), and the test fails instead of hanging."""
import sys
import time

import procs
import pytest

_SPAWNS_DETACHED_GRANDCHILD = (
    "import subprocess, sys, time;"
    "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'], start_new_session=True);"
    "print(child.pid, flush=True); time.sleep(120)")


def test_timeout_kills_detached_grandchildren_and_fails():
    # the child sleeps 120 s: the failure, with its output, shows it was stopped at its 2 s limit
    with pytest.raises(AssertionError, match="did not finish in 2s") as failure:
        procs.run([sys.executable, "-c", _SPAWNS_DETACHED_GRANDCHILD], timeout=2)
    grandchild = int(str(failure.value).split("output:\n", 1)[1].split()[0])
    deadline = time.monotonic() + 30  # SIGKILL was sent; give the kernel a moment to reap
    while procs.start_time(grandchild) is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert procs.start_time(grandchild) is None
