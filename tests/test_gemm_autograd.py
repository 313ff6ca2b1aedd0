"""accel.gemm under autograd (backward and double backward through engine GEMMs), and the cache
contract: tiles live for one call unless the caller opts in (persist_cache, CacheScope)."""
import gemm_helpers
import numpy as np
import pytest
import torch

import accel
from accel.ooc import Engine

seeded_global_rng = gemm_helpers.seeded_global_rng  # autouse fixture: torch's global generator seeded per test

ENGINE = dict(devices=["cpu", "cpu"], memory_limit=2 * 13_000)  # many blocks and slabs


@pytest.mark.parametrize("trans_a,trans_b,c_shape", [(False, False, None), (True, False, (5, 3)),
                                                     (False, True, (3,)), (True, True, ())])
def test_gradcheck_and_gradgradcheck(trans_a, trans_b, c_shape, seed):
    generator = torch.Generator().manual_seed(seed)
    engine = Engine(["cpu"])  # tiny matrices: the grid of blocks is tested elsewhere; here the calculus
    A = torch.randn((4, 5) if trans_a else (5, 4), generator=generator, dtype=torch.float64, requires_grad=True)
    B = torch.randn((3, 4) if trans_b else (4, 3), generator=generator, dtype=torch.float64, requires_grad=True)
    inputs = [A, B]
    if c_shape is not None:
        inputs.append(torch.randn(c_shape, generator=generator, dtype=torch.float64, requires_grad=True))

    def function(A, B, C=None):
        return engine.gemm(A, B, C, alpha=-1.5, beta=0.0 if C is None else 0.75, trans_a=trans_a, trans_b=trans_b)

    assert torch.autograd.gradcheck(function, inputs)
    assert torch.autograd.gradgradcheck(function, inputs)


def test_gradients_equal_matmul_and_constants_stay_constant(seed):
    generator = torch.Generator().manual_seed(seed)
    A = torch.randn(40, 30, generator=generator, requires_grad=True)
    B = torch.randn(30, 20, generator=generator).numpy()  # a NumPy operand is a constant
    result = accel.gemm(A, B, **ENGINE)
    assert result.requires_grad and isinstance(result, torch.Tensor)
    grad = torch.randn(40, 20, generator=generator)
    result.backward(grad)
    torch.testing.assert_close(A.grad, grad @ torch.from_numpy(B).T, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        assert not accel.gemm(A, B, **ENGINE).requires_grad
    assert isinstance(accel.gemm(A.detach().numpy(), B, **ENGINE), np.ndarray)


def test_half_inputs_get_gradients_in_their_dtype(seed):
    generator = torch.Generator().manual_seed(seed)
    A = torch.randn(20, 30, generator=generator).bfloat16().requires_grad_()
    B = torch.randn(30, 10, generator=generator).bfloat16().requires_grad_()
    accel.gemm(A, B, **ENGINE).float().sum().backward()
    assert A.grad.dtype == torch.bfloat16 and B.grad.dtype == torch.bfloat16
    torch.testing.assert_close(A.grad.float(), torch.ones(20, 10) @ B.float().T, rtol=2e-2, atol=2e-2)


def test_tiles_do_not_outlive_a_call_by_default(seed):
    generator = torch.Generator().manual_seed(seed)
    A, B = torch.randn(60, 50, generator=generator), torch.randn(50, 40, generator=generator)
    engine = Engine(["cpu"], memory_limit=1 << 20)
    engine.gemm(A, B)
    assert len(engine.workers[0].cache) == 0
    A.detach().numpy()[0, 0] += 100.0  # invisible to torch: harmless since nothing was kept
    torch.testing.assert_close(engine.gemm(A, B), A @ B)


def test_persistent_cache_is_the_callers_promise(seed):
    generator = torch.Generator().manual_seed(seed)
    A = torch.randn(60, 50, generator=generator, dtype=torch.float64)
    B = torch.randn(50, 40, generator=generator, dtype=torch.float64)
    engine = Engine(["cpu"], memory_limit=1 << 20, persist_cache=True)
    options = dict(compute_dtype=torch.float32)  # fp32 products of fp64 data: the CPU tiles are copies
    engine.gemm(A, B, **options)
    engine.gemm(A, B, **options)
    assert engine.stats.cache_misses == 0 and engine.stats.bytes_to_device == 0  # the benefit
    A.detach().numpy()[0, 0] += 100.0  # breaks the promise: the stale tile is used, as documented
    assert not torch.allclose(engine.gemm(A, B, **options), A @ B)
    engine.clear_cache()  # what the contract asks after such a write
    torch.testing.assert_close(engine.gemm(A, B, **options), A @ B, rtol=1e-5, atol=1e-5)


def test_cache_scope_reuses_until_closed(seed):
    generator = torch.Generator().manual_seed(seed)
    A, B = torch.randn(60, 50, generator=generator), torch.randn(50, 40, generator=generator)
    engine = Engine(["cpu"], memory_limit=1 << 20)
    scope = engine.cache_scope()
    engine.gemm(A, B, cache_scope=scope)
    torch.testing.assert_close(engine.gemm(A, B.T.contiguous().T, cache_scope=scope), A @ B)
    assert engine.stats.cache_hits > 0  # A's tiles came from the scope
    scope.close()
    assert len(engine.workers[0].cache) == 0
    with pytest.raises(ValueError, match="cache_scope is closed"):
        engine.gemm(A, B, cache_scope=scope)
    with pytest.raises(ValueError, match="another Engine"):
        engine.gemm(A, B, cache_scope=Engine(["cpu"]).cache_scope())
