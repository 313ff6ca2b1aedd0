"""Out-of-core GEMM benchmark: accel.gemm against its baselines, ratios measured in one run.

CPU section (always): ``accel.gemm`` with a CPU worker on host tensors vs ``torch.matmul`` on the same
tensors, square and rectangular, with the default memory and with a memory limit of a quarter of the
problem (goal: the engine costs under 10%, i.e. ratio >= 0.90).

GPU section (when CUDA is available; skipped with a message otherwise), N x N x N with host operands:
  * vs in-core ``torch.matmul`` on device-resident data at the same precision (fp32, TF32, bf16), with
    ``memory_limit`` a quarter of the problem (goal: >= 0.90 for N >= 32768);
  * vs cuBLAS-XT (fp32, pinned host memory, block size swept) through experiments/baselines/cublasxt.py
    (goal: >= 1.25x faster);
  * two workers on one GPU, GPU + CPU workers, and the traffic as a multiple of the lower bound;
  * per row, the transfer-bound limit: the traffic at the lower bound over the host link's measured
    bandwidth (pinned, 1 GiB, at the start) against the in-core compute time, i.e. the best ratio any
    out-of-core schedule could reach, beside the achieved ratio.

Every row reports ``traffic_ratio`` (bytes moved over max(2mnk/sqrt(M), compulsory), GemmStats) and
``traffic_ratio_hong_kung`` (over 2mnk/sqrt(M) alone). The CPU section also measures what tile reuse
within one OutOfCoreLinear forward/backward saves (bytes and time, against the same three GEMMs with no
reuse). Rows are written to the JSON as they finish; a failing cuBLAS-XT baseline is recorded in its
row and never aborts the run.

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
from types import SimpleNamespace

import torch
from tqdm import tqdm

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))
sys.path.insert(0, str(ROOT))

from accel.nn import OutOfCoreLinear  # noqa: E402
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
def cpu_section(shapes, repeats: int, save) -> list[dict]:
    rows = []
    for m, n, k in tqdm(shapes, desc="CPU shapes"):
        A, B = torch.randn(m, k), torch.randn(k, n)
        flops = 2 * m * n * k
        engine = Engine(["cpu"])
        limit = problem_bytes(m, n, k, 4) // 4
        limited_engine = Engine(["cpu"], memory_limit=limit)
        baseline, default, limited = interleaved(
            [lambda: torch.matmul(A, B), lambda: engine.gemm(A, B), lambda: limited_engine.gemm(A, B)],  # noqa: B023
            repeats)
        default_plan = engine.stats.plan.grid
        stats = limited_engine.stats
        error = (engine.gemm(A, B) - A @ B).abs().max().item()
        row = dict(m=m, n=n, k=k, torch_matmul_s=baseline, accel_s=default, accel_limited_s=limited,
                   ratio=baseline / default, ratio_limited=baseline / limited, gflops_torch=flops / baseline / 1e9,
                   gflops_accel=flops / default / 1e9, plan_default=default_plan, plan_limited=stats.plan.grid,
                   memory_limit=limit, peak_bytes=max(stats.peak_bytes_per_worker.values()),
                   traffic_bytes_limited=stats.traffic_bytes, traffic_ratio_limited=stats.traffic_ratio,
                   traffic_ratio_hong_kung_limited=stats.traffic_ratio_hong_kung, max_abs_error=error)
        rows.append(row)
        save(rows)
        tqdm.write(f"  {m}x{n}x{k}: torch.matmul {baseline * 1e3:7.1f} ms | accel.gemm {default * 1e3:7.1f} ms "
                   f"(ratio {row['ratio']:.3f}, plan {default_plan}) | limit 1/4 {limited * 1e3:7.1f} ms "
                   f"(ratio {row['ratio_limited']:.3f}, plan {stats.plan.grid}, traffic {stats.traffic_ratio:.2f}x "
                   f"bound, {stats.traffic_ratio_hong_kung:.2f}x 2mnk/sqrt(M))")
    return rows


def layer_reuse_section(batch: int, features: int, repeats: int) -> dict:
    """One OutOfCoreLinear forward/backward (tiles shared within it) against the same three engine GEMMs
    with no reuse: bytes moved and time, interleaved."""
    layer = OutOfCoreLinear(features, features, devices=["cpu"], memory_limit=problem_bytes(features, features,
                                                                                                 batch, 4) * 2)
    engine = layer.engine
    x = torch.randn(batch, features, requires_grad=True)
    grad = torch.randn(batch, features)
    # the grid OutOfCoreLinear cuts its three GEMMs on (forward x W^T, backward g W and g^T x)
    side = engine.block_for([(batch, features, features)] * 3, torch.float32)

    def with_reuse():
        layer(x).backward(grad)

    def without_reuse():  # the same products, each call loading its own tiles
        engine.gemm(x.detach(), layer.weight.detach(), layer.bias.detach(), beta=1.0, trans_b=True, block=side)
        engine.gemm(grad, layer.weight.detach(), block=side)
        engine.gemm(grad, x.detach(), trans_a=True, block=side)

    moved = {}
    for name, function in (("reuse", with_reuse), ("no_reuse", without_reuse)):
        engine.reset_totals()
        function()
        moved[name] = engine.totals.bytes_to_device + engine.totals.bytes_to_host
    reuse_s, plain_s = interleaved([with_reuse, without_reuse], repeats)
    row = dict(batch=batch, features=features, tile_side=side, bytes_reuse=moved["reuse"],
               bytes_no_reuse=moved["no_reuse"], bytes_saved_fraction=1 - moved["reuse"] / moved["no_reuse"],
               seconds_reuse=reuse_s, seconds_no_reuse=plain_s, speedup=plain_s / reuse_s)
    print(f"OutOfCoreLinear {batch}x{features}->{features} fwd+bwd: tile reuse moves {moved['reuse'] / 1e6:.1f} MB "
          f"vs {moved['no_reuse'] / 1e6:.1f} MB without ({row['bytes_saved_fraction']:.0%} saved); "
          f"time {reuse_s * 1e3:.1f} vs {plain_s * 1e3:.1f} ms ({row['speedup']:.2f}x)")
    return row


def host_link_bandwidth(nbytes: int = 1 << 30) -> dict:
    """Pinned host<->device copy bandwidth in bytes/s (median of 5), both directions."""
    host = torch.empty(nbytes, dtype=torch.uint8).pin_memory()
    device = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    to_device = best_of(lambda: (device.copy_(host, non_blocking=True), torch.cuda.synchronize()), 5)
    to_host = best_of(lambda: (host.copy_(device, non_blocking=True), torch.cuda.synchronize()), 5)
    return dict(to_device=nbytes / to_device, to_host=nbytes / to_host)


# -- GPU --------------------------------------------------------------------------------------------------
def cublasxt_times(A, B, repeats: int, block_dims) -> dict:
    """cuBLAS-XT (fp32) per block size; any failure (library not found, ...) is returned, never raised."""
    try:
        from baselines.cublasxt import CublasXt

        C = torch.empty(A.shape[0], B.shape[1]).pin_memory()
        times = {}
        for block_dim in block_dims:
            with CublasXt([0], block_dim) as xt:
                times[f"cublasxt_{block_dim}_s"] = best_of(lambda: xt.gemm(A, B, C), repeats)
        return times
    except Exception as error:  # noqa: BLE001 - a baseline must not abort the benchmark
        return {"cublasxt_error": f"{type(error).__name__}: {error}"}


def gpu_section(sizes, repeats: int, block_dims, bandwidth: dict, save) -> list[dict]:
    from accel.ooc.workers.cuda import CUDAWorker

    rows = []
    precisions = [("fp32", torch.float32, None), ("tf32", torch.float32, "tf32"), ("bf16", torch.bfloat16, None)]
    for n in tqdm(sizes, desc="GPU sizes"):
        for name, dtype, compute in precisions:
            A = torch.randn(n, n, dtype=dtype).pin_memory()
            B = torch.randn(n, n, dtype=dtype).pin_memory()
            flops = 2 * n ** 3
            row = dict(n=n, precision=name)
            # in-core baseline on device-resident data, same precision (TF32 switched as the engine does)
            try:
                with CUDAWorker.compute_mode(SimpleNamespace(allow_tf32=name == "tf32")):
                    dA, dB = A.cuda(), B.cuda()
                    row["in_core_s"] = best_of(lambda: (torch.matmul(dA, dB), torch.cuda.synchronize()),  # noqa: B023
                                               repeats)
            except torch.OutOfMemoryError:
                row["in_core_s"] = None
            finally:
                dA = dB = None  # free the device copies before the out-of-core runs
                torch.cuda.empty_cache()
            limit = problem_bytes(n, n, n, A.element_size()) // 4
            for label, devices in [("one", ["cuda:0"]), ("two_on_one_gpu", ["cuda:0", "cuda:0"]),
                                   ("gpu_cpu", ["cuda:0", "cpu"])]:
                if label == "gpu_cpu" and n > 8192:
                    continue  # one GPU-sized block takes the CPU worker longer than the GPU takes for all
                engine = Engine(devices, memory_limit=limit)
                try:
                    seconds = best_of(lambda: engine.gemm(A, B, compute_dtype=compute), repeats)  # noqa: B023
                except Exception as error:  # noqa: BLE001 - record it, go on with the other rows
                    row[f"accel_{label}_error"] = f"{type(error).__name__}: {error}"
                    continue
                stats = engine.stats
                row[f"accel_{label}_s"] = seconds
                row[f"accel_{label}_tflops"] = flops / seconds / 1e12
                row[f"traffic_ratio_{label}"] = stats.traffic_ratio
                row[f"traffic_ratio_hong_kung_{label}"] = stats.traffic_ratio_hong_kung
                row[f"blocks_{label}"] = stats.blocks_per_worker
                row[f"plan_{label}"] = stats.plan.grid
                if label == "one":  # the physics: at best the bound's bytes over the link, overlapped
                    row["transfer_bound_s"] = stats.lower_bound_bytes / bandwidth["to_device"]
                engine.clear_cache()
            if row.get("in_core_s") and row.get("accel_one_s"):
                row["ratio_vs_in_core"] = row["in_core_s"] / row["accel_one_s"]
                row["limit_ratio_vs_in_core"] = row["in_core_s"] / max(row["in_core_s"], row["transfer_bound_s"])
            if name == "fp32":
                row.update(cublasxt_times(A, B, repeats, block_dims))
                times = [v for key, v in row.items() if key.startswith("cublasxt_") and key.endswith("_s")]
                if times and row.get("accel_one_s"):
                    row["cublasxt_best_s"] = min(times)
                    row["speedup_vs_cublasxt"] = min(times) / row["accel_one_s"]
            rows.append(row)
            save(rows)
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
    parser.add_argument("--cpu-shapes", type=lambda text: tuple(int(v) for v in text.split("x")), nargs="+",
                        default=[(1024, 1024, 1024), (2048, 2048, 2048), (4096, 256, 2048), (256, 4096, 4096),
                                 (3000, 1000, 500)], help="m x n x k, e.g. 1024x1024x1024")
    args = parser.parse_args(argv)
    RESULTS.mkdir(parents=True, exist_ok=True)
    machine = dict(platform=platform.platform(), processor=platform.processor(), cpus=os.cpu_count(),
                   torch=torch.__version__, threads=torch.get_num_threads())

    if not args.skip_cpu:
        cpu_path = RESULTS / "gemm_cpu.json"
        result = dict(machine=machine, rows=[])

        def save_cpu(rows):
            result["rows"] = rows
            cpu_path.write_text(json.dumps(result, indent=2))

        rows = cpu_section(args.cpu_shapes, args.repeats, save_cpu)
        result["layer_reuse"] = layer_reuse_section(256, 2048, args.repeats)
        result["summary"] = dict(min_ratio=min(r["ratio"] for r in rows),
                                 min_ratio_limited=min(r["ratio_limited"] for r in rows),
                                 max_traffic_ratio_limited=max(r["traffic_ratio_limited"] for r in rows))
        save_cpu(rows)
        summary = result["summary"]
        print(f"CPU: accel.gemm / torch.matmul speed ratio, worst case {summary['min_ratio']:.3f} "
              f"(default memory), {summary['min_ratio_limited']:.3f} (memory limit 1/4 of the problem); goal >= 0.90; "
              f"traffic at 1/4 memory at most {summary['max_traffic_ratio_limited']:.2f}x the lower bound")
        plot(rows, RESULTS / "gemm_cpu.png", lambda r: f"{r['m']}x{r['n']}x{r['k']}",
             [("ratio", "accel.gemm, default memory"), ("ratio_limited", "accel.gemm, memory 1/4 of problem")],
             "CPU worker vs torch.matmul (1.0 = same speed)")

    if not torch.cuda.is_available():
        print("GPU section skipped: no CUDA device visible (torch.cuda.is_available() is False). "
              "Run this script on a GPU machine to compare with in-core torch.matmul and cuBLAS-XT.")
        return
    machine["gpu"] = torch.cuda.get_device_name(0)
    bandwidth = host_link_bandwidth()
    print(f"host link (pinned, 1 GiB): {bandwidth['to_device'] / 1e9:.1f} GB/s to the device, "
          f"{bandwidth['to_host'] / 1e9:.1f} GB/s back")
    gpu_path = RESULTS / "gemm_gpu.json"

    def save_gpu(rows):
        gpu_path.write_text(json.dumps(dict(machine=machine, host_link_bytes_per_second=bandwidth, rows=rows),
                                       indent=2, default=str))

    rows = gpu_section(args.gpu_sizes, args.repeats, args.block_dims, bandwidth, save_gpu)
    plot(rows, RESULTS / "gemm_gpu.png", lambda r: f"N={r['n']} {r['precision']}",
         [("ratio_vs_in_core", "vs in-core torch.matmul"), ("limit_ratio_vs_in_core", "transfer-bound limit"),
          ("speedup_vs_cublasxt", "vs cuBLAS-XT")],
         "GPU: accel.gemm on host data, memory limit 1/4 of the problem")


if __name__ == "__main__":
    main()
