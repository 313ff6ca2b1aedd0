"""Out-of-core GEMM benchmark: accel.gemm against its baselines, ratios measured in one run.

CPU section (always): ``accel.gemm`` with a CPU worker on host tensors vs ``torch.matmul`` on the same
tensors, square and rectangular, with the default memory and with a memory limit of a quarter of the
problem (goal: the engine costs under 10%, i.e. ratio >= 0.90).

GPU section (when CUDA is available; skipped with a message otherwise), N x N x N with host operands:
  * vs in-core ``torch.matmul`` on device-resident data at the same precision (fp32, TF32, bf16), with
    ``memory_limit`` a quarter of the problem (goal: >= 0.90 for N >= 32768);
  * vs cuBLAS-XT (fp32, pinned host memory, block size swept) through experiments/baselines/cublasxt.py
    (goal: >= 1.25x faster);
  * two workers on one GPU, GPU + CPU workers, and the traffic as a multiple of the lower bound.

Writes experiments/results/gemm_cpu.json (+ .png) and, on a GPU, gemm_gpu.json (+ .png).

    python experiments/gemm_bench.py                  # CPU section, a few minutes on 2 cores
    python experiments/gemm_bench.py --gpu-sizes 16384 32768 --skip-cpu   # on a GPU machine
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))
sys.path.insert(0, str(ROOT))

from accel.ooc import Engine  # noqa: E402

RESULTS = ROOT / "results"


def best_of(function, repeats: int) -> float:
    """Median wall time of ``repeats`` runs after one warm-up run."""
    return interleaved([function], repeats)[0]


def interleaved(functions, repeats: int) -> list[float]:
    """Median wall time of each function, runs interleaved (a, b, c, a, b, c, ...) after one warm-up
    each, so that load from other processes on a shared machine hits every contender alike."""
    for function in functions:
        function()
    times = [[] for _ in functions]
    for _ in range(repeats):
        for function, samples in zip(functions, times):
            start = time.perf_counter()
            function()
            samples.append(time.perf_counter() - start)
    return [statistics.median(samples) for samples in times]


def problem_bytes(m, n, k, element_size) -> int:
    return (m * k + k * n + m * n) * element_size


# -- CPU --------------------------------------------------------------------------------------------------
def cpu_section(shapes, repeats: int) -> list[dict]:
    rows = []
    for m, n, k in tqdm(shapes, desc="CPU shapes"):
        A, B = torch.randn(m, k), torch.randn(k, n)
        flops = 2 * m * n * k
        engine = Engine(["cpu"])
        limit = problem_bytes(m, n, k, 4) // 4
        limited_engine = Engine(["cpu"], memory_limit=limit)
        baseline, default, limited = interleaved(
            [lambda: torch.matmul(A, B), lambda: engine.gemm(A, B), lambda: limited_engine.gemm(A, B)], repeats)
        default_plan = engine.stats.plan.grid
        stats = limited_engine.stats
        error = (engine.gemm(A, B) - A @ B).abs().max().item()
        row = dict(m=m, n=n, k=k, torch_matmul_s=baseline, accel_s=default, accel_limited_s=limited,
                   ratio=baseline / default, ratio_limited=baseline / limited, gflops_torch=flops / baseline / 1e9,
                   gflops_accel=flops / default / 1e9, plan_default=default_plan, plan_limited=stats.plan.grid,
                   memory_limit=limit, peak_bytes=max(stats.peak_bytes_per_worker.values()),
                   traffic_ratio_limited=stats.traffic_ratio, max_abs_error=error)
        rows.append(row)
        tqdm.write(f"  {m}x{n}x{k}: torch.matmul {baseline * 1e3:7.1f} ms | accel.gemm {default * 1e3:7.1f} ms "
                   f"(ratio {row['ratio']:.3f}, plan {default_plan}) | limit 1/4 {limited * 1e3:7.1f} ms "
                   f"(ratio {row['ratio_limited']:.3f}, plan {stats.plan.grid}, traffic {stats.traffic_ratio:.2f}x bound)")
    return rows


# -- GPU --------------------------------------------------------------------------------------------------
def gpu_section(sizes, repeats: int, block_dims) -> list[dict]:
    from baselines.cublasxt import CublasXt

    rows = []
    precisions = [("fp32", torch.float32, None), ("tf32", torch.float32, "tf32"), ("bf16", torch.bfloat16, None)]
    for n in tqdm(sizes, desc="GPU sizes"):
        for name, dtype, compute in precisions:
            A = torch.randn(n, n, dtype=dtype).pin_memory()
            B = torch.randn(n, n, dtype=dtype).pin_memory()
            flops = 2 * n ** 3
            row = dict(n=n, precision=name)
            previous = torch.backends.cuda.matmul.allow_tf32
            torch.backends.cuda.matmul.allow_tf32 = name == "tf32"
            try:  # in-core baseline on device-resident data, same precision
                dA, dB = A.cuda(), B.cuda()
                row["in_core_s"] = best_of(lambda: (torch.matmul(dA, dB), torch.cuda.synchronize()), repeats)
            except torch.OutOfMemoryError:
                row["in_core_s"] = None
            finally:
                torch.backends.cuda.matmul.allow_tf32 = previous
                dA = dB = None  # free the device copies before the out-of-core runs
                torch.cuda.empty_cache()
            limit = problem_bytes(n, n, n, A.element_size()) // 4
            for label, devices in [("one", ["cuda:0"]), ("two_on_one_gpu", ["cuda:0", "cuda:0"]),
                                   ("gpu_cpu", ["cuda:0", "cpu"])]:
                if label == "gpu_cpu" and n > 8192:
                    continue  # one GPU-sized block takes the CPU worker longer than the GPU takes for all
                engine = Engine(devices, memory_limit=limit)
                seconds = best_of(lambda: engine.gemm(A, B, compute_dtype=compute), repeats)
                stats = engine.stats
                row[f"accel_{label}_s"] = seconds
                row[f"accel_{label}_tflops"] = flops / seconds / 1e12
                row[f"traffic_ratio_{label}"] = stats.traffic_ratio
                row[f"blocks_{label}"] = stats.blocks_per_worker
                row[f"plan_{label}"] = stats.plan.grid
                engine.clear_cache()
            if row.get("in_core_s"):
                row["ratio_vs_in_core"] = row["in_core_s"] / row["accel_one_s"]
            if name == "fp32":
                C = torch.empty(n, n).pin_memory()
                best = None
                for block_dim in block_dims:
                    with CublasXt([0], block_dim) as xt:
                        seconds = best_of(lambda: xt.gemm(A, B, C), repeats)
                    row[f"cublasxt_{block_dim}_s"] = seconds
                    best = seconds if best is None else min(best, seconds)
                row["cublasxt_best_s"] = best
                row["speedup_vs_cublasxt"] = best / row["accel_one_s"]
            rows.append(row)
            tqdm.write(f"  N={n} {name}: " + ", ".join(f"{key}={value:.3f}" for key, value in row.items()
                                                       if isinstance(value, float)))
    return rows


def plot(rows, path, x_key, series, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(8, 4))
    labels = [x_key(row) for row in rows]
    width = 0.8 / len(series)
    for index, (key, label) in enumerate(series):
        axis.bar([i + index * width for i in range(len(rows))], [row.get(key) or 0 for row in rows], width, label=label)
    axis.axhline(0.9, color="grey", linestyle="--", linewidth=1, label="goal 0.90")
    axis.set_xticks([i + width * (len(series) - 1) / 2 for i in range(len(rows))], labels, rotation=20)
    axis.set_ylabel("speed relative to baseline")
    axis.set_title(title)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-cpu", action="store_true")
    parser.add_argument("--gpu-sizes", type=int, nargs="+", default=[8192, 16384, 32768])
    parser.add_argument("--block-dims", type=int, nargs="+", default=[2048, 4096, 8192, 16384])
    args = parser.parse_args(argv)
    RESULTS.mkdir(parents=True, exist_ok=True)
    machine = dict(platform=platform.platform(), processor=platform.processor(), cpus=os.cpu_count(),
                   torch=torch.__version__, threads=torch.get_num_threads())

    if not args.skip_cpu:
        shapes = [(1024, 1024, 1024), (2048, 2048, 2048), (4096, 256, 2048), (256, 4096, 4096), (3000, 1000, 500)]
        rows = cpu_section(shapes, args.repeats)
        summary = dict(min_ratio=min(r["ratio"] for r in rows), min_ratio_limited=min(r["ratio_limited"] for r in rows))
        print(f"CPU: accel.gemm / torch.matmul speed ratio, worst case {summary['min_ratio']:.3f} "
              f"(default memory), {summary['min_ratio_limited']:.3f} (memory limit 1/4 of the problem); goal >= 0.90")
        (RESULTS / "gemm_cpu.json").write_text(json.dumps(dict(machine=machine, rows=rows, summary=summary), indent=2))
        plot(rows, RESULTS / "gemm_cpu.png", lambda r: f"{r['m']}x{r['n']}x{r['k']}",
             [("ratio", "accel.gemm, default memory"), ("ratio_limited", "accel.gemm, memory 1/4 of problem")],
             "CPU worker vs torch.matmul (1.0 = same speed)")

    if not torch.cuda.is_available():
        print("GPU section skipped: no CUDA device visible (torch.cuda.is_available() is False). "
              "Run this script on a GPU machine to compare with in-core torch.matmul and cuBLAS-XT.")
        return
    machine["gpu"] = torch.cuda.get_device_name(0)
    rows = gpu_section(args.gpu_sizes, args.repeats, args.block_dims)
    (RESULTS / "gemm_gpu.json").write_text(json.dumps(dict(machine=machine, rows=rows), indent=2, default=str))
    plot(rows, RESULTS / "gemm_gpu.png", lambda r: f"N={r['n']} {r['precision']}",
         [("ratio_vs_in_core", "vs in-core torch.matmul"), ("speedup_vs_cublasxt", "vs cuBLAS-XT")],
         "GPU: accel.gemm on host data, memory limit 1/4 of the problem")


if __name__ == "__main__":
    main()
