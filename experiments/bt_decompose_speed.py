"""Time of ``BTLinear.from_dense`` on a 1024 x 4096 weight (R=8, N=4, automatic shapes: d=4).

Two weights: a random Gaussian one (far from block-term: the error stays near 1) and one that truly
is block-term (the dense weight of a random ``BTLinear`` with the same ranks: it should be recovered
to ~1e-10). For each, the wall and CPU time and the relative error of the current implementation are
measured; with ``--baseline`` the implementation before the speed-up (``accel/nn/bt/decompose.py`` at
commit ``BASELINE_COMMIT``, read with ``git show``) runs on the same weights in the same process,
and the ratios are printed. The baseline takes minutes per weight.

    python experiments/bt_decompose_speed.py              # current implementation only (~10 s)
    python experiments/bt_decompose_speed.py --baseline   # also the previous one (~5 min on 2 cores)
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from accel.nn import BTLinear  # noqa: E402
from accel.nn.bt.decompose import block_term_decomposition  # noqa: E402

RESULTS = ROOT / "experiments" / "results"
BASELINE_COMMIT = "2ced4ef"  # last commit with the tensorly-based implementation
OUT_FEATURES, IN_FEATURES, RANKS, NUM_BLOCKS = 1024, 4096, 8, 4


def load_baseline():
    source = subprocess.run(["git", "show", f"{BASELINE_COMMIT}:accel/nn/bt/decompose.py"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout
    module = types.ModuleType("decompose_baseline")
    exec(compile(source, "decompose_baseline.py", "exec"), module.__dict__)
    return module.block_term_decomposition


def timed(decompose, weight, layer):
    start_wall, start_cpu = time.perf_counter(), time.process_time()
    _, _, error = decompose(weight, in_shape=layer.in_shape, out_shape=layer.out_shape, ranks=layer.ranks,
                            num_blocks=NUM_BLOCKS)
    return {"wall_s": time.perf_counter() - start_wall, "cpu_s": time.process_time() - start_cpu,
            "relative_error": error}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", action="store_true", help="also time the implementation before the speed-up")
    args = parser.parse_args()

    torch.manual_seed(0)
    layer = BTLinear(IN_FEATURES, OUT_FEATURES, ranks=RANKS, num_blocks=NUM_BLOCKS, dtype=torch.float64)
    weights = {"random": torch.randn(OUT_FEATURES, IN_FEATURES, dtype=torch.float64),
               "block-term": layer.to_dense().detach()}
    implementations = {"current": block_term_decomposition}
    if args.baseline:
        implementations["baseline"] = load_baseline()
    print(f"{OUT_FEATURES}x{IN_FEATURES}, in_shape={layer.in_shape}, out_shape={layer.out_shape}, "
          f"R={RANKS}, N={NUM_BLOCKS}; {os.cpu_count()} CPUs")
    results = {name: {} for name in weights}
    for name, weight in weights.items():
        for implementation, decompose in implementations.items():
            results[name][implementation] = measured = timed(decompose, weight, layer)
            print(f"{name:10s} {implementation:8s} wall {measured['wall_s']:7.2f} s  cpu {measured['cpu_s']:7.2f} s  "
                  f"relative error {measured['relative_error']:.3e}", flush=True)
        if args.baseline:
            ratio = results[name]["baseline"]["wall_s"] / results[name]["current"]["wall_s"]
            results[name]["speedup_wall"] = ratio
            print(f"{name:10s} speed-up (baseline / current wall time): {ratio:.1f}x")

    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "bt_decompose_speed.json"
    payload = {"shape": [OUT_FEATURES, IN_FEATURES], "in_shape": list(layer.in_shape),
               "out_shape": list(layer.out_shape), "ranks": RANKS, "num_blocks": NUM_BLOCKS,
               "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
               "baseline_commit": BASELINE_COMMIT if args.baseline else None, "results": results}
    path.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {path}")
    if args.baseline:
        plot(results, RESULTS / "bt_decompose_speed.png")


def plot(results, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for offset, implementation in ((-0.2, "baseline"), (0.2, "current")):
        ax.bar([i + offset for i in range(len(names))], [results[n][implementation]["wall_s"] for n in names],
               width=0.4, label=implementation)
    ax.set_xticks(range(len(names)), names)
    ax.set_yscale("log")
    ax.set_ylabel("from_dense wall time (s)")
    ax.set_title(f"{OUT_FEATURES}x{IN_FEATURES}, R={RANKS}, N={NUM_BLOCKS}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
