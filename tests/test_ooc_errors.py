"""Small mistakes get a clear error (or a warning) naming the value (issue 12, item 6)."""
import warnings

import gemm_helpers
import pytest
import torch

import accel
from accel.nn.ooc_linear import OutOfCoreLinear
from accel.ooc import Engine

seeded_global_rng = gemm_helpers.seeded_global_rng  # autouse fixture: torch's global generator seeded per test


def test_devices_as_a_count_is_refused_with_a_hint():
    with pytest.raises(TypeError, match=r"devices=3: pass device names"):
        Engine(3)
    with pytest.raises(TypeError, match="devices=3"):
        accel.gemm(torch.randn(2, 2), torch.randn(2, 2), devices=3)
    with pytest.raises(TypeError, match="got 2.5"):
        Engine(2.5)


@pytest.mark.parametrize("limit", [1e6, 2 ** 21 * 1.0])
def test_a_whole_float_memory_limit_is_read_as_bytes(limit, seed):
    generator = torch.Generator().manual_seed(seed)
    A, B = torch.randn(50, 40, generator=generator), torch.randn(40, 30, generator=generator)
    engine = Engine(["cpu"], memory_limit=limit)
    assert engine.workers[0].account.limit == int(limit)
    torch.testing.assert_close(accel.gemm(A, B, devices=["cpu"], memory_limit=limit), A @ B)


@pytest.mark.parametrize("limit", [0, -5, 1.5, float("nan"), "1GB", True])
def test_bad_memory_limits_are_named(limit):
    with pytest.raises(ValueError, match="memory_limit must be a positive whole number of bytes, got"):
        Engine(["cpu"], memory_limit=limit)


def test_sparse_input_is_refused():
    sparse = torch.eye(4).to_sparse()
    with pytest.raises(TypeError, match=r"A is a torch.sparse_coo tensor.*A.to_dense\(\)"):
        accel.gemm(sparse, torch.randn(4, 3))


def test_tiny_block_warns(seed):
    generator = torch.Generator().manual_seed(seed)
    A, B = torch.randn(20, 20, generator=generator), torch.randn(20, 20, generator=generator)
    with pytest.warns(UserWarning, match="block=2 is below 16"):
        result = accel.gemm(A, B, block=2, devices=["cpu"])
    torch.testing.assert_close(result, A @ B)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        accel.gemm(A, B, block=16, devices=["cpu"])


def test_out_of_core_linear_checks_engine_and_input_rank():
    with pytest.raises(TypeError, match=r"engine must be an accel.ooc.Engine, got 'cpu'"):
        OutOfCoreLinear(4, 3, engine="cpu")
    layer = OutOfCoreLinear(4, 3, devices=["cpu"])
    with pytest.raises(ValueError, match=r"last dimension 4, got shape \(\)"):
        layer(torch.tensor(1.0))
