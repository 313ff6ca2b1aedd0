"""The same checks on CUDA workers: the BLAS grid on cuda:0 and on two workers sharing cuda:0, TF32/bf16
compute dtypes, pinned and strided host operands, the memory limit measured by the CUDA allocator.

Without a GPU those are skipped; the CUDA worker's own logic (staging rings, deferred write-back, the
cudaMemcpy2DAsync layouts, C loading, failure cleanup) still runs here on an emulated device: streams and
events become synchronous no-ops and "device" memory is host memory (see ``emulated_cuda``).
"""
import contextlib
import ctypes
import types

import numpy as np
import pytest
import torch

import accel
import accel.ooc.cuda as cuda_module
from accel.ooc import Engine
from accel.ooc.cuda import CUDAWorker
from test_gemm import SHAPES, assert_close, operand, reference

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


# -- the CUDA worker's logic on an emulated device (always runs) ---------------------------------------------
class _FakeStream:
    cuda_stream = 0

    def __init__(self, *args, **kwargs):
        pass

    def wait_event(self, event):
        pass

    def synchronize(self):
        pass


class _FakeEvent:
    def record(self, stream=None):
        pass

    def synchronize(self):
        pass


def _fake_memcpy_2d(dst, dpitch, src, spitch, width, height, kind, stream):
    """cudaMemcpy2DAsync semantics on host memory: ``height`` rows of ``width`` bytes."""
    for row in range(height):
        ctypes.memmove(dst + row * dpitch, src + row * spitch, width)


@pytest.fixture
def emulated_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "Stream", _FakeStream)
    monkeypatch.setattr(torch.cuda, "Event", _FakeEvent)
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(torch.Tensor, "record_stream", lambda self, stream: None)
    monkeypatch.setattr(cuda_module, "pinned_bytes", lambda nbytes: torch.empty(nbytes, dtype=torch.uint8))
    monkeypatch.setattr(cuda_module, "_HAS_OUT_DTYPE", False)  # mm(out_dtype=) exists for CUDA only


class EmulatedCUDAWorker(CUDAWorker):
    """A CUDAWorker whose "device" is the host; host operands listed in ``pinned`` count as pinned and go
    through the (emulated) cudaMemcpy2DAsync path."""

    def __init__(self, memory_limit, pinned=()):
        super().__init__("cpu", memory_limit)
        self.pinned = {t.untyped_storage().data_ptr() for t in pinned}
        runtime = types.SimpleNamespace(memcpy2DAsync=_fake_memcpy_2d, memcpyHostToDevice=1)
        self._cupy = types.SimpleNamespace(cuda=types.SimpleNamespace(runtime=runtime))
        self.direct_copies = 0

    def is_pinned(self, view):
        return view.untyped_storage().data_ptr() in self.pinned

    def _memcpy_2d(self, view, target):
        self.direct_copies += 1
        super()._memcpy_2d(view, target)


@pytest.mark.parametrize("trans_a", [False, True])
@pytest.mark.parametrize("trans_b", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_cuda_worker_logic_on_emulated_device(emulated_cuda, trans_a, trans_b, dtype, seed):
    generator = torch.Generator().manual_seed(seed)
    A, B = operand(61, 47, trans_a, dtype, generator), operand(47, 53, trans_b, dtype, generator)
    C = torch.randn(61, 53, generator=generator).to(dtype)
    limit = 20_000 if dtype == torch.float64 else 6_000  # small: many blocks and slabs
    workers = [EmulatedCUDAWorker(limit, pinned=[A]), EmulatedCUDAWorker(limit)]
    engine = Engine(workers)
    for alpha, beta, c in [(1.0, 0.0, None), (-0.5, 2.0, C)]:
        result = engine.gemm(A, B, c, alpha=alpha, beta=beta, trans_a=trans_a, trans_b=trans_b)
        assert_close(result, *reference(A, B, c, alpha, beta, trans_a, trans_b), dtype)
        assert engine.stats.plan.grid[0] * engine.stats.plan.grid[1] >= 6 and engine.stats.plan.grid[2] >= 2
        assert max(engine.stats.peak_bytes_per_worker.values()) <= limit
    assert workers[0].direct_copies > 0  # A's tiles skipped the packing copy (row or column layout)
    assert workers[1].direct_copies == 0 or workers[1].blocks_done == 0


def test_cuda_worker_failure_cleanup_on_emulated_device(emulated_cuda, seed):
    class Failing(EmulatedCUDAWorker):
        def write_block(self, problem, block, acc):
            if self.blocks_done == 1:
                raise torch.OutOfMemoryError("CUDA out of memory (emulated)")
            super().write_block(problem, block, acc)

    A, B = torch.randn(80, 40), torch.randn(40, 80)
    worker = Failing(30_000)
    engine = Engine([worker])
    with pytest.raises(RuntimeError, match="memory_limit"):
        engine.gemm(A, B)  # fails on the first try and on the retry
    assert worker.account.held == 0 and worker._pending == [] and len(worker.cache) == 0


# -- on a real GPU ------------------------------------------------------------------------------------------

DEVICE_SETS = [["cuda:0"], ["cuda:0", "cuda:0"]]


@needs_gpu
@pytest.mark.parametrize("devices", DEVICE_SETS, ids=["one-worker", "two-workers"])
@pytest.mark.parametrize("trans_a", [False, True])
@pytest.mark.parametrize("trans_b", [False, True])
@pytest.mark.parametrize("m,n,k", SHAPES)
def test_blas_grid_float64_cuda(m, n, k, trans_a, trans_b, devices, seed):
    generator = torch.Generator().manual_seed(seed)
    A, B = operand(m, k, trans_a, torch.float64, generator), operand(k, n, trans_b, torch.float64, generator)
    C = torch.randn(m, n, generator=generator, dtype=torch.float64)
    engine = Engine(devices, memory_limit=len(devices) * 13_000)
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
    result = accel.gemm(A, B, C, alpha=0.75, beta=-1.25, trans_b=True, devices=devices, memory_limit=1 << 20)
    assert result.dtype == dtype and result.device.type == "cpu"
    assert_close(result, *reference(A, B, C, 0.75, -1.25, False, True), dtype)


@needs_gpu
def test_float32_is_exact_by_default_and_tf32_on_request(seed):
    generator = torch.Generator().manual_seed(seed)
    A, B = operand(256, 1024, False, torch.float32, generator), operand(1024, 256, False, torch.float32, generator)
    exact = reference(A, B, None, 1.0, 0.0, False, False)
    before = torch.backends.cuda.matmul.allow_tf32
    assert_close(accel.gemm(A, B, devices=["cuda:0"]), *exact, torch.float32)
    tf32 = accel.gemm(A, B, devices=["cuda:0"], compute_dtype="tf32")
    error = np.abs(tf32.double().numpy() - exact[0]).max()
    assert error < 1e-2 * exact[1].max()  # TF32: 10-bit mantissa
    assert torch.backends.cuda.matmul.allow_tf32 == before  # the global switch is restored


@needs_gpu
@pytest.mark.parametrize("compute_dtype", [torch.bfloat16, torch.float16])
def test_half_compute_dtype_accumulates_in_float32_cuda(compute_dtype, seed):
    generator = torch.Generator().manual_seed(seed)
    A, B = operand(128, 4096, False, torch.float32, generator), operand(4096, 96, False, torch.float32, generator)
    engine = Engine(["cuda:0"], memory_limit=1 << 21)  # several slabs: the cross-slab sum is fp32
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
    result = accel.gemm(A, B, devices=["cuda:0"], memory_limit=1 << 20)
    assert_close(result, *reference(A, B, None, 1.0, 0.0, False, False), torch.float32)


@needs_gpu
@pytest.mark.parametrize("limit", [1 << 20, 4 << 20])
def test_memory_limit_measured_by_the_allocator(limit, seed):
    generator = torch.Generator().manual_seed(seed)
    A, B = torch.randn(1000, 800, generator=generator), torch.randn(800, 900, generator=generator)
    C = torch.randn(1000, 900, generator=generator)
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
