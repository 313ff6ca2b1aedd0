"""The same checks on CUDA workers: the BLAS grid on cuda:0 and on two workers sharing cuda:0, TF32/bf16
compute dtypes, pinned and strided host operands, the memory limit measured by the CUDA allocator.

Without a GPU those are skipped; the CUDA worker's own logic (staging rings, write-back on its host thread,
the cudaMemcpy2DAsync layouts, the multiply-accumulate calls, C loading, failure cleanup) still runs here
on an emulated device that checks what the CUDA runtime and torch's CUDA kernels check (see
``emulated_cuda.py``): pitches, ``out_dtype`` rules, events waited on before a staging buffer is reused,
and device memory including the cuBLAS workspace against the limit.
"""
import contextlib
import threading
import types

import gemm_helpers
import numpy as np
import pytest
import torch
from emulated_cuda import Checks, DeviceMemory, Runtime, byte_extent, install
from gemm_helpers import SHAPES, assert_close, operand, reference

import accel
import accel.ooc.workers._cuda_runtime as cuda_runtime
import accel.ooc.workers.cuda as cuda_module
from accel.ooc import Engine
from accel.ooc.workers.cuda import CUDAWorker, cublas_workspace_bytes

seeded_global_rng = gemm_helpers.seeded_global_rng  # autouse fixture: torch's global generator seeded per test

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
WORKSPACE = 4096 + 2048  # the emulated cuBLAS + cuBLASLt workspace (CUBLAS_WORKSPACE_CONFIG=:4:1, 2 KiB)


# -- the CUDA worker's logic on an emulated device (always runs) ---------------------------------------------
@pytest.fixture
def runtime(monkeypatch):
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4:1")
    monkeypatch.setenv("CUBLASLT_WORKSPACE_SIZE", "2")
    monkeypatch.delenv("TORCH_CUBLASLT_UNIFIED_WORKSPACE", raising=False)
    emulated = Runtime()
    install(monkeypatch, emulated)
    return emulated


class EmulatedCUDAWorker(CUDAWorker):
    """A CUDAWorker whose "device" is the host, watched by ``emulated_cuda.Checks`` on every thread it uses;
    host operands listed in ``pinned`` count as pinned and go through the emulated cudaMemcpy2DAsync."""

    def __init__(self, runtime, memory_limit, pinned=()):
        self.runtime, self.memory = runtime, DeviceMemory()
        super().__init__("cpu", memory_limit)
        self.pinned = {t.untyped_storage().data_ptr() for t in pinned}
        for tensor in pinned:
            runtime.pin(tensor)
        self._cupy = types.SimpleNamespace(cuda=types.SimpleNamespace(runtime=runtime))
        self.direct_copies = 0
        self.unstaged_on: set[str] = set()

    def is_pinned(self, view):
        return view.untyped_storage().data_ptr() in self.pinned

    def allocate(self, shape, dtype):
        return self.memory.track(super().allocate(shape, dtype), self.runtime)

    def _memcpy_2d(self, view, target, stream):
        self.direct_copies += 1
        super()._memcpy_2d(view, target, stream)

    def _watched(self, method, *arguments):
        with Checks(self.runtime, self.memory):
            return method(*arguments)

    def begin(self, problem):
        self.runtime.host_only = [byte_extent(problem.out)] + ([byte_extent(problem.c)] if problem.c is not None else [])
        self._watched(super().begin, problem)

    def run_block(self, problem, block):
        self._watched(super().run_block, problem, block)

    def flush(self, problem):
        self._watched(super().flush, problem)

    def end(self, problem):
        self._watched(super().end, problem)

    def _pack(self, *arguments):
        self._watched(super()._pack, *arguments)

    def _unstage(self, *arguments):
        self.unstaged_on.add(threading.current_thread().name)
        self._watched(super()._unstage, *arguments)


def _check_run(engine, workers, shares, A, B, C, alpha, beta, trans_a, trans_b, dtype, **kwargs):
    result = engine.gemm(A, B, C, alpha=alpha, beta=beta, trans_a=trans_a, trans_b=trans_b, **kwargs)
    assert_close(result, *reference(A, B, C, alpha, beta, trans_a, trans_b, kwargs.get("compute_dtype")), dtype)
    for worker, share in zip(workers, shares):
        assert worker.memory.peak <= share, (worker.memory.peak, share)  # cuBLAS workspace included
        assert worker.account.peak <= share - WORKSPACE
    return result


@pytest.mark.parametrize("trans_a", [False, True])
@pytest.mark.parametrize("trans_b", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_cuda_worker_logic_on_emulated_device(runtime, trans_a, trans_b, dtype, seed):
    generator = torch.Generator().manual_seed(seed)
    A, B = operand(61, 47, trans_a, dtype, generator), operand(47, 53, trans_b, dtype, generator)
    C = torch.randn(61, 53, generator=generator).to(dtype)
    limit = WORKSPACE + (20_000 if dtype == torch.float64 else 6_000)  # small: many blocks and slabs
    workers = [EmulatedCUDAWorker(runtime, limit, pinned=[A]), EmulatedCUDAWorker(runtime, limit)]
    engine = Engine(workers)
    for alpha, beta, c in [(1.0, 0.0, None), (-0.5, 2.0, C)]:
        _check_run(engine, workers, [limit, limit], A, B, c, alpha, beta, trans_a, trans_b, dtype)
        assert engine.stats.plan.grid[0] * engine.stats.plan.grid[1] >= 6 and engine.stats.plan.grid[2] >= 2
    assert workers[0].direct_copies > 0  # A's tiles skipped the packing copy (row or column layout)
    assert workers[1].direct_copies == 0 or workers[1].blocks_done == 0
    # results reached the host matrix on each worker's host thread, never on its engine thread
    assert all(name.startswith("accel-cuda-host") for w in workers for name in w.unstaged_on)


@pytest.mark.parametrize("compute_dtype", [torch.float32, "tf32", torch.bfloat16, torch.float16])
def test_narrow_operands_into_a_float64_accumulator_on_emulated_device(runtime, compute_dtype, seed):
    """fp64 operands multiplied in a narrower dtype: CUDA has no mm(out_dtype=float64) for them."""
    generator = torch.Generator().manual_seed(seed)
    A, B = torch.randn(40, 70, generator=generator, dtype=torch.float64), torch.randn(70, 30, generator=generator,
                                                                                     dtype=torch.float64)
    C = torch.randn(40, 30, generator=generator, dtype=torch.float64)
    limit = WORKSPACE + 12_000
    workers = [EmulatedCUDAWorker(runtime, limit)]
    engine = Engine(workers)
    rounding = torch.float32 if compute_dtype == "tf32" else compute_dtype
    for c, beta in [(None, 0.0), (C, -1.5)]:
        result = engine.gemm(A, B, c, beta=beta, compute_dtype=compute_dtype)
        assert result.dtype == torch.float64 and engine.stats.plan.grid[2] >= 2
        exact = reference(A, B, c, 1.0, beta, False, False, rounding=rounding)
        # each slab's product is rounded once to float32, then summed in float64
        assert_close(result, *exact, torch.float32)
        assert workers[0].memory.peak <= limit


@pytest.mark.parametrize("wider_self", [True, False], ids=["torch-with-167931", "older-torch"])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
def test_half_operands_accumulate_in_float32_under_either_addmm_rule(monkeypatch, runtime, wider_self, out_dtype,
                                                                     seed):
    """addmm(fp32 acc, bf16, bf16, out_dtype=fp32) is refused by torch before pytorch#167931."""
    runtime.wider_self = wider_self
    generator = torch.Generator().manual_seed(seed)
    A, B = torch.randn(48, 300, generator=generator), torch.randn(300, 40, generator=generator)
    C = torch.randn(48, 40, generator=generator).to(out_dtype)
    limit = WORKSPACE + 20_000
    workers = [EmulatedCUDAWorker(runtime, limit)]
    engine = Engine(workers)
    result = engine.gemm(A.bfloat16(), B.bfloat16(), C, beta=0.5, compute_dtype=torch.bfloat16)
    assert engine.stats.plan.grid[2] >= 2 and result.dtype == out_dtype
    assert workers[0]._fast_accumulate == wider_self  # one addmm per slab where torch takes it
    exact = reference(A.bfloat16(), B.bfloat16(), C, 1.0, 0.5, False, False)
    assert_close(result, *exact, torch.bfloat16)
    assert workers[0].memory.peak <= limit


def test_memory_limit_counts_the_cublas_workspace_on_emulated_device(runtime, seed):
    """Two workers share one device: each holds its own workspace inside its half."""
    generator = torch.Generator().manual_seed(seed)
    A, B = torch.randn(90, 70, generator=generator), torch.randn(70, 80, generator=generator)
    C = torch.randn(90, 80, generator=generator)
    share = WORKSPACE + 9_000
    workers = [EmulatedCUDAWorker(runtime, None), EmulatedCUDAWorker(runtime, None)]
    for worker in workers:
        worker.name = "cuda:0"  # the engine then splits one device's memory_limit between them
    engine = Engine(workers, memory_limit=2 * share)
    _check_run(engine, workers, [share, share], A, B, C, 1.0, 0.5, False, False, torch.float32)
    assert all(worker.account.limit == share - WORKSPACE for worker in workers)
    assert len(runtime.workspaces) == 2  # one per worker: its own thread and compute stream
    with pytest.raises(ValueError, match="cuBLAS workspace"):
        Engine([EmulatedCUDAWorker(runtime, WORKSPACE)])


@pytest.mark.parametrize("which", ["A", "B"])
def test_one_row_pinned_tile_passes_a_valid_pitch_on_emulated_device(runtime, which, seed):
    """op(A) = A.T of a (k, 1) A: a one-row tile whose row stride (1) is below its width."""
    generator = torch.Generator().manual_seed(seed)
    if which == "A":
        A, B, trans_a, trans_b = torch.randn(70, 1, generator=generator), torch.randn(70, 30, generator=generator), \
            True, False
    else:  # k == 1: op(B) = B.T of an (n, 1) B
        A, B, trans_a, trans_b = torch.randn(30, 1, generator=generator), torch.randn(50, 1, generator=generator), \
            False, True
    pinned = A if which == "A" else B
    worker = EmulatedCUDAWorker(runtime, WORKSPACE + 4_000, pinned=[pinned])
    result = Engine([worker]).gemm(A, B, trans_a=trans_a, trans_b=trans_b)
    assert_close(result, *reference(A, B, None, 1.0, 0.0, trans_a, trans_b), torch.float32)
    assert worker.direct_copies > 0


def test_staging_is_pinned_lazily_and_sized_to_the_plan(runtime, seed):
    """Direct copies and beta == 0 pin nothing for operands or C."""
    generator = torch.Generator().manual_seed(seed)
    A, B = torch.randn(64, 90, generator=generator), torch.randn(90, 50, generator=generator)
    worker = EmulatedCUDAWorker(runtime, WORKSPACE + 16_000, pinned=[A, B])
    engine = Engine([worker])
    engine.gemm(A, B)
    plan = engine.stats.plan
    block = plan.block_rows * plan.block_cols * 4
    assert worker._operand_ring.nbytes == 0 and worker._c_ring.nbytes == 0
    assert worker._out_ring.nbytes == min(2, plan.grid[0] * plan.grid[1]) * block
    C = torch.randn(64, 50, generator=generator)
    engine.gemm(A.t().contiguous().t().clone(), B, C, beta=1.0)  # unpinned A, and C: those rings fill
    operand_tile = max(plan.block_rows, plan.block_cols) * plan.slab * 4
    assert 0 < worker._operand_ring.nbytes <= 4 * operand_tile and 0 < worker._c_ring.nbytes <= 2 * block
    single = EmulatedCUDAWorker(runtime, WORKSPACE + 40_000)
    engine = Engine([single])
    for _ in range(2):  # one block per call: one output slot, however many calls
        engine.gemm(torch.randn(20, 30), torch.randn(30, 20), block=20)
        assert engine.stats.plan.grid[:2] == (1, 1)
    assert single._out_ring.nbytes == 20 * 20 * 4


def test_cuda_worker_failure_cleanup_on_emulated_device(runtime, seed):
    class Failing(EmulatedCUDAWorker):
        def write_block(self, problem, block, acc):
            if self.blocks_done == 1:
                raise torch.OutOfMemoryError("CUDA out of memory (emulated)")
            super().write_block(problem, block, acc)

    A, B, C = torch.randn(80, 40), torch.randn(40, 80), torch.randn(80, 80)
    worker = Failing(runtime, WORKSPACE + 30_000)
    engine = Engine([worker])
    with pytest.raises(RuntimeError, match="memory_limit"):
        engine.gemm(A, B, C, beta=1.0)  # fails on the first try and on the retry
    assert worker.account.held == 0 and worker._pending == [] and len(worker.cache) == 0


def test_a_failed_write_back_does_not_fail_the_next_call_on_emulated_device(runtime, seed):
    class FailingOnce(EmulatedCUDAWorker):
        fail = True

        def _unstage(self, slot, destination):
            if self.fail:
                raise OSError("emulated host copy failure")
            super()._unstage(slot, destination)

    generator = torch.Generator().manual_seed(seed)
    A, B = torch.randn(80, 40, generator=generator), torch.randn(40, 80, generator=generator)
    worker = FailingOnce(runtime, WORKSPACE + 30_000)
    engine = Engine([worker])
    with pytest.raises(OSError, match="emulated host copy failure"):
        engine.gemm(A, B)
    worker.fail = False
    assert_close(engine.gemm(A, B), *reference(A, B, None, 1.0, 0.0, False, False), torch.float32)


# -- the cuBLAS-XT baseline finds CUDA 13's library ---------------------------------------------------------------
def test_cublasxt_looks_for_the_cuda_13_wheel_first(tmp_path):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "experiments" / "baselines" / "cublasxt.py"
    spec = importlib.util.spec_from_file_location("cublasxt_baseline", path)
    cublasxt = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cublasxt)
    for relative in ("nvidia/cu13/lib/libcublas.so.13", "nvidia/cublas/lib/libcublas.so.12"):
        (tmp_path / relative).parent.mkdir(parents=True)
        (tmp_path / relative).write_bytes(b"not a library")
    cu13, cu12 = str(tmp_path / "nvidia/cu13/lib/libcublas.so.13"), str(tmp_path / "nvidia/cublas/lib/libcublas.so.12")
    found = cublasxt.library_candidates("13", [str(tmp_path)], [])
    assert found[:2] == [cu13, cu12] and "libcublas.so.13" in found
    assert cublasxt.library_candidates("12", [str(tmp_path)], [])[0] == cu12
    assert str(tmp_path / "nvidia/cu11/lib/libcublas.so.11") not in found  # absent files are not tried


# -- the emulator itself catches what it claims to ---------------------------------------------------------------
def test_emulator_catches_a_staging_buffer_reused_before_its_event(monkeypatch, runtime, seed):
    monkeypatch.setattr(cuda_runtime.StagingSlot, "wait_device", lambda self: None)
    A, B = torch.randn(64, 90), torch.randn(90, 50)
    with pytest.raises(AssertionError, match="was not waited for"):
        Engine([EmulatedCUDAWorker(runtime, WORKSPACE + 16_000)]).gemm(A, B)


def test_emulator_orders_streams_only_through_events(runtime):
    copy, compute = torch.cuda.Stream(), torch.cuda.Stream()
    tile, acc = torch.randn(8, 8), torch.zeros(8, 8)
    checks = Checks(runtime, DeviceMemory())
    with checks, torch.cuda.stream(copy):
        tile.mul_(2.0)  # "uploads" the tile
    with pytest.raises(AssertionError, match="without waiting for an event"):
        with checks, torch.cuda.stream(compute):
            acc.add_(tile)
    ready = torch.cuda.Event()
    ready.record(copy)
    compute.wait_event(ready)
    with checks, torch.cuda.stream(compute):
        acc.add_(tile)  # ordered now
    with pytest.raises(AssertionError, match="was not waited for"):
        with checks:
            tile.zero_()  # the host may not reuse it before it waited for the multiply
    done = torch.cuda.Event()
    done.record(compute)
    done.synchronize()
    with checks:
        tile.zero_()


def test_emulator_checks_pitches_and_out_dtype_rules(runtime):
    source, target = torch.randn(4, 8), torch.empty(4, 8)
    with pytest.raises(RuntimeError, match="InvalidPitch"):
        runtime.memcpy2DAsync(target.data_ptr(), 32, source.data_ptr(), 4, 32, 1, 1, runtime.default_stream.cuda_stream)
    checks = Checks(runtime, DeviceMemory())
    for operands in (torch.float64, torch.float32, torch.bfloat16, torch.float16):
        a, b = torch.randn(3, 5).to(operands), torch.randn(5, 2).to(operands)
        for out_dtype in (torch.float64, torch.float32, torch.bfloat16, torch.float16):
            try:  # torch's meta kernel applies CUDA's rule: the emulator must agree with it
                torch.mm(a.to("meta"), b.to("meta"), out_dtype=out_dtype)
                allowed = True
            except RuntimeError:
                allowed = False
            with checks:
                if allowed:
                    assert torch.mm(a, b, out_dtype=out_dtype).dtype == out_dtype
                else:
                    with pytest.raises(RuntimeError, match="out_dtype must be"):
                        torch.mm(a, b, out_dtype=out_dtype)


# -- on a real GPU ------------------------------------------------------------------------------------------

DEVICE_SETS = [["cuda:0"], ["cuda:0", "cuda:0"]]


def gpu_limit(workers_on_gpu: int, engine_bytes: int) -> int:
    """A device memory_limit giving each of its workers ``engine_bytes`` beside its cuBLAS workspace."""
    return workers_on_gpu * (cublas_workspace_bytes(torch.cuda.get_device_capability()) + engine_bytes)


@needs_gpu
@pytest.mark.parametrize("devices", DEVICE_SETS, ids=["one-worker", "two-workers"])
@pytest.mark.parametrize("trans_a", [False, True])
@pytest.mark.parametrize("trans_b", [False, True])
@pytest.mark.parametrize("m,n,k", SHAPES)
def test_blas_grid_float64_cuda(m, n, k, trans_a, trans_b, devices, seed):
    generator = torch.Generator().manual_seed(seed)
    A, B = operand(m, k, trans_a, torch.float64, generator), operand(k, n, trans_b, torch.float64, generator)
    C = torch.randn(m, n, generator=generator, dtype=torch.float64)
    engine = Engine(devices, memory_limit=gpu_limit(len(devices), 13_000))
    for alpha, beta, c in [(1.0, 0.0, None), (-0.5, 2.0, C), (0.0, -1.0, C), (2.0, 1.0, None)]:
        result = engine.gemm(A, B, c, alpha=alpha, beta=beta, trans_a=trans_a, trans_b=trans_b)
        assert_close(result, *reference(A, B, c, alpha, beta, trans_a, trans_b), torch.float64)


@needs_gpu
@pytest.mark.parametrize("devices", DEVICE_SETS + [["cuda:0", "cpu"]], ids=["one", "two", "gpu+cpu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_each_dtype_cuda(dtype, devices, seed):
    generator = torch.Generator().manual_seed(seed)
    A, B = operand(300, 257, False, dtype, generator), operand(257, 190, True, dtype, generator)
    C = torch.randn(300, 190, generator=generator).to(dtype)
    limit = gpu_limit(devices.count("cuda:0"), 1 << 20)
    result = accel.gemm(A, B, C, alpha=0.75, beta=-1.25, trans_b=True, devices=devices, memory_limit=limit)
    assert result.dtype == dtype and result.device.type == "cpu"
    assert_close(result, *reference(A, B, C, 0.75, -1.25, False, True), dtype)


@needs_gpu
def test_float32_is_exact_by_default_and_tf32_on_request(seed):
    generator = torch.Generator().manual_seed(seed)
    A, B = operand(256, 1024, False, torch.float32, generator), operand(1024, 256, False, torch.float32, generator)
    exact = reference(A, B, None, 1.0, 0.0, False, False)
    matmul = torch.backends.cuda.matmul  # torch >= 2.9: reading the legacy allow_tf32 beside the new API raises
    switch = "fp32_precision" if hasattr(matmul, "fp32_precision") else "allow_tf32"
    before = getattr(matmul, switch)
    assert_close(accel.gemm(A, B, devices=["cuda:0"]), *exact, torch.float32)
    tf32 = accel.gemm(A, B, devices=["cuda:0"], compute_dtype="tf32")
    error = np.abs(tf32.double().numpy() - exact[0]).max()
    assert error < 1e-2 * exact[1].max()  # TF32: 10-bit mantissa
    assert getattr(matmul, switch) == before  # the global switch is restored


@needs_gpu
@pytest.mark.parametrize("compute_dtype", [torch.bfloat16, torch.float16])
def test_half_compute_dtype_accumulates_in_float32_cuda(compute_dtype, seed):
    generator = torch.Generator().manual_seed(seed)
    A, B = operand(128, 4096, False, torch.float32, generator), operand(4096, 96, False, torch.float32, generator)
    engine = Engine(["cuda:0"], memory_limit=gpu_limit(1, 1 << 21))  # several slabs: the cross-slab sum is fp32
    result = engine.gemm(A, B, compute_dtype=compute_dtype)
    assert engine.stats.plan.grid[2] > 1
    # each slab's product is rounded at most once to fp32 (or to the half dtype without mm(out_dtype=))
    exact = reference(A, B, None, 1.0, 0.0, False, False, rounding=compute_dtype)
    assert_close(result, *exact, torch.bfloat16 if compute_dtype == torch.bfloat16 else torch.float16)


@needs_gpu
@pytest.mark.parametrize("transposed", [False, True])
def test_pinned_strided_operands(transposed, seed):
    generator = torch.Generator().manual_seed(seed)
    A = torch.randn(500, 700, generator=generator).pin_memory()[::2, 50:650]  # 250 x 600, row pitch 700
    B = torch.randn(600, 333, generator=generator).pin_memory()
    if transposed:  # column-major tiles: the transposed copy path
        A = A.t().contiguous().pin_memory().t()
    result = accel.gemm(A, B, devices=["cuda:0"], memory_limit=gpu_limit(1, 1 << 20))
    assert_close(result, *reference(A, B, None, 1.0, 0.0, False, False), torch.float32)


@needs_gpu
def test_one_row_pinned_tile_cuda(seed):
    """A pinned (k, 1) A with trans_a: one-row tiles whose row stride is below their width."""
    generator = torch.Generator().manual_seed(seed)
    A, B = torch.randn(700, 1, generator=generator).pin_memory(), torch.randn(700, 300, generator=generator)
    result = accel.gemm(A, B, trans_a=True, devices=["cuda:0"], memory_limit=gpu_limit(1, 1 << 16))
    assert_close(result, *reference(A, B, None, 1.0, 0.0, True, False), torch.float32)


@needs_gpu
@pytest.mark.parametrize("compute_dtype", [torch.float32, "tf32", torch.bfloat16, torch.float16])
def test_narrow_compute_dtype_into_float64_cuda(compute_dtype, seed):
    """fp64 operands and result with narrower products: no mm(out_dtype=float64) on CUDA."""
    generator = torch.Generator().manual_seed(seed)
    A, B = operand(300, 2000, False, torch.float64, generator), operand(2000, 200, False, torch.float64, generator)
    C = torch.randn(300, 200, generator=generator, dtype=torch.float64)
    engine = Engine(["cuda:0"], memory_limit=gpu_limit(1, 1 << 21))
    result = engine.gemm(A, B, C, beta=-1.0, compute_dtype=compute_dtype)
    assert engine.stats.plan.grid[2] > 1 and result.dtype == torch.float64
    rounding = torch.float32 if compute_dtype == "tf32" else compute_dtype
    # TF32 rounds the fp32 operands again on the tensor cores (10-bit mantissa)
    tolerance = torch.bfloat16 if compute_dtype == "tf32" else torch.float32
    assert_close(result, *reference(A, B, C, 1.0, -1.0, False, False, rounding=rounding), tolerance)


@needs_gpu
def test_emulator_agrees_with_cuda():
    """What the emulator (emulated_cuda.py) assumes of this machine's CUDA torch, checked on it."""
    device = torch.device("cuda:0")
    wider_self = cuda_module.addmm_accumulates_into_float32(device, torch.bfloat16)
    print(f"torch {torch.__version__}: addmm(out_dtype=float32) takes a float32 self: {wider_self}")
    checks = Checks(Runtime(wider_self=wider_self), DeviceMemory())
    for operands in (torch.float64, torch.float32, torch.bfloat16, torch.float16):
        a, b = torch.randn(3, 5).to(operands), torch.randn(5, 2).to(operands)
        for out_dtype in (torch.float64, torch.float32, torch.bfloat16, torch.float16):
            outcomes = []
            for x, y, context in ((a.cuda(), b.cuda(), contextlib.nullcontext()), (a, b, checks)):
                with context:
                    try:
                        torch.mm(x, y, out_dtype=out_dtype)
                        outcomes.append(True)
                    except RuntimeError:
                        outcomes.append(False)
            assert outcomes[0] == outcomes[1], (operands, out_dtype, outcomes)
    # the cuBLAS workspace a new stream gets: at most what each worker reserves
    x = torch.randn(256, 256, device=device)
    out = torch.empty(256, 256, device=device)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated(device)
    stream = torch.cuda.Stream(device)
    with torch.cuda.stream(stream):
        torch.mm(x, x, out=out)
        torch.mm(x.bfloat16(), x.bfloat16(), out_dtype=torch.float32, out=out)
    torch.cuda.synchronize()
    grown = torch.cuda.memory_allocated(device) - before
    print(f"cuBLAS workspace of a new stream: {grown} bytes; reserved per worker: "
          f"{cublas_workspace_bytes(torch.cuda.get_device_capability(device))}")
    assert 0 < grown <= cublas_workspace_bytes(torch.cuda.get_device_capability(device))


@needs_gpu
@pytest.mark.parametrize("engine_bytes", [1 << 20, 4 << 20])
def test_memory_limit_measured_by_the_allocator(engine_bytes, seed):
    """The limit covers each worker's cuBLAS workspace (allocated on its first multiply)."""
    generator = torch.Generator().manual_seed(seed)
    A, B = torch.randn(1000, 800, generator=generator), torch.randn(800, 900, generator=generator)
    C = torch.randn(1000, 900, generator=generator)
    limit = gpu_limit(2, engine_bytes)
    engine = Engine(["cuda:0", "cuda:0"], memory_limit=limit)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    baseline = torch.cuda.memory_allocated()
    result = engine.gemm(A, B, C, beta=0.5)
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - baseline <= limit
    assert sum(engine.stats.peak_bytes_per_worker.values()) <= limit
    torch.testing.assert_close(result, A @ B + 0.5 * C, rtol=1e-4, atol=1e-3)


@needs_gpu
def test_cache_persists_across_calls_cuda(seed):
    generator = torch.Generator().manual_seed(seed)
    A, B = torch.randn(600, 500, generator=generator), torch.randn(500, 400, generator=generator)
    engine = Engine(["cuda:0"], memory_limit=64 << 20)
    engine.gemm(A, B, block=200)
    first = engine.stats.bytes_to_device
    engine.gemm(A, B, block=200)
    assert engine.stats.bytes_to_device < first
    A.mul_(2)
    torch.testing.assert_close(engine.gemm(A, B, block=200), A @ B, rtol=1e-4, atol=1e-3)


@needs_gpu
def test_device_tensor_is_refused():
    with pytest.raises(ValueError, match="host matrices"):
        accel.gemm(torch.randn(3, 4, device="cuda"), torch.randn(4, 2))
