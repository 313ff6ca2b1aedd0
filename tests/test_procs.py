"""The test harness's own promise: a child that overruns its limit is killed with everything it started
(torchrun's workers live in sessions of their own), and the test fails instead of hanging."""
import sys
import time

import pytest

import procs

_SPAWNS_DETACHED_GRANDCHILD = (
    "import subprocess, sys, time;"
    "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'], start_new_session=True);"
    "print(child.pid, flush=True); time.sleep(120)")


def test_timeout_kills_detached_grandchildren_and_fails_fast():
    start = time.monotonic()
    with pytest.raises(AssertionError, match="did not finish in 2s") as failure:
        procs.run([sys.executable, "-c", _SPAWNS_DETACHED_GRANDCHILD], timeout=2)
    assert time.monotonic() - start < 15
    grandchild = int(str(failure.value).split("output:\n", 1)[1].split()[0])
    time.sleep(0.2)
    assert not _alive(grandchild)


def _alive(pid: int) -> bool:
    try:
        state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"
