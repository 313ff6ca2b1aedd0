"""accel.gemm against NumPy float64 over the BLAS grid (CPU workers; the CUDA twin is test_gemm_cuda.py)."""
import gemm_helpers
import numpy as np
import pytest
import torch
from gemm_helpers import SHAPES, assert_close, check_blas_grid_case, operand, reference
from helpers import chosen_seed
from hypothesis import given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st

import accel
from accel.ooc import Engine

seeded_global_rng = gemm_helpers.seeded_global_rng  # autouse fixture: torch's global generator seeded per test


@pytest.mark.parametrize("trans_a", [False, True])
@pytest.mark.parametrize("trans_b", [False, True])
@pytest.mark.parametrize("m,n,k", SHAPES)
def test_blas_grid_float64(m, n, k, trans_a, trans_b, seed):
    engine = Engine(["cpu", "cpu"], memory_limit=2 * 13_000)  # tiny: forces many blocks and slabs
    check_blas_grid_case(engine, m, n, k, trans_a, trans_b, torch.float64, seed)


def test_tiny_memory_forces_many_blocks_and_slabs(seed):
    generator = torch.Generator().manual_seed(seed)
    A = torch.randn(97, 89, generator=generator, dtype=torch.float64)
    B = torch.randn(89, 83, generator=generator, dtype=torch.float64)
    engine = Engine(["cpu"], memory_limit=16_000)
    result = engine.gemm(A, B)
    rows, cols, slabs = engine.stats.plan.grid
    assert rows * cols >= 9 and slabs >= 3
    assert_close(result, *reference(A, B, None, 1.0, 0.0, False, False), torch.float64)
    assert max(engine.stats.peak_bytes_per_worker.values()) <= 16_000


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("devices", [["cpu"], ["cpu", "cpu"]])
def test_each_dtype_within_tolerance(dtype, devices, seed):
    generator = torch.Generator().manual_seed(seed)
    A, B = operand(45, 67, False, dtype, generator), operand(67, 39, True, dtype, generator)
    C = torch.randn(45, 39, generator=generator).to(dtype)
    result = accel.gemm(A, B, C, alpha=0.75, beta=-1.25, trans_b=True, devices=devices, memory_limit=40_000)
    assert result.dtype == dtype
    assert_close(result, *reference(A, B, C, 0.75, -1.25, False, True), dtype)


@pytest.mark.parametrize("compute_dtype", [torch.bfloat16, torch.float16])
def test_half_compute_dtype_rounds_operands_and_accumulates_in_float32(compute_dtype, seed):
    generator = torch.Generator().manual_seed(seed)
    A, B = operand(33, 300, False, torch.float32, generator), operand(300, 21, False, torch.float32, generator)
    result = accel.gemm(A, B, compute_dtype=compute_dtype, devices=["cpu"], memory_limit=60_000)
    assert result.dtype == torch.float32
    # exact products of the rounded operands, accumulated in fp32: far tighter than half precision
    assert_close(result, *reference(A, B, None, 1.0, 0.0, False, False, rounding=compute_dtype), torch.float32)
    unrounded, _ = reference(A, B, None, 1.0, 0.0, False, False)
    assert np.abs(result.double().numpy() - unrounded).max() > 1e-4  # the rounding did happen


def test_tf32_and_float64_compute_dtypes_on_cpu(seed):
    generator = torch.Generator().manual_seed(seed)
    A, B = operand(20, 30, False, torch.float32, generator), operand(30, 10, False, torch.float32, generator)
    exact = reference(A, B, None, 1.0, 0.0, False, False)
    assert_close(accel.gemm(A, B, compute_dtype="tf32"), *exact, torch.float32)  # no TF32 on a CPU: exact
    result = accel.gemm(A, B, compute_dtype=torch.float64)
    assert result.dtype == torch.float32
    assert_close(result, *exact, torch.float32)


def test_mixed_dtypes_with_compute_dtype(seed):
    generator = torch.Generator().manual_seed(seed)
    A = operand(12, 18, False, torch.float16, generator)
    B = operand(18, 9, False, torch.float32, generator)
    C = torch.randn(12, 9, generator=generator, dtype=torch.float64)
    result = accel.gemm(A, B, C, beta=0.5, compute_dtype=torch.float32)
    assert result.dtype == torch.float64
    assert_close(result, *reference(A, B, C, 1.0, 0.5, False, False), torch.float32)


def test_non_contiguous_and_transposed_views(seed):
    generator = torch.Generator().manual_seed(seed)
    A = torch.randn(80, 90, generator=generator, dtype=torch.float64)[1::2, ::3]  # 40 x 30, both strides > 1
    B = torch.randn(70, 60, generator=generator, dtype=torch.float64)[::2, 5:35]  # 35 x 30, strided
    C = torch.randn(40, 80, generator=generator, dtype=torch.float64)[:, ::2][:, :35]  # 40 x 35
    assert not (A.is_contiguous() or B.is_contiguous() or C.is_contiguous())
    for trans_a, a in [(False, A), (True, A.t())]:  # op(a) is A either way
        for trans_b, b in [(True, B), (False, B.t())]:  # op(b) is B.T either way
            result = accel.gemm(a, b, C, alpha=1.5, beta=0.25, trans_a=trans_a, trans_b=trans_b,
                                devices=["cpu", "cpu"], memory_limit=30_000)
            assert_close(result, *reference(a, b, C, 1.5, 0.25, trans_a, trans_b), torch.float64)


def test_numpy_in_numpy_out(seed):
    rng = np.random.default_rng(seed)
    A = np.asfortranarray(rng.standard_normal((23, 31)))  # column-major
    B = rng.standard_normal((19, 31)).astype(np.float32).astype(np.float64)[:, ::-1]  # negative strides
    C = rng.standard_normal((23, 19))
    result = accel.gemm(A, B, C, alpha=2.0, beta=-1.0, trans_b=True, devices=["cpu"], memory_limit=20_000)
    assert isinstance(result, np.ndarray) and result.dtype == np.float64
    np.testing.assert_allclose(result, 2.0 * A @ B.T - C, rtol=1e-12, atol=1e-12)
    result32 = accel.gemm(A.astype(np.float32), B.T.astype(np.float32))
    assert isinstance(result32, np.ndarray) and result32.dtype == np.float32
    assert isinstance(accel.gemm(torch.from_numpy(A), B.T.copy()), torch.Tensor)  # any torch input -> torch


def test_beta_zero_ignores_nan_in_c_and_alpha_zero_ignores_a_b(seed):
    generator = torch.Generator().manual_seed(seed)
    A, B = torch.randn(8, 6, generator=generator), torch.randn(6, 5, generator=generator)
    C = torch.full((8, 5), float("nan"))
    assert torch.isfinite(accel.gemm(A, B, C, beta=0.0)).all()
    A_nan = torch.full((8, 6), float("nan"))
    C = torch.randn(8, 5, generator=generator)
    torch.testing.assert_close(accel.gemm(A_nan, B, C, alpha=0.0, beta=3.0), 3.0 * C)
    torch.testing.assert_close(accel.gemm(A, B, alpha=0.0), torch.zeros(8, 5))


def test_empty_and_k_zero():
    assert accel.gemm(torch.randn(0, 4), torch.randn(4, 3)).shape == (0, 3)
    C = torch.randn(5, 3)
    torch.testing.assert_close(accel.gemm(torch.randn(5, 0), torch.randn(0, 3), C, beta=2.0), 2.0 * C)


def test_c_broadcasts_like_addmm(seed):
    generator = torch.Generator().manual_seed(seed)
    A, B = torch.randn(9, 7, generator=generator), torch.randn(7, 4, generator=generator)
    bias = torch.randn(4, generator=generator)
    torch.testing.assert_close(accel.gemm(A, B, bias, beta=1.0), torch.addmm(bias, A, B))


@hypothesis_seed(chosen_seed())  # the examples drawn repeat run to run, like every other test's inputs
@settings(max_examples=40, deadline=None)
@given(m=st.integers(1, 40), n=st.integers(1, 40), k=st.integers(1, 40), trans_a=st.booleans(),
       trans_b=st.booleans(), alpha=st.sampled_from([0.0, 1.0, -2.5, 0.3]), beta=st.sampled_from([0.0, 1.0, -0.7]),
       with_c=st.booleans(), workers=st.integers(1, 2), memory=st.sampled_from([13_000, 30_000, None]),
       seed=st.integers(0, 2**31 - 1))
def test_blas_property(m, n, k, trans_a, trans_b, alpha, beta, with_c, workers, memory, seed):
    generator = torch.Generator().manual_seed(seed)
    A, B = operand(m, k, trans_a, torch.float64, generator), operand(k, n, trans_b, torch.float64, generator)
    C = torch.randn(m, n, generator=generator, dtype=torch.float64) if with_c else None
    devices = ["cpu"] * workers
    limit = memory * workers if memory else None
    result = accel.gemm(A, B, C, alpha=alpha, beta=beta, trans_a=trans_a, trans_b=trans_b, devices=devices,
                        memory_limit=limit)
    assert_close(result, *reference(A, B, C, alpha, beta, trans_a, trans_b), torch.float64)
