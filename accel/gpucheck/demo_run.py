"""Part e: the demo, ``python -m accel demo --device cuda --quick``, as a user runs it (``--device cpu
--quick --epochs 1`` on a dry run). Its report (accuracy, ISGD and out-of-core figures) goes into the record;
its pictures stay behind, since a borrowed machine sends back only a few files."""
from __future__ import annotations

import json
import subprocess
import sys


def run(context) -> None:
    out = context.scratch / "demo"
    arguments = ["--device", "cpu", "--quick", "--epochs", "1"] if context.dry_run else ["--device", "cuda", "--quick"]
    command = [sys.executable, "-m", "accel", "demo", *arguments, "--out", str(out)]
    context.record.set("command", "python -m accel demo " + " ".join(arguments))
    try:
        result = subprocess.run(command, timeout=max(context.left() - 3, 1), text=True, stdout=sys.stdout,
                                stderr=subprocess.STDOUT)
    except subprocess.TimeoutExpired:
        raise RuntimeError("the demo did not finish within the part's budget") from None
    context.record.set("exit_code", result.returncode)
    if result.returncode != 0:
        raise RuntimeError(f"the demo exited with {result.returncode}")
    report = json.loads((out / "report.json").read_text())
    context.record.set("report", report)
    if report["device"].split(":")[0] != context.device.type:
        raise RuntimeError(f"the demo ran on {report['device']}, not on {context.device.type}")
    if not 0.0 <= report["test_accuracy"] <= 1.0:
        raise RuntimeError(f"the demo reported test accuracy {report['test_accuracy']}")


def table_rows(record: dict):
    report = record["results"].get("report")
    if not report:
        return []
    return [(f"demo ({record['results']['command']}), {report['epochs']} epochs",
             f"{report['wall_seconds']:.1f} s, test accuracy {report['test_accuracy']:.1%}, "
             f"{report['isgd']['chased_batches']} of {report['isgd']['batches']} batches chased",
             f"chance {report['chance_accuracy']:.0%}", "")]
