"""A BT RNN training step under different C allocator settings, each setting in fresh processes, interleaved.

accel allocates the recurrence's whole-sequence buffers afresh every step and sets no allocator option. glibc's
malloc gives large freed blocks back to the system once more than its trim threshold is free at the top of the
heap, and the next step then faults every page in again. An application can keep that memory with
``MALLOC_TOP_PAD_`` (or ``MALLOC_TRIM_THRESHOLD_``), or use tcmalloc / jemalloc (``LD_PRELOAD``); this script
measures what that changes.

Per process: median CPU time of a forward+backward (random output gradient) and minor page faults per step
(``getrusage``), 1 torch thread. Each setting runs once per round, the order rotating between rounds.

    python experiments/cpu_allocator.py                                  # writes results/cpu_allocator.json
    python experiments/cpu_allocator.py --rounds 3 --repetitions 10
    python experiments/cpu_allocator.py --source old=/path/to/other/checkout,SOME_VARIABLE=0
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
SETTINGS = {  # name: class, input size, hidden size, batch, steps
    "BTLSTM 64 -> 256, T=100, batch 32": ("BTLSTM", 64, 256, 32, 100),
    "BTGRU 64 -> 256, T=100, batch 32": ("BTGRU", 64, 256, 32, 100),
}
ALLOCATORS = {  # name: environment added to the process
    "glibc default": {},
    "MALLOC_TOP_PAD_=268435456": {"MALLOC_TOP_PAD_": "268435456"},
}


def one_run(setting: str, repetitions: int) -> dict:
    import torch

    import accel.nn

    torch.set_num_threads(1)
    torch.manual_seed(0)
    name, input_size, hidden_size, batch, steps = SETTINGS[setting]
    model = getattr(accel.nn, name)(input_size, hidden_size, batch_first=True)
    x = torch.randn(batch, steps, input_size)
    grad = torch.randn(batch, steps, hidden_size)

    def step():
        model.zero_grad(set_to_none=True)
        faults, start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.process_time()
        model(x)[0].backward(grad)
        return time.process_time() - start, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults

    for _ in range(3):
        step()
    samples = [step() for _ in range(repetitions)]
    return {"ms": statistics.median(t for t, _ in samples) * 1e3,
            "faults_per_step": statistics.median(f for _, f in samples)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=4, help="fresh processes per variant")
    parser.add_argument("--repetitions", type=int, default=15, help="timed steps per process")
    parser.add_argument("--settings", nargs="*", default=[next(iter(SETTINGS))], choices=list(SETTINGS))
    parser.add_argument("--source", action="append", default=[], metavar="NAME=DIR[,VAR=VALUE...]",
                        help="another checkout to run beside this one (its accel on PYTHONPATH), with environment "
                             "variables set if given")
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VAR=VALUE",
                        help="an extra variant of this checkout with one environment variable set")
    parser.add_argument("--out", default=str(RESULTS / "cpu_allocator.json"))
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one_run(args.one, args.repetitions)))
        return
    variants = {f"this checkout, {name}": (ROOT, env) for name, env in ALLOCATORS.items()}
    for spec in args.env:
        name, variable, value = spec.split("=", 2)
        variants[f"this checkout, {name}"] = (ROOT, {variable: value})
    for spec in args.source:
        name, rest = spec.split("=", 1)
        folder, *assignments = rest.split(",")
        variants[name] = (Path(folder).resolve(), dict(a.split("=", 1) for a in assignments))
    rows = []
    for setting in args.settings:
        samples = {name: [] for name in variants}
        names = list(variants)
        for k in range(args.rounds):
            for name in names[k % len(names):] + names[:k % len(names)]:
                source, extra = variants[name]
                env = {**os.environ, **extra, "PYTHONPATH": str(source)}
                done = subprocess.run([sys.executable, __file__, "--one", setting, "--repetitions",
                                       str(args.repetitions)], capture_output=True, text=True, check=True, env=env,
                                      cwd=source)
                samples[name].append(json.loads(done.stdout.strip().splitlines()[-1]))
        baseline = statistics.median(r["ms"] for r in samples[names[0]])
        row = {"setting": setting, "variants": {}}
        for name, runs in samples.items():
            ms = statistics.median(r["ms"] for r in runs)
            row["variants"][name] = {"runs": runs, "median_ms": ms, "over_first": ms / baseline}
            print(f"{setting} | {name}: median {ms:.0f} ms ({ms / baseline:.2f}x the first), per process "
                  + " ".join(f"{r['ms']:.0f}" for r in runs) + " ms, faults per step "
                  + " ".join(f"{r['faults_per_step']:.0f}" for r in runs), flush=True)
        rows.append(row)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"threads": 1, "repetitions": args.repetitions, "rounds": args.rounds}
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
