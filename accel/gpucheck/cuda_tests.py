"""Part a: the test suite's GPU tests (``pytest -m cuda`` over ``tests/``, every test skipped without a GPU
included), one entry per test in the record. On a dry run the same selection runs on the CPU, where each
of those tests must skip: that checks the selection finds them."""
from __future__ import annotations

import os
import subprocess
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _outcome(case) -> tuple[str, str]:
    for tag in ("failure", "error", "skipped"):
        element = case.find(tag)
        if element is not None:
            message = (element.get("message") or element.text or "").strip().splitlines()
            return {"failure": "failed", "error": "error", "skipped": "skipped"}[tag], (message[0] if message else "")
    return "passed", ""


def run(context) -> None:
    tests = REPO / "tests"
    if not tests.is_dir():
        raise FileNotFoundError(f"no tests folder at {tests}: run gpucheck from a checkout of the repository")
    report = context.scratch / "junit.xml"
    command = [sys.executable, "-m", "pytest", "-m", "cuda", "-p", "accel.gpucheck.pytest_gpu_tests",
               "-p", "no:cacheprovider", "-q", "-rfEs", f"--junitxml={report}",
               "-o", "timeout=30",  # pytest-timeout (on the GPU machine): a hung test fails, the report is written
               "-o", "junit_logging=system-out",  # what GPU tests print (measured limits, probes) goes in the record
               str(tests)]
    context.record.set("command", " ".join(command[1:]))
    try:
        # a dry run hides any GPU (--dry-run on a GPU machine): the selected tests must then skip
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""} if context.dry_run else None
        result = subprocess.run(command, cwd=REPO, timeout=max(context.left() - 5, 1), text=True,
                                stdout=sys.stdout, stderr=subprocess.STDOUT, env=env)
        exit_code = result.returncode
    except subprocess.TimeoutExpired:
        exit_code = None
        context.record.note("pytest stopped at the part's budget")
    if not report.exists():
        raise RuntimeError(f"pytest wrote no report (exit code {exit_code})")
    cases = list(ElementTree.parse(report).getroot().iter("testcase"))
    tests_run = []
    for case in cases:
        outcome, message = _outcome(case)
        printed = (case.findtext("system-out") or "").strip()
        tests_run.append({"test": f"{case.get('classname')}::{case.get('name')}", "outcome": outcome,
                          "seconds": float(case.get("time") or 0), "message": message[:300],
                          **({"printed": printed[-2000:]} if printed else {})})
    counts = {name: sum(test["outcome"] == name for test in tests_run)
              for name in ("passed", "failed", "error", "skipped")}
    context.record.set("exit_code", exit_code)
    context.record.set("counts", counts)
    context.record.set("tests", tests_run)
    if not tests_run:
        raise RuntimeError("no GPU test was selected")
    bad = [test["test"] for test in tests_run if test["outcome"] in ("failed", "error")]
    if bad:
        raise RuntimeError(f"{len(bad)} of {len(tests_run)} GPU tests failed: {', '.join(bad[:10])}")
    if context.dry_run and counts["skipped"] != len(tests_run):
        raise RuntimeError(f"without a GPU every selected test must skip, but {counts['passed']} passed: "
                           "the selection picks up tests that are not GPU tests")
    if not context.dry_run and counts["skipped"]:
        context.record.note(f"{counts['skipped']} GPU tests skipped on the GPU: see 'tests' for the reasons")


def table_rows(record: dict):
    counts = record["results"].get("counts")
    if not counts:
        return []
    total = sum(counts.values())
    text = ", ".join(f"{value} {name}" for name, value in counts.items() if value)
    return [(f"GPU tests (pytest -m cuda, {total} selected)", text, "", "")]
