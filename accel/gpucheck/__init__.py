"""``python -m accel gpucheck --out DIR``: one command that checks and measures every GPU path, made for a borrowed
GPU, and needing nothing but the installed package (no checkout: a wheel on the GPU machine is enough).

Parts, each in its own process and its own time budget (a part that fails or overruns is reported and the
next one runs):

* ``device_checks`` -- correctness of every GPU path against CPU references (:mod:`accel.gpucheck.device_checks`);
* ``gemm`` -- pinned host<->device bandwidth, then ``accel.gemm`` on host data against in-core ``torch.matmul``
  on device-resident data (N = 16384, 32768, memory a quarter of the problem, fp32 / TF32 / bf16; one worker,
  two workers on one GPU, GPU + CPU), against cuBLAS-XT (fp32, :mod:`accel.gpucheck.cublasxt`), and its traffic
  over the lower bound;
* ``bt`` -- BTLinear and BTLSTM against ``nn.Linear`` / ``nn.LSTM`` at the UCF11 setting, every contraction path;
* ``isgd`` -- ISGD's per-step time against SGD's;
* ``demo`` -- ``python -m accel demo --device cuda --quick``.

Each part writes ``<part>_<gpu>.json`` under ``--out`` (the machine's GPU, driver, CUDA and torch inside);
the run adds ``gpucheck_<gpu>.md`` (one markdown table, printed last) and ``gpucheck_<gpu>.log``: seven files,
within what a borrowed machine sends back. A GPU run also copies the JSON files to ``--results`` (default:
``experiments/results`` when the current folder is a checkout). ``--dry-run`` (automatic without a GPU) runs
everything it can on the CPU quickly -- small CPU stand-ins of every part, the device checks with the CPU standing
in for the GPU, each check that needs a GPU named as such -- plus a check that a failing part and a part over its
budget are stopped and reported; nothing is measured.
"""
from __future__ import annotations

import argparse
import shutil
import signal
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import torch

from accel.gpucheck.record import DRY_RUN_NAME, environment, gpu_slug, read_json
from accel.gpucheck.runner import KILL_GRACE_S, Outcome, run_part
from accel.gpucheck.table import markdown_table

__all__ = ["PARTS", "add_arguments", "run"]


class Part(NamedTuple):
    target: str        # "module:function" run in the part's process
    budget_s: float    # on a GPU run
    dry_budget_s: float


# GPU budgets sum to 420 s: the whole run stays under 8 minutes on an H100/H200 with process start-ups.
# Dry-run budgets are only ceilings, wide enough for a 2-core machine that other jobs load heavily.
PARTS: dict[str, Part] = {
    "device_checks": Part("accel.gpucheck.device_checks:run", 75, 150),
    "gemm": Part("accel.gpucheck.ooc_bench:run", 205, 90),
    "bt": Part("accel.gpucheck.bt_bench:run", 60, 90),
    "isgd": Part("accel.gpucheck.isgd_bench:run", 25, 60),
    "demo": Part("accel.gpucheck.demo_run:run", 55, 150),
}
TOTAL_BUDGET_S, DRY_TOTAL_BUDGET_S = 450.0, 600.0
# Dry run only: parts that must fail / overrun, to show the runner stops and reports them and goes on.
SELF_CHECKS: dict[str, Part] = {
    "planted_failure": Part("accel.gpucheck.selfcheck:fail", 30, 30),
    "planted_overrun": Part("accel.gpucheck.selfcheck:overrun", 4, 4),
}


def _default_results() -> Path | None:
    """``experiments/results`` when the current folder is a checkout of the repository, else nowhere."""
    folder = Path("experiments")
    return folder / "results" if folder.is_dir() else None


def _seconds(text: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{what} must be a number of seconds, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{what} must be a positive number of seconds, got {value}")
    return value


def _budget(text: str) -> tuple[str, float]:
    name, _, seconds = text.partition("=")
    if name not in PARTS or not seconds:
        raise argparse.ArgumentTypeError(f"expected PART=SECONDS with PART one of {', '.join(PARTS)}, got {text!r}")
    return name, _seconds(seconds, f"the budget for {name}")


def _parts(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in PARTS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown part(s) {unknown or text!r}; choose from {', '.join(PARTS)}")
    return names


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, required=True, help="folder for the JSON records, the table and the log")
    parser.add_argument("--parts", type=_parts, default=list(PARTS),
                        help=f"comma-separated subset of {','.join(PARTS)} (default: all)")
    parser.add_argument("--budget", type=_budget, action="append", default=[], metavar="PART=SECONDS",
                        help="override one part's time budget (repeatable)")
    parser.add_argument("--total-budget", type=lambda text: _seconds(text, "the total budget"), default=None,
                        help=f"seconds for the whole run; a part gets at most what is left (default "
                             f"{TOTAL_BUDGET_S:.0f}, {DRY_TOTAL_BUDGET_S:.0f} on a dry run)")
    parser.add_argument("--dry-run", action="store_true",
                        help="run what can run on the CPU, quickly, and name what needs a GPU, even where a GPU is "
                             "visible (automatic without one)")
    parser.add_argument("--results", type=Path, default=_default_results(),
                        help="where a GPU run copies its JSON records (default: experiments/results when run from "
                             "a checkout, else no copy)")


def _self_check(scratch: Path, log, env: dict) -> tuple[bool, str]:
    """Run the planted parts side by side; True when the failure and the overrun were both stopped and reported."""
    with ThreadPoolExecutor(len(SELF_CHECKS)) as pool:
        futures = {name: pool.submit(run_part, name, part.target, scratch / f"{name}.json", scratch,
                                     part.dry_budget_s, True, log, env) for name, part in SELF_CHECKS.items()}
        outcomes = {name: future.result() for name, future in futures.items()}
    failure, overrun = outcomes["planted_failure"], outcomes["planted_overrun"]
    budget = SELF_CHECKS["planted_overrun"].dry_budget_s
    problems = []
    if failure.status != "failed" or "planted failure" not in (failure.record.get("error") or ""):
        problems.append(f"the planted failure came back as {failure.status!r} ({failure.record.get('error')})")
    if overrun.status != "timed out" or overrun.elapsed_s > budget + KILL_GRACE_S + 10:
        problems.append(f"the planted overrun came back as {overrun.status!r} after {overrun.elapsed_s:.1f} s "
                        f"(budget {budget:.0f} s)")
    if (read_json(overrun.path) or {}).get("status") != "timed out":
        problems.append("the planted overrun's record does not say it timed out")
    if problems:
        return False, "; ".join(problems)
    return True, (f"a failing part was reported as failed and a hanging part was stopped after "
                  f"{overrun.elapsed_s:.1f} s (budget {budget:.0f} s)")


def _stop_on_sigterm(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")  # the running part's process group is killed on the way out


def run(args: argparse.Namespace) -> int:
    """Run the parts; 0 when every part (and on a dry run the self-check) passed."""
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    dry_run = args.dry_run or not torch.cuda.is_available()
    env = environment(dry_run)
    slug = DRY_RUN_NAME if dry_run else gpu_slug(env["gpu_name"] or "unknown gpu")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    budgets = dict(args.budget)
    total_budget = args.total_budget or (DRY_TOTAL_BUDGET_S if dry_run else TOTAL_BUDGET_S)
    start = time.monotonic()
    banner = (f"gpucheck: DRY RUN, no GPU measured: {'--dry-run given' if args.dry_run else 'no CUDA device visible'}; "
              f"small CPU stand-ins of every part" if dry_run else
              f"gpucheck on {env['gpu_name']} (driver {env['driver']}, CUDA {env['cuda']}, torch {env['torch']})")
    print(banner, flush=True)
    outcomes: list[Outcome] = []
    skipped: list[str] = []
    self_check = None
    with tempfile.TemporaryDirectory(prefix="gpucheck-") as scratch_name, \
            open(out / f"gpucheck_{slug}.log", "w") as log:
        log.write(banner + "\n")
        scratch = Path(scratch_name)
        try:
            if dry_run:
                self_check = _self_check(scratch, log, env)
            for name in args.parts:
                part = PARTS[name]
                left = total_budget - (time.monotonic() - start)
                budget = min(budgets.get(name, part.dry_budget_s if dry_run else part.budget_s), left)
                if budget < 5:
                    print(f"gpucheck: {name} not started: {left:.0f} s left of the total budget", flush=True)
                    skipped.append(name)
                    continue
                print(f"gpucheck: {name} (budget {budget:.0f} s)", flush=True)
                outcome = run_part(name, part.target, out / f"{name}_{slug}.json", scratch, budget, dry_run, log, env)
                outcomes.append(outcome)
                print(f"gpucheck: {name} {outcome.status} in {outcome.elapsed_s:.1f} s"
                      + (f": {outcome.record.get('error')}" if outcome.status != "ok" else ""), flush=True)
        except KeyboardInterrupt as interruption:  # Ctrl-C or SIGTERM: report what was measured
            print(f"gpucheck: interrupted ({interruption}); writing the table of the parts that ran", flush=True)
            skipped.append("interrupted")
        table = markdown_table(env, outcomes, self_check, time.monotonic() - start, skipped)
        (out / f"gpucheck_{slug}.md").write_text(table)
        log.write(table)
    copied = []
    if not dry_run and args.results:
        args.results.mkdir(parents=True, exist_ok=True)
        for outcome in outcomes:
            shutil.copy2(outcome.path, args.results / outcome.path.name)
            copied.append(outcome.path.name)
    passed = (not skipped and all(outcome.status == "ok" for outcome in outcomes)
              and (self_check is None or self_check[0]))
    print()
    if copied:
        print(f"copied {', '.join(copied)} to {args.results}")
    print(f"wrote {len(outcomes)} part records, gpucheck_{slug}.md and gpucheck_{slug}.log to {out}")
    print("DRY RUN: no GPU was measured; the figures below come from CPU stand-ins and mean nothing." if dry_run
          else f"measured on {env['gpu_name']}.")
    print(table, flush=True)
    sys.stdout.flush()
    return 0 if passed else 1
