"""Part b: the out-of-core GEMM on the GPU.

1. Pinned host<->device bandwidth, 1 GiB each way (the engine's bottleneck).
2. For N = 16384 and 32768 (square, random operands): in-core ``torch.matmul`` on device-resident data,
   then ``accel.gemm`` (through :class:`accel.ooc.Engine`, for its statistics) on pinned host data with the
   memory limited to a quarter of the problem, in fp32, TF32 and bf16, with one worker; then two workers
   sharing the GPU; then cuBLAS-XT (fp32, accel/gpucheck/cublasxt.py) on the same host data; last GPU + CPU
   workers (fp32, smallest N). Every result is checked against the exact fp32 product (on 1024 rows spread over every
   block row), and the traffic is reported as a multiple of the lower bound ``2mnk/sqrt(M)``.

Each measurement is written as soon as it is made; one whose estimated time exceeds what is left of the
budget is skipped with a note. On a dry run the same code runs on small CPU matrices with CPU workers, and
cuBLAS-XT is only imported.
"""
from __future__ import annotations

import math

import torch

from accel.gpucheck.record import float32_precision, median_seconds
from accel.gpucheck.table import seconds_text, speed_text
from accel.ooc import Engine

SIZES, DRY_SIZES = (16384, 32768), (256, 384)
PRECISIONS = (("fp32", torch.float32, torch.float32), ("tf32", torch.float32, "tf32"),
              ("bf16", torch.bfloat16, None))
# largest |C - C_exact| / largest |C_exact| accepted, C_exact the fp32 product of the same (fp32) data
TOLERANCE = {"fp32": 1e-4, "tf32": 1e-2, "bf16": 2e-2}
XT_BLOCK_DIMS = (4096, 8192)
CHECKED_ROWS = 1024
SETUPS = {"one": ["cuda:0"], "two_on_one_gpu": ["cuda:0", "cuda:0"], "gpu_cpu": ["cuda:0", "cpu"]}
LABELS = {"one": "1 worker", "two_on_one_gpu": "2 workers on 1 GPU", "gpu_cpu": "GPU + CPU workers"}


def _device_names(names, dry_run: bool) -> list[str]:
    return ["cpu" if dry_run else name for name in names]


def bandwidth(context) -> dict:
    """Pinned host -> device and device -> host copy rates (GB/s) of 1 GiB (16 MiB host copies on a dry run)."""
    size = (16 << 20) if context.dry_run else (1 << 30)
    host = torch.empty(size, dtype=torch.uint8, pin_memory=not context.dry_run).fill_(7)
    device = torch.empty(size, dtype=torch.uint8, device=context.device)
    to_device = median_seconds(lambda: device.copy_(host, non_blocking=True), 5, context.device)
    to_host = median_seconds(lambda: host.copy_(device, non_blocking=True), 5, context.device)
    result = {"bytes": size, "host_to_device_gb_s": size / to_device / 1e9, "device_to_host_gb_s": size / to_host / 1e9,
              "pinned": not context.dry_run}
    print(f"  pinned bandwidth: host->device {result['host_to_device_gb_s']:.1f} GB/s, "
          f"device->host {result['device_to_host_gb_s']:.1f} GB/s", flush=True)
    return result


class Operands:
    """One size's host operands (pinned on a GPU run), the exact fp32 product and in-core timings."""

    def __init__(self, n: int, context):
        self.n, self.device, self.dry_run = n, context.device, context.dry_run
        generator = torch.Generator(device=self.device).manual_seed(torch.seed() % 2 ** 63)
        a = torch.randn(n, n, device=self.device, generator=generator)
        b = torch.randn(n, n, device=self.device, generator=generator)
        self.host = {}
        for dtype in (torch.float32, torch.bfloat16):
            self.host[dtype] = tuple(self._to_host(x.to(dtype)) for x in (a, b))
        offset = int(torch.randint(0, max(n // CHECKED_ROWS, 1), ()))
        self.rows = torch.arange(offset, n, max(n // CHECKED_ROWS, 1))[:CHECKED_ROWS]
        with float32_precision(False):
            exact = a @ b
        self.exact_rows = exact[self.rows.to(self.device)]
        self.scale = exact.abs().max().item()
        self.in_core = {name: self._in_core_seconds(a.to(dtype), b.to(dtype), name) for name, dtype, _ in PRECISIONS}

    def _in_core_seconds(self, a: torch.Tensor, b: torch.Tensor, precision: str) -> float:
        """``torch.matmul`` on the device-resident operands."""
        with float32_precision(precision == "tf32"):
            return median_seconds(lambda: torch.matmul(a, b), 2 if self.n > 20000 else 3, self.device)

    def _to_host(self, x: torch.Tensor) -> torch.Tensor:
        if self.dry_run:
            return x
        host = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
        host.copy_(x)
        return host

    def error(self, result: torch.Tensor) -> float:
        """Largest error on the checked rows relative to the largest entry of the exact product."""
        rows = result[self.rows].to(self.device, torch.float32)
        return ((rows - self.exact_rows).abs().max().item()) / self.scale

    def memory_limit(self, dtype: torch.dtype) -> int:
        """A quarter of the problem's bytes (A, B and C)."""
        return 3 * self.n * self.n * torch.empty((), dtype=dtype).element_size() // 4


def _repeats(n: int, dry_run: bool) -> int:
    return 2 if dry_run or n > 20000 else 3


def _fits(context, seconds_each: float, runs: int, what: str) -> bool:
    if seconds_each * runs * 1.3 + 5 < context.left():
        return True
    context.record.note(f"skipped {what}: about {seconds_each * runs:.0f} s needed, {context.left():.0f} s left")
    return False


def _time_engine(context, operands: Operands, devices, limit: int, dtype, compute, repeats: int):
    """(median seconds, the last call's stats, its error, the workers' names) of ``accel.gemm`` on a new engine."""
    engine = Engine(_device_names(devices, context.dry_run), memory_limit=limit, persist_cache=False)
    A, B = operands.host[dtype]
    result = [None]  # only the latest product is kept (4 GiB each at N = 32768 fp32)

    def product():
        result[0] = None
        result[0] = engine.gemm(A, B, compute_dtype=compute)

    seconds = median_seconds(product, repeats, context.device)
    error = operands.error(result[0])
    engine.close()
    return seconds, engine.stats, error, engine.devices


def out_of_core(context, operands: Operands, precision: str, setup: str, bandwidths: dict,
                failures: list) -> dict | None:
    """Time ``accel.gemm`` on the host operands with the memory limited to a quarter of the problem."""
    name, dtype, compute = next(p for p in PRECISIONS if p[0] == precision)
    n, repeats = operands.n, _repeats(operands.n, context.dry_run)
    A, B = operands.host[dtype]
    limit = operands.memory_limit(dtype)
    lower_bound = 2 * n ** 3 / math.sqrt(limit / A.element_size()) * A.element_size()
    estimate = max(operands.in_core[precision], 3 * lower_bound / (bandwidths["host_to_device_gb_s"] * 1e9))
    if not _fits(context, estimate, repeats + 1, f"N={n} {precision} {setup}"):
        return None
    seconds, stats, error, devices = _time_engine(context, operands, SETUPS[setup], limit, dtype, compute, repeats)
    if context.device.type == "cuda":  # the engine's device buffers go before the next configuration's
        torch.cuda.empty_cache()
    row = context.record.row(
        kind="accel.gemm", n=n, precision=precision, setup=setup, devices=devices, memory_limit=limit,
        seconds=seconds, tflops=2 * n ** 3 / seconds / 1e12, in_core_seconds=operands.in_core[precision],
        ratio_vs_in_core=operands.in_core[precision] / seconds, bytes_moved=stats.bytes_to_device + stats.bytes_to_host,
        # over 2mnk/sqrt(M); engines that also bound by the compulsory traffic report both
        traffic_ratio=getattr(stats, "traffic_ratio_hong_kung", stats.traffic_ratio),
        engine_traffic_ratio=stats.traffic_ratio, lower_bound_bytes=stats.lower_bound_bytes,
        plan=list(stats.plan.grid), blocks_per_worker=stats.blocks_per_worker,
        peak_bytes_per_worker=stats.peak_bytes_per_worker, retries=stats.retries, relative_error=error,
        tolerance=TOLERANCE[precision], correct=error <= TOLERANCE[precision])
    print(f"  N={n} {precision} {setup}: {seconds:.3f} s ({row['tflops']:.1f} TFLOP/s), in-core "
          f"{operands.in_core[precision]:.3f} s, ratio {row['ratio_vs_in_core']:.3f}, traffic "
          f"{row['traffic_ratio']:.2f}x 2mnk/sqrt(M), error {error:.1e}", flush=True)
    if not row["correct"]:
        failures.append(f"accel.gemm N={n} {precision} {setup}: relative error {error:.1e} "
                        f"> {TOLERANCE[precision]:.0e}")
    return row


def load_cublasxt():
    """The cuBLAS-XT wrapper module (:mod:`accel.gpucheck.cublasxt`)."""
    from accel.gpucheck import cublasxt
    return cublasxt


def cublasxt(context, operands: Operands, module, failures: list) -> dict | None:
    """cuBLAS-XT, fp32, on the same pinned host operands, each block size of XT_BLOCK_DIMS."""
    n, repeats = operands.n, _repeats(operands.n, context.dry_run)
    A, B = operands.host[torch.float32]
    C = torch.empty(n, n, pin_memory=True)
    best = None
    for block_dim in XT_BLOCK_DIMS:
        if not _fits(context, operands.in_core["fp32"] * 2, repeats + 1, f"cuBLAS-XT N={n} block {block_dim}"):
            break
        C.fill_(float("nan"))
        with module.CublasXt([0], block_dim) as xt:
            seconds = median_seconds(lambda: xt.gemm(A, B, C), repeats, context.device)
            library = getattr(xt.lib, "_name", None)
        error = operands.error(C)
        row = context.record.row(kind="cublasxt", n=n, precision="fp32", block_dim=block_dim, seconds=seconds,
                                 tflops=2 * n ** 3 / seconds / 1e12, library=library, relative_error=error,
                                 correct=error <= TOLERANCE["fp32"])
        print(f"  N={n} cuBLAS-XT block {block_dim}: {seconds:.3f} s, error {error:.1e}", flush=True)
        if not row["correct"]:
            failures.append(f"cuBLAS-XT N={n} block {block_dim}: relative error {error:.1e}")
        if best is None or seconds < best["seconds"]:
            best = row
    return best


def run(context) -> None:
    failures: list[str] = []
    bandwidths = bandwidth(context)
    context.record.set("bandwidth", bandwidths)
    module = None
    try:
        module = load_cublasxt()
    except Exception as error:  # noqa: BLE001 - the engine's figures matter more than the baseline's
        failures.append(f"cuBLAS-XT wrapper did not load: {type(error).__name__}: {error}")
    if context.dry_run:
        context.record.note("dry run: cuBLAS-XT imported, not run (no GPU)")
    sizes = DRY_SIZES if context.dry_run else SIZES
    problems = {}
    for n in sizes:  # the headline first: one worker against in-core, every size and precision
        if context.left() < (5 if context.dry_run else 30):
            context.record.note(f"skipped N={n} and larger: {context.left():.0f} s left")
            break
        operands = problems[n] = Operands(n, context)
        context.record.set(f"in_core_seconds_{n}", operands.in_core)
        for precision, *_ in PRECISIONS:
            out_of_core(context, operands, precision, "one", bandwidths, failures)
    for operands in problems.values():
        for precision, *_ in PRECISIONS:
            out_of_core(context, operands, precision, "two_on_one_gpu", bandwidths, failures)
    for n, operands in problems.items():  # a crash inside cuBLAS-XT (ctypes) ends this process: rows above are kept
        if module is None or context.dry_run:
            break
        try:
            best = cublasxt(context, operands, module, failures)
        except Exception as error:  # noqa: BLE001 - reported with the others
            failures.append(f"cuBLAS-XT N={n}: {type(error).__name__}: {error}")
            best = None
        if best is not None:
            context.record.set(f"cublasxt_best_{n}", best)
    if problems:  # last: how many blocks a CPU worker takes is the scheduler's call, and so is the time
        out_of_core(context, problems[min(problems)], "fp32", "gpu_cpu", bandwidths, failures)
    if failures:
        raise RuntimeError("; ".join(failures))


def table_rows(record: dict):
    rows = []
    bandwidths = record["results"].get("bandwidth")
    if bandwidths:
        rows.append((f"{'pinned ' if bandwidths['pinned'] else ''}copy of {bandwidths['bytes'] >> 20} MiB, "
                     "host->device / device->host",
                     f"{bandwidths['host_to_device_gb_s']:.1f} / {bandwidths['device_to_host_gb_s']:.1f} GB/s", "", ""))
    accel = {(row["n"], row["precision"], row["setup"]): row for row in record["rows"] if row["kind"] == "accel.gemm"}
    for row in record["rows"]:
        if row["kind"] == "accel.gemm":
            rows.append((f"accel.gemm N={row['n']} {row['precision']}, host data, memory 1/4 of problem, "
                         f"{LABELS[row['setup']]}",
                         f"{seconds_text(row['seconds'])}, {row['tflops']:.3g} TFLOP/s, traffic "
                         f"{row['traffic_ratio']:.2f}x 2mnk/sqrt(M){'' if row['correct'] else ', WRONG RESULT'}",
                         f"in-core torch.matmul {seconds_text(row['in_core_seconds'])}",
                         f"{row['ratio_vs_in_core']:.2f} of in-core speed"))
    for key, best in sorted(record["results"].items()):
        if key.startswith("cublasxt_best_") and best:
            ours = accel.get((best["n"], "fp32", "one"))
            rows.append((f"accel.gemm vs cuBLAS-XT N={best['n']} fp32 (XT block {best['block_dim']}), 1 GPU",
                         seconds_text(ours["seconds"]) if ours else "not measured",
                         f"cuBLAS-XT {seconds_text(best['seconds'])}",
                         speed_text(best["seconds"] / ours["seconds"]) if ours else ""))
    return rows
