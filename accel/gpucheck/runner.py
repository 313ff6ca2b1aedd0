"""Runs each part in its own process within its budget, and keeps going past a part that fails.

A separate process per part is what makes the budget enforceable and the parts independent: a hung CUDA
call, a crash inside cuBLAS or an exhausted device cannot be stopped from a thread, but a process group
can be killed, and the next part gets a fresh CUDA context. The part's output is copied, line by line
and prefixed with its name, to the console and to the run's log.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import NamedTuple, TextIO

from accel.gpucheck.record import read_json, write_json

KILL_GRACE_S = 5.0  # between SIGTERM and SIGKILL


class Outcome(NamedTuple):
    part: str
    status: str          # "ok", "failed", "timed out"
    elapsed_s: float
    record: dict         # the part's JSON record (what it measured, even when stopped)
    path: Path


def _copy_lines(stream, prefix: str, sinks: list[TextIO], tail: list[str]) -> None:
    for line in iter(stream.readline, ""):
        for sink in sinks:
            sink.write(prefix + line)
            sink.flush()
        tail.append(line.rstrip("\n"))
        del tail[:-40]


def _kill_group(process: subprocess.Popen) -> None:
    """SIGTERM to the part's process group (the part and anything it started), then SIGKILL."""
    for sig, wait in ((signal.SIGTERM, KILL_GRACE_S), (signal.SIGKILL, 30.0)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def run_part(part: str, target: str, json_path: Path, scratch: Path, budget_s: float, dry_run: bool,
             log: TextIO, environment: dict) -> Outcome:
    """Run ``target`` (``"module:function"``) as part ``part`` in a child process, killed after ``budget_s``.

    The status comes from the part's record when the part finished; ``"timed out"`` when it was killed
    at its budget; ``"failed"`` with the exit code and the last lines of output when it died without
    saying why (a crash, an import error).
    """
    json_path.unlink(missing_ok=True)
    command = [sys.executable, "-u", "-m", "accel.gpucheck.child", part, "--target", target, "--json",
               str(json_path), "--scratch", str(scratch / part), "--budget", f"{budget_s:.1f}"]
    if dry_run:
        command.append("--dry-run")
    environment_variables = {**os.environ, "PYTHONUNBUFFERED": "1"}
    start = time.monotonic()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               errors="replace", start_new_session=True, env=environment_variables)
    tail: list[str] = []
    reader = threading.Thread(target=_copy_lines, args=(process.stdout, f"[{part}] ", [sys.stdout, log], tail),
                              daemon=True)
    reader.start()
    timed_out = False
    try:
        process.wait(timeout=budget_s)
    except subprocess.TimeoutExpired:
        timed_out = True
    finally:
        if timed_out or process.poll() is None:
            _kill_group(process)
    reader.join(timeout=10)
    elapsed = time.monotonic() - start

    record = read_json(json_path) or {"part": part, "status": "running", "budget_s": budget_s, "error": None,
                                      "environment": environment, "results": {}, "rows": [], "notes": []}
    if timed_out:
        record["status"] = "timed out"
        record["error"] = f"stopped at its budget of {budget_s:.0f} s; the results above are what it measured"
    elif record.get("status") != "ok" or process.returncode != 0:
        if record.get("status") == "running" or not record.get("error"):
            last = " | ".join(line for line in tail[-8:] if line.strip())
            record["error"] = f"exit code {process.returncode}; last output: {last}"
        record["status"] = "failed"
    record["elapsed_s"] = round(elapsed, 2)
    write_json(json_path, record)
    return Outcome(part, record["status"], elapsed, record, json_path)
