"""Builders shared by the GEMM tests (test_gemm*.py, test_worker_registry.py): operands, the float64 NumPy
reference, the tolerance check and one point of the BLAS grid."""
from __future__ import annotations

import numpy as np
import pytest
import torch

# dtype -> relative tolerance of one result element against sum_k |alpha a_ik b_kj| + |beta c_ij|
TOLERANCE = {torch.float64: 1e-12, torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def reference(A, B, C, alpha, beta, trans_a, trans_b, rounding=None):
    """Float64 NumPy BLAS result and the magnitude scale its error is measured against."""
    def as64(x):
        x = torch.as_tensor(x)
        if rounding is not None:
            x = x.to(rounding)
        return x.double().numpy()
    a, b = as64(A), as64(B)
    a, b = (a.T if trans_a else a), (b.T if trans_b else b)
    exact = alpha * (a @ b)
    scale = abs(alpha) * (np.abs(a) @ np.abs(b))
    if C is not None and beta != 0:
        c = np.broadcast_to(torch.as_tensor(C).double().numpy(), exact.shape)
        exact, scale = exact + beta * c, scale + abs(beta) * np.abs(c)
    return exact, scale


def assert_close(result, exact, scale, dtype):
    result = torch.as_tensor(result).double().numpy()
    assert result.shape == exact.shape
    error = np.abs(result - exact)
    bound = TOLERANCE[dtype] * (scale + 1e-30) + 1e-300
    worst = np.unravel_index(np.argmax(error - bound), error.shape) if error.size else None
    assert np.all(error <= bound), f"error {error[worst]} > {bound[worst]} at {worst}"


def operand(rows, cols, transposed, dtype, generator):
    """A random host matrix stored so that op(X) has shape (rows, cols)."""
    shape = (cols, rows) if transposed else (rows, cols)
    return torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype)


SHAPES = [(1, 1, 1), (7, 13, 5), (31, 17, 29), (64, 1, 33), (1, 40, 23), (37, 41, 53)]


BLAS_CASES = [(1.0, 0.0, False), (-0.5, 2.0, True), (1.5, 0.0, True), (0.0, -1.0, True), (2.0, 1.0, False)]


def check_blas_grid_case(engine, m, n, k, trans_a, trans_b, dtype, seed):
    """One point of the BLAS grid on ``engine``: alpha/beta with zeros, C given or not, against NumPy."""
    generator = torch.Generator().manual_seed(seed)
    A, B = operand(m, k, trans_a, dtype, generator), operand(k, n, trans_b, dtype, generator)
    C = torch.randn(m, n, generator=generator, dtype=torch.float64).to(dtype)
    for alpha, beta, with_c in BLAS_CASES:
        c = C if with_c else None
        result = engine.gemm(A, B, c, alpha=alpha, beta=beta, trans_a=trans_a, trans_b=trans_b)
        assert_close(result, *reference(A, B, c, alpha, beta, trans_a, trans_b), dtype)


@pytest.fixture(autouse=True)
def seeded_global_rng(seed):
    """torch's global generator seeded from the test's seed before every test of a module that imports this
    fixture, so draws without an explicit generator repeat run to run too."""
    torch.manual_seed(seed)
