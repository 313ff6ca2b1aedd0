"""One part of ``gpucheck`` in its own process: ``python -m accel.gpucheck.child PART --json FILE ...``.

A part is a function ``run(context)`` that measures, writes what it finds into ``context.record`` as it
goes, and raises when something is wrong. This process turns the outcome into the record's status; the
runner (:mod:`accel.gpucheck.runner`) stops it at its budget.
"""
from __future__ import annotations

import argparse
import importlib
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch

from accel.gpucheck.record import Recorder, environment


@dataclass
class Context:
    """What a part is given.

    Attributes:
        part (str): its name.
        dry_run (bool): no GPU is measured: run small CPU stand-ins of the device work.
        device (torch.device): ``cuda`` on a GPU run, ``cpu`` on a dry run.
        scratch (Path): a private folder for files that must not go back with the results.
        record (Recorder): the part's JSON record.
        deadline (float): ``time.monotonic()`` by which the part must be done (the runner kills it soon after).
    """

    part: str
    dry_run: bool
    device: torch.device
    scratch: Path
    record: Recorder
    deadline: float

    def left(self) -> float:
        """Seconds until the deadline."""
        return self.deadline - time.monotonic()


def load(target: str):
    """``"module:function"`` -> the function."""
    module_name, _, function_name = target.partition(":")
    return getattr(importlib.import_module(module_name), function_name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m accel.gpucheck.child", description=__doc__)
    parser.add_argument("part")
    parser.add_argument("--target", required=True, help="module:function running the part")
    parser.add_argument("--json", type=Path, required=True, help="the part's record")
    parser.add_argument("--scratch", type=Path, required=True)
    parser.add_argument("--budget", type=float, required=True, help="seconds")
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args(argv)

    deadline = time.monotonic() + args.budget
    args.scratch.mkdir(parents=True, exist_ok=True)
    record = Recorder(args.json, args.part, environment(args.dry_run), args.budget)
    context = Context(args.part, args.dry_run, torch.device("cpu" if args.dry_run else "cuda"), args.scratch,
                      record, deadline)
    try:
        load(args.target)(context)
    except Exception as error:  # noqa: BLE001 - every failure is reported in the record
        traceback.print_exc()
        record.finish("failed", f"{type(error).__name__}: {error}")
        return 1
    record.finish("ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
