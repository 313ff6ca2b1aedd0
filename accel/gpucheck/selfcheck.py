"""Planted parts for the dry run: one that fails, one that hangs past its budget. The runner must report
the first as failed, stop the second at its budget, and run the parts after them."""
from __future__ import annotations

import time


def fail(context) -> None:
    context.record.set("before_failure", "written")
    raise RuntimeError("planted failure (gpucheck's self-check: this part must be reported as failed)")


def overrun(context) -> None:
    context.record.set("before_hang", "written")
    time.sleep(3600)  # far past any budget: the runner must kill it
