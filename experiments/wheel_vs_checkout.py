"""Is a pip install as fast as the checkout? A BTLSTM training step timed with accel from an installed wheel
against accel from this checkout, in fresh processes interleaved in ABBA order.

Each sample is one process: BTLSTM 64 -> 256, T=100, batch 32, batch_first, forward + backward of a fixed
random output gradient + an SGD step, 1 torch thread, median CPU time of ``--steps`` steps after 3 warm-up
steps. The wheel's process runs in an empty temporary folder with no PYTHONPATH, so it imports the installed
package; the checkout's gets PYTHONPATH=<repository>. Each child says which accel it imported, and a child that
imported the wrong one is an error. Prints the per-pair ratios and their median (wheel over checkout: above 1
means the installed package is slower). A benchmark, not a test: it fails only when a child fails.

    python experiments/wheel_vs_checkout.py --wheel-python /path/to/venv/bin/python
    python experiments/wheel_vs_checkout.py --wheel-python V/bin/python --checkout-python python3 --pairs 5
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[1]


def child(steps: int) -> None:
    import time

    import torch

    import accel
    from accel.nn import BTLSTM

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = BTLSTM(64, 256, batch_first=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    x = torch.randn(32, 100, 64)
    grad = torch.randn(32, 100, 256)

    def step() -> float:
        start = time.process_time()
        optimizer.zero_grad(set_to_none=True)
        model(x)[0].backward(grad)
        optimizer.step()
        return time.process_time() - start

    for _ in range(3):
        step()
    times = [step() for _ in range(steps)]
    print(json.dumps({"accel": str(Path(accel.__file__).resolve().parent), "median_ms": statistics.median(times) * 1e3}))


def sample(python: str, side: str, steps: int, workdir: str) -> dict:
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    if side == "checkout":
        env["PYTHONPATH"] = str(REPOSITORY)
    done = subprocess.run([python, str(Path(__file__).resolve()), "--child", "--steps", str(steps)], cwd=workdir,
                          env=env, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        sys.exit(f"wheel_vs_checkout: the {side} child ({python}) exited {done.returncode}:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    inside = Path(result["accel"]).is_relative_to(REPOSITORY)
    if inside != (side == "checkout"):
        sys.exit(f"wheel_vs_checkout: the {side} child imported accel from {result['accel']}, "
                 f"{'inside' if inside else 'outside'} the repository {REPOSITORY}")
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wheel-python", help="the python of a venv where the wheel is installed")
    parser.add_argument("--checkout-python", default=sys.executable, help="a python that can run the checkout")
    parser.add_argument("--pairs", type=int, default=3, help="interleaved (wheel, checkout) process pairs")
    parser.add_argument("--steps", type=int, default=15, help="timed steps per process")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.steps)
        return 0
    if not args.wheel_python:
        parser.error("--wheel-python is required")
    if args.pairs < 1 or args.steps < 1:
        parser.error("--pairs and --steps must be at least 1")
    sides = {"wheel": args.wheel_python, "checkout": args.checkout_python}
    ratios = []
    with tempfile.TemporaryDirectory(prefix="accel-wheel-vs-checkout-") as workdir:
        for pair in range(args.pairs):
            order = ("wheel", "checkout") if pair % 2 == 0 else ("checkout", "wheel")
            results = {side: sample(sides[side], side, args.steps, workdir) for side in order}
            ratio = results["wheel"]["median_ms"] / results["checkout"]["median_ms"]
            ratios.append(ratio)
            print(f"pair {pair + 1}: wheel {results['wheel']['median_ms']:.1f} ms ({results['wheel']['accel']}), "
                  f"checkout {results['checkout']['median_ms']:.1f} ms; wheel / checkout {ratio:.2f}", flush=True)
    print(f"BTLSTM training step, wheel / checkout: median {statistics.median(ratios):.2f} "
          f"(pairs {min(ratios):.2f}-{max(ratios):.2f}, {args.pairs} pairs of {args.steps} steps, 1 thread, CPU time)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
