"""Forward+backward time of BTLinear vs dense nn.Linear vs tednet's BTTLinear.

BTLinear runs as configured by default (``contraction="auto"``) and forced onto each strategy
(``bt_gemm``, ``bt_dense``, ``bt_lowrank``) in the same run: a strategy is kept in the library only where a row
shows it at least 10% faster than every other kept one (``strategy/best`` is printed per row).

Settings: the paper's UCF11 input layer (57600 -> 4x256 gates, R=4, N=2, batch 16 x 6 frames), two more input
layers, and the two BTLSTM projections the README reports (64 -> 4x256 over T=100 x B=32 rows; the
moving-digits 1,600 -> 16x4x2x2 at R=2 over 256 rows). All layers of a setting are timed in one run with interleaved repetitions; the median of
each is reported, with the ratios dense/BT and tednet/BT. The input does not require grad (as for an
RNN's input layer): backward computes the weight gradients only. Wall time and this process's CPU
time are both recorded: the development machine is shared, and CPU time is less disturbed by other
processes. A GPU section runs when CUDA is available.

A bound on what BT can reach built from these library ops: every GEMM and copy of one BT step is
recorded (a ``TorchDispatchMode``, backward included) and replayed alone with hot operands of the
recorded strides and a preallocated output; dense time over the sum of those is ``dense_over_bt_bound``.
The gap between that sum and the measured step is data movement between the ops and framework overhead.

    python experiments/bt_speed.py            # full run (a few minutes on 2 cores)
    python experiments/bt_speed.py --quick    # fewer repetitions
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import NamedTuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from accel.nn import BTLinear  # noqa: E402
from accel.nn.bt._contract import gemm_chain_training_flops  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
SETTINGS = [
    # name, in_shape, out_shape, ranks, num_blocks, batch
    ("UCF11 input layer", (8, 20, 20, 18), (16, 4, 4, 4), 4, 2, 16 * 6),
    ("Hollywood2 input layer", (10, 18, 13, 30), (16, 4, 4, 4), 4, 2, 16 * 6),
    ("64x64x3 frames, N=4", (16, 12, 8, 8), (16, 4, 4, 4), 4, 4, 128),
    ("BTLSTM 64 -> 256 projection", (4, 4, 2, 2), (16, 4, 4, 4), 4, 2, 100 * 32),
    ("moving digits 1600 -> 4x64", (8, 8, 5, 5), (16, 4, 2, 2), 2, 2, 256),
]
STRATEGIES = ("gemm", "dense", "lowrank")


def make_tednet(in_shape, out_shape, ranks, num_blocks):
    try:
        from tednet.tnn.bt_tucker import BTTLinear
    except ImportError:
        return None
    with contextlib.redirect_stdout(io.StringIO()):  # it prints its compression ratio
        return BTTLinear(list(in_shape), list(out_shape), [ranks] * len(in_shape), num_blocks)


def time_step(module, x, grad_y, device):
    """One forward+backward with the output gradient ``grad_y`` (a dense one, as in training: the gradient of a
    ``sum()`` is a stride-0 view that some backward kernels copy first); returns (wall seconds, CPU seconds)."""
    module.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter(), time.process_time()
    module(x).backward(grad_y)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - wall, time.process_time() - cpu


GEMMS = ("aten.mm.default", "aten.bmm.default", "aten.addmm.default", "aten.baddbmm.default", "aten.mm.out",
         "aten.bmm.out")
COPIES = ("aten.clone.default", "aten.copy_.default")


class Layout(NamedTuple):
    """What a replay needs of a recorded tensor operand."""
    shape: torch.Size
    stride: tuple
    dtype: torch.dtype


def _layout(value):
    return Layout(value.shape, value.stride(), value.dtype) if isinstance(value, torch.Tensor) else value


def _random_strided(value, device):
    """A random tensor of a recorded layout (expanded operands' zero strides included); other values as they are."""
    if not isinstance(value, Layout):
        return value
    extent = 1 + sum((size - 1) * step for size, step in zip(value.shape, value.stride)) if all(value.shape) else 0
    return torch.randn(extent, dtype=value.dtype, device=device).as_strided(value.shape, value.stride)


class OpRecorder(TorchDispatchMode):
    """Records the operand layouts (shape, strides, dtype) of every GEMM and copy dispatched while active,
    the backward's included (the mode sits below autograd)."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if str(func) in GEMMS + COPIES:
            self.calls.append((func, [_layout(a) for a in args], {k: _layout(v) for k, v in kwargs.items()}))
        return func(*args, **kwargs)


def replay_alone(calls, device, repetitions=30):
    """Seconds the recorded ops take when each runs alone and hot: operands with the recorded strides
    (random, already in cache), a preallocated output (no page faults). Returns (gemm_s, copy_s)."""
    totals = {"gemm": 0.0, "copy": 0.0}
    signatures = {}
    for func, layout, kwargs in calls:  # the pieces repeat the same ops: time each signature once
        key = (str(func), repr(layout), repr(kwargs))
        signatures.setdefault(key, [func, layout, kwargs, 0])[3] += 1
    for (name, _, _), (func, layout, kwargs, count) in signatures.items():
        args = [_random_strided(a, device) for a in layout]
        kwargs = {k: _random_strided(v, device) for k, v in kwargs.items()}
        if name.endswith(".out"):
            run = lambda func=func, args=args, kwargs=kwargs: func(*args, **kwargs)  # noqa: E731
        elif name in GEMMS:
            out = func(*args, **kwargs)
            run = lambda func=func, args=args, kwargs=kwargs, out=out: func.overloadpacket.out(  # noqa: E731
                *args, **kwargs, out=out)
        else:  # a clone or copy_: the copy into a contiguous buffer of the source's shape
            src = args[1] if name == "aten.copy_.default" else args[0]
            out = torch.empty(src.shape, dtype=src.dtype, device=device)
            run = lambda out=out, src=src: out.copy_(src)  # noqa: E731
        times = []
        for _ in range(repetitions + 3):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            run()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        totals["gemm" if name in GEMMS else "copy"] += count * statistics.median(times[3:])
    return totals["gemm"], totals["copy"]


def run_setting(setting, device, repetitions, warmup=2):
    name, in_shape, out_shape, ranks, num_blocks, batch = setting
    in_features, out_features = math.prod(in_shape), math.prod(out_shape)
    torch.manual_seed(0)
    layers = {
        "bt": BTLinear(in_features, out_features, in_shape=in_shape, out_shape=out_shape, ranks=ranks,
                       num_blocks=num_blocks),
        **{f"bt_{s}": BTLinear(in_features, out_features, in_shape=in_shape, out_shape=out_shape, ranks=ranks,
                               num_blocks=num_blocks, contraction=s) for s in STRATEGIES},
        "dense": torch.nn.Linear(in_features, out_features),
    }
    tednet = make_tednet(in_shape, out_shape, ranks, num_blocks)
    if tednet is not None:
        layers["tednet"] = tednet
    layers = {k: v.to(device) for k, v in layers.items()}
    x = torch.randn(batch, in_features, device=device)
    grad_y = torch.randn(batch, out_features, device=device)
    for _ in range(warmup):
        for layer in layers.values():
            time_step(layer, x, grad_y, device)
    walls = {k: [] for k in layers}
    cpus = {k: [] for k in layers}
    for _ in tqdm(range(repetitions), desc=f"{name} [{device.type}]", leave=False):
        for key, layer in layers.items():  # interleaved: drifts in machine load hit all alike
            wall, cpu = time_step(layer, x, grad_y, device)
            walls[key].append(wall)
            cpus[key].append(cpu)
    bt = layers["bt"]
    row = {
        "setting": name, "device": device.type, "in_shape": in_shape, "out_shape": out_shape, "ranks": ranks,
        "num_blocks": num_blocks, "batch": batch, "bt_parameters": bt.num_weight_parameters,
        "dense_parameters": in_features * out_features, "compression_ratio": bt.compression_ratio,
        "bt_path": bt.method(batch) if bt.method(batch) in ("dense", "lowrank") else
                   f"gemm chain, pieces of {bt.chunk_size(batch, x)} rows",
        "flops_ratio_dense_over_bt": bt.cost(batch)["matmul"] / {
            "gemm": bt.cost(batch)["gemm"], "lowrank": bt.cost(batch)["lowrank"],
            "dense": bt.cost(batch)["rebuild"] + bt.cost(batch)["matmul"]}[bt.method(batch)],
        "median_wall_s": {k: statistics.median(v) for k, v in walls.items()},
        "median_cpu_s": {k: statistics.median(v) for k, v in cpus.items()},
        "repetitions": repetitions,
    }
    # every GEMM and copy of one BT step, replayed alone and hot: what a build from these library ops could
    # at best reach if moving data between them cost nothing
    with OpRecorder() as recorder:
        time_step(bt, x, grad_y, device)
    gemm_s, copy_s = replay_alone(recorder.calls, device)
    row["bt_ops_alone_hot_ms"] = {"gemm": gemm_s * 1e3, "copy": copy_s * 1e3}
    row["dense_over_bt_bound"] = row["median_wall_s"]["dense"] / (gemm_s + copy_s)
    if row["bt_path"].startswith("gemm chain"):
        # fwd + weight gradient for dense (the input needs no grad); fwd + bwd of the chain likewise
        dense_flops = 4 * batch * in_features * out_features
        bt_flops = gemm_chain_training_flops(bt.in_shape, bt.out_shape, bt.ranks, num_blocks, batch)
        row["training_flops_ratio_dense_over_bt"] = dense_flops / bt_flops
        row["gflops_per_s"] = {"dense": dense_flops / row["median_wall_s"]["dense"] / 1e9,
                               "bt": bt_flops / row["median_wall_s"]["bt"] / 1e9,
                               "bt_gemms_alone_hot": bt_flops / gemm_s / 1e9}
    for clock in ("wall", "cpu"):
        times = row[f"median_{clock}_s"]
        row[f"dense_over_bt_{clock}"] = times["dense"] / times["bt"]
        best = min(times[f"bt_{s}"] for s in STRATEGIES)
        row[f"strategy_over_best_{clock}"] = {s: times[f"bt_{s}"] / best for s in STRATEGIES}
        if "tednet" in times:
            row[f"tednet_over_bt_{clock}"] = times["tednet"] / times["bt"]
    return row


def plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    keys = ["dense", "tednet", *[f"bt_{s}" for s in STRATEGIES], "bt"]
    width = 0.8 / len(keys)
    for i, key in enumerate(keys):
        values = [r["median_wall_s"].get(key, float("nan")) * 1e3 for r in rows]
        ax.bar([j + (i - (len(keys) - 1) / 2) * width for j in range(len(rows))], values, width, label=key)
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([f"{r['setting']}\n[{r['device']}, {r['threads']} thr]" for r in rows], fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("forward+backward, median ms (wall)")
    ax.set_title("BTLinear vs nn.Linear vs tednet BTTLinear")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="3 repetitions instead of 9")
    parser.add_argument("--threads", type=int, nargs="*", default=None,
                        help="CPU thread counts to run (default: torch's default, then 1)")
    args = parser.parse_args()
    repetitions = 3 if args.quick else 9
    default_threads = torch.get_num_threads()
    thread_counts = args.threads or sorted({default_threads, 1}, reverse=True)
    rows = []
    for threads in thread_counts:
        torch.set_num_threads(threads)
        for setting in SETTINGS:
            row = run_setting(setting, torch.device("cpu"), repetitions)
            row["threads"] = threads
            row["load_average_1min"] = os.getloadavg()[0]
            rows.append(row)
            print(f"[cpu, {threads} thr] {row['setting']:24s} dense/BT wall {row['dense_over_bt_wall']:5.2f}x "
                  f"cpu {row['dense_over_bt_cpu']:5.2f}x"
                  f" | tednet/BT wall {row.get('tednet_over_bt_wall', 0):5.2f}x "
                  f"cpu {row.get('tednet_over_bt_cpu', 0):5.2f}x | flop ratio {row['flops_ratio_dense_over_bt']:.1f}x"
                  f" | BT {row['median_wall_s']['bt'] * 1e3:.1f} ms ({row['bt_path']})", flush=True)
            print("    strategy/best (CPU time): " + ", ".join(
                f"{s} {v:.2f}x" for s, v in row["strategy_over_best_cpu"].items()), flush=True)
            hot = row["bt_ops_alone_hot_ms"]
            print(f"    BT's ops alone and hot: GEMMs {hot['gemm']:.1f} ms + copies {hot['copy']:.1f} ms "
                  f"-> bound dense/BT {row['dense_over_bt_bound']:.2f}x", flush=True)
            if "gflops_per_s" in row:
                rates = row["gflops_per_s"]
                print(f"    fwd+bwd flop ratio {row['training_flops_ratio_dense_over_bt']:.2f}x; GFLOP/s dense "
                      f"{rates['dense']:.1f}, BT {rates['bt']:.1f}, BT's GEMMs alone and hot "
                      f"{rates['bt_gemms_alone_hot']:.1f}", flush=True)
    torch.set_num_threads(default_threads)
    if torch.cuda.is_available():
        for setting in SETTINGS:
            row = run_setting(setting, torch.device("cuda"), repetitions * 3)
            row["threads"] = default_threads
            row["gpu"] = torch.cuda.get_device_name()
            rows.append(row)
            print(f"[cuda] {row['setting']:24s} dense/BT {row['dense_over_bt_wall']:5.2f}x | "
                  f"tednet/BT {row.get('tednet_over_bt_wall', 0):5.2f}x", flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    meta = {"torch": torch.__version__, "cpu_count": os.cpu_count(), "quick": args.quick,
            "note": "shared machine: other processes ran concurrently; see load_average_1min per row"}
    (RESULTS / "bt_speed.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    plot(rows, RESULTS / "bt_speed.png")
    print(f"wrote {RESULTS / 'bt_speed.json'} and bt_speed.png")


if __name__ == "__main__":
    main()
