"""torch.compile of BTLinear on each contraction path: first-call time, graph breaks, accuracy, speed.

For every setting and path a fresh process with an empty Inductor cache (so the compile time is the one a
user's very first call sees, Dynamo and Inductor warm-up included) builds the layer, compiles it with ``torch.compile`` (default
mode), and records:

- ``first_call_s``: the compiled layer's first forward+backward (tracing and code generation);
- ``graph_breaks``: Dynamo's graph-break counter after that call (0 means one graph);
- ``dynamic_recompile_s``: the first forward+backward at a second batch size (Dynamo recompiles with a
  symbolic batch), and ``max_relative_difference`` of outputs and weight gradients against eager at
  both batch sizes;
- ``compiled_over_eager``: median compiled forward+backward time over the eager one, from repetitions
  interleaved in one loop (below 1: compiled is faster), wall and process CPU time (``_cpu``: less
  disturbed by other processes on a shared machine). The input needs no gradient (a first layer).

Settings: the paper's UCF11 input layer (57600 = 8x20x20x18 -> 256 = 4x4x4x4, R=4, N=2, batch 16 x 6
frames) and a small one (64 = 4x4x4 -> 256 = 4x8x8, R=4, N=2, batch 32).

    python experiments/bt_compile.py            # writes results/bt_compile.json
    python experiments/bt_compile.py --quick    # fewer repetitions
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from accel.nn import BTLinear  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
SETTINGS = {
    # name: in_shape, out_shape, ranks, num_blocks, batch
    "UCF11 input layer": ((8, 20, 20, 18), (4, 4, 4, 4), 4, 2, 16 * 6),
    "small": ((4, 4, 4), (4, 8, 8), 4, 2, 32),
}
PATHS = ("auto", "gemm", "einsum", "dense")


def step(module, x):
    """One forward+backward; returns ((wall, process CPU) seconds, output, weight gradients)."""
    module.zero_grad(set_to_none=True)
    start, cpu = time.perf_counter(), time.process_time()
    y = module(x)
    y.sum().backward()
    return (time.perf_counter() - start, time.process_time() - cpu), y.detach(), [p.grad for p in module.parameters()]


def relative_difference(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def measure(setting: str, contraction: str, repetitions: int) -> dict:
    in_shape, out_shape, ranks, num_blocks, batch = SETTINGS[setting]
    torch.manual_seed(0)
    layer = BTLinear(math.prod(in_shape), math.prod(out_shape), in_shape=in_shape, out_shape=out_shape,
                     ranks=ranks, num_blocks=num_blocks, contraction=contraction)
    compiled = torch.compile(layer)
    x = torch.randn(batch, layer.in_features)
    torch._dynamo.utils.counters.clear()
    first_call, y_compiled, grads_compiled = step(compiled, x)
    graph_breaks = sum(torch._dynamo.utils.counters["graph_break"].values())
    _, y_eager, grads_eager = step(layer, x)
    differences = [relative_difference(y_compiled, y_eager)]
    differences += [relative_difference(a, b) for a, b in zip(grads_compiled, grads_eager)]
    other = torch.randn(batch // 2 + 1, layer.in_features)  # a second size: Dynamo goes dynamic
    recompile, y_compiled, grads_compiled = step(compiled, other)
    _, y_eager, grads_eager = step(layer, other)
    differences.append(relative_difference(y_compiled, y_eager))
    differences += [relative_difference(a, b) for a, b in zip(grads_compiled, grads_eager)]
    for _ in range(2):  # warm both
        step(layer, x), step(compiled, x)
    times = {"eager": [], "compiled": []}
    for _ in range(repetitions):  # interleaved: load drifts hit both alike
        times["eager"].append(step(layer, x)[0])
        times["compiled"].append(step(compiled, x)[0])
    medians = {k: statistics.median(wall for wall, _ in v) for k, v in times.items()}
    cpu_medians = {k: statistics.median(cpu for _, cpu in v) for k, v in times.items()}
    eager_path = layer.uses_dense(batch) and "dense" or layer.factorized_method(batch)
    return {"setting": setting, "contraction": contraction, "eager_path": eager_path, "in_shape": in_shape,
            "out_shape": out_shape, "ranks": ranks, "num_blocks": num_blocks, "batch": batch,
            "first_call_s": first_call[0], "graph_breaks": graph_breaks, "dynamic_recompile_s": recompile[0],
            "max_relative_difference": max(differences), "median_s": medians,
            "median_cpu_s": cpu_medians, "compiled_over_eager": medians["compiled"] / medians["eager"],
            "compiled_over_eager_cpu": cpu_medians["compiled"] / cpu_medians["eager"], "repetitions": repetitions,
            "threads": torch.get_num_threads(), "load_average_1min": os.getloadavg()[0]}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="5 repetitions instead of 15")
    parser.add_argument("--one", nargs=2, metavar=("SETTING", "PATH"), help=argparse.SUPPRESS)
    parser.add_argument("--settings", nargs="*", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--paths", nargs="*", default=list(PATHS), choices=PATHS)
    args = parser.parse_args()
    repetitions = 5 if args.quick else 15
    if args.one:
        print(json.dumps(measure(*args.one, repetitions)))
        return
    rows = []
    for setting in args.settings:
        for path in args.paths:
            command = [sys.executable, __file__, "--one", setting, path] + (["--quick"] if args.quick else [])
            with tempfile.TemporaryDirectory() as cache:  # a cold Inductor cache: a user's very first call
                env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache)
                done = subprocess.run(command, capture_output=True, text=True, check=True, env=env)
            row = json.loads(done.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(f"{setting:18s} {path:7s} (eager: {row['eager_path']:6s}) first call {row['first_call_s']:5.1f} s, "
                  f"breaks {row['graph_breaks']}, dynamic recompile {row['dynamic_recompile_s']:5.1f} s, "
                  f"rel. diff {row['max_relative_difference']:.1e}, compiled/eager {row['compiled_over_eager']:.2f} "
                  f"(CPU time {row['compiled_over_eager_cpu']:.2f}) "
                  f"({row['median_s']['compiled'] * 1e3:.1f} / {row['median_s']['eager'] * 1e3:.1f} ms)", flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    meta = {"torch": torch.__version__, "cpu_count": os.cpu_count(), "quick": args.quick,
            "note": "shared 2-core machine: other processes ran concurrently; see load_average_1min per row"}
    path = RESULTS / "bt_compile.json"
    path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
