"""What keeping the large buffers between steps (accel/nn/_step_buffers.py) saves: BT RNN training steps with
the pool on and off, interleaved in ABBA order in one process, each in a few fresh processes (a process's heap
layout decides how many pages glibc hands back to the OS between steps, so one process is one sample).

Per run and setting: median CPU time of a forward+backward (random output gradient, input without grad),
minor page faults per step (``getrusage``), and pool-on over pool-off time. 1 torch thread.

    python experiments/step_buffers.py              # writes results/step_buffers.json
    python experiments/step_buffers.py --runs 2 --repetitions 10
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from accel.nn import BTGRU, BTLSTM
from accel.nn import _step_buffers as step_buffers  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
SETTINGS = {  # name: class, input size, hidden size, batch, steps
    "BTLSTM 64 -> 256, T=100, batch 32": (BTLSTM, 64, 256, 32, 100),
    "BTGRU 64 -> 256, T=100, batch 32": (BTGRU, 64, 256, 32, 100),
    "BTLSTM 64 -> 256, T=400, batch 64": (BTLSTM, 64, 256, 64, 400),
}


def one_run(setting: str, repetitions: int) -> dict:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    cls, input_size, hidden_size, batch, steps = SETTINGS[setting]
    model = cls(input_size, hidden_size, batch_first=True)
    x = torch.randn(batch, steps, input_size)
    grad = torch.randn(batch, steps, hidden_size)

    def step(pool: bool):
        step_buffers.enabled = pool
        model.zero_grad(set_to_none=True)
        faults, start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.process_time()
        model(x)[0].backward(grad)
        return time.process_time() - start, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults

    for _ in range(2):
        step(True), step(False)
    samples = {True: [], False: []}
    for k in range(repetitions):  # ABBA
        for pool in ((False, True) if k % 2 == 0 else (True, False)):
            samples[pool].append(step(pool))
    result = {}
    for pool, name in ((True, "pool"), (False, "no_pool")):
        result[f"{name}_ms"] = statistics.median(t for t, _ in samples[pool]) * 1e3
        result[f"{name}_faults_per_step"] = statistics.median(f for _, f in samples[pool])
    result["pool_over_no_pool"] = result["pool_ms"] / result["no_pool_ms"]
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=4, help="fresh processes per setting")
    parser.add_argument("--repetitions", type=int, default=20, help="steps per side and process")
    parser.add_argument("--settings", nargs="*", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one_run(args.one, args.repetitions)))
        return
    rows = []
    for setting in args.settings:
        runs = []
        for _ in range(args.runs):
            done = subprocess.run([sys.executable, __file__, "--one", setting, "--repetitions", str(args.repetitions)],
                                  capture_output=True, text=True, check=True)
            runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
        ratios = [r["pool_over_no_pool"] for r in runs]
        rows.append({"setting": setting, "runs": runs, "median_pool_over_no_pool": statistics.median(ratios)})
        print(f"{setting}: pool / no pool " + " ".join(f"{r:.2f}" for r in ratios)
              + f" (median {statistics.median(ratios):.2f}); ms with / without "
              + " ".join(f"{r['pool_ms']:.0f}/{r['no_pool_ms']:.0f}" for r in runs)
              + "; faults per step with / without "
              + " ".join(f"{r['pool_faults_per_step']:.0f}/{r['no_pool_faults_per_step']:.0f}" for r in runs),
              flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    meta = {"torch": torch.__version__, "threads": 1, "repetitions": args.repetitions}
    (RESULTS / "step_buffers.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"wrote {RESULTS / 'step_buffers.json'}")


if __name__ == "__main__":
    main()
