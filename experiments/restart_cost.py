"""What an elastic restart of the demo costs: seconds lost when a worker dies mid-epoch.

Alternates two runs of ``python -m accel demo --nproc 2 --max-restarts 1`` with the same options, one
uninterrupted and one whose rank 1 SIGKILLs itself after step ``--kill-at`` (the test hook
``ACCEL_DEMO_FAULT``), and reports the difference of their wall times (median over ``--pairs``),
with the steps redone since the checkpoint it resumed from. Both must end with the same ``params_sha256``.

    python experiments/restart_cost.py                    # 3 pairs, --quick --epochs 2 (~5 min on 2 cores)
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results"


def timed_run(out: Path, options: list[str], fault: str | None) -> tuple[float, dict]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("ACCEL_DEMO_FAULT", None)
    if fault:
        env["ACCEL_DEMO_FAULT"] = fault
    command = [sys.executable, "-m", "accel", "demo", "--nproc", "2", "--device", "cpu", "--max-restarts", "1",
               "--out", str(out), "--no-resume", *options]
    start = time.perf_counter()
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        sys.exit(f"{' '.join(command)} failed:\n{result.stdout}\n{result.stderr}")
    return seconds, json.loads((out / "report.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--kill-at", type=int, default=30, help="global step after which rank 1 dies")
    parser.add_argument("--checkpoint-every", type=int, default=20)
    parser.add_argument("--options", default="--quick --epochs 2", help="further demo options")
    args = parser.parse_args()
    options = args.options.split() + ["--checkpoint-every", str(args.checkpoint_every)]
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for pair in range(args.pairs):
            clean_seconds, clean = timed_run(Path(scratch) / "clean", options, None)
            killed_seconds, killed = timed_run(Path(scratch) / "killed", options, f"KILL@{args.kill_at}:1")
            assert killed["params_sha256"] == clean["params_sha256"], "a restarted run ended elsewhere"
            assert killed["launcher_restarts"] == 1 and killed["resumes"] == 1
            rows.append({"uninterrupted_seconds": clean_seconds, "restarted_seconds": killed_seconds,
                         "seconds_lost": killed_seconds - clean_seconds, "resumed_from": killed["resumed_from"]})
            print(f"pair {pair + 1}: uninterrupted {clean_seconds:.1f} s, killed after step {args.kill_at} and "
                  f"restarted {killed_seconds:.1f} s: {killed_seconds - clean_seconds:+.1f} s", flush=True)
    lost = statistics.median(row["seconds_lost"] for row in rows)
    # the checkpoint resumed from (periodic or an epoch's end) is named ...-s<step>.pt
    resumed_step = int(rows[0]["resumed_from"][0].rsplit("-s", 1)[1].split(".")[0])
    summary = {"options": options, "nproc": 2, "kill_at_step": args.kill_at,
               "steps_redone": args.kill_at - resumed_step, "median_seconds_lost": lost,
               "min_seconds_lost": min(row["seconds_lost"] for row in rows),
               "max_seconds_lost": max(row["seconds_lost"] for row in rows),
               "median_uninterrupted_seconds": statistics.median(row["uninterrupted_seconds"] for row in rows),
               "params_identical": True, "pairs": rows}
    print(f"median seconds lost per restart: {lost:.1f} s (steps redone: {summary['steps_redone']}), "
          f"uninterrupted run {summary['median_uninterrupted_seconds']:.1f} s; parameters identical")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "restart_cost.json").write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
