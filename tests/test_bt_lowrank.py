"""The low-rank path of BTLinear (accel/nn/bt/_lowrank.py) against its reference twin, the rebuilt dense weight:
outputs and every gradient on fresh random layers and inputs, its flop count, and the cached pairwise order of
the weight-side einsum. (gradcheck, autocast, the empty batch, export and compile: with the other paths in
test_bt_linear.py, test_bt_export.py and test_bt_compile.py.)"""
import math
import warnings

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from accel.nn import BTLinear
from accel.nn.bt._common import einsum_cached
from accel.nn.bt._lowrank import lowrank_costs

SHAPES = [((6,), (5,)), ((4, 8), (16, 4)), ((2, 3, 4), (3, 2, 2)), ((8, 2, 5, 5), (4, 4, 2, 2)),
          ((2, 3, 2, 2, 3), (2, 2, 1, 3, 2))]


def random_layer(in_shape, out_shape, generator, dtype=torch.float64, contraction="lowrank"):
    ranks = [int(torch.randint(1, min(4, i * j) + 1, (), generator=generator)) for i, j in zip(in_shape, out_shape)]
    num_blocks = int(torch.randint(1, 4, (), generator=generator))
    with warnings.catch_warnings():  # tiny layers can be larger than their dense weight: not what is tested
        warnings.simplefilter("ignore")
        return BTLinear(math.prod(in_shape), math.prod(out_shape), in_shape=in_shape, out_shape=out_shape,
                        ranks=ranks, num_blocks=num_blocks, contraction=contraction, dtype=dtype)


@pytest.mark.parametrize("in_shape,out_shape", SHAPES)
@pytest.mark.parametrize("batch", [0, 1, 7, 40])
def test_matches_dense_weight_with_gradients(seed, in_shape, out_shape, batch):
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    layer = random_layer(in_shape, out_shape, generator)
    assert layer.method(batch) == "lowrank"
    x = torch.randn(batch, layer.in_features, dtype=torch.float64, requires_grad=True)
    grad_y = torch.randn(batch, layer.out_features, dtype=torch.float64)
    params = [x, layer.core, *layer.factors, layer.bias]
    y = layer(x)
    got = [y, *torch.autograd.grad(y, params, grad_y)]
    y_ref = x @ layer.to_dense().t() + layer.bias  # the reference twin: the rebuilt weight
    want = [y_ref, *torch.autograd.grad(y_ref, params, grad_y)]
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_auto_equals_dense_path_and_float32(seed):
    """The moving-digits BTLSTM's projection, where "auto" now takes this path: the same result as the dense path
    on the same parameters, in float32."""
    torch.manual_seed(seed)
    auto = BTLinear(1600, 256, in_shape=(8, 8, 5, 5), out_shape=(16, 4, 2, 2), ranks=4)
    dense = BTLinear(1600, 256, in_shape=(8, 8, 5, 5), out_shape=(16, 4, 2, 2), ranks=4, contraction="dense")
    dense.load_state_dict(auto.state_dict())
    assert auto.method(256) == "lowrank" and dense.method(256) == "dense"
    x, grad_y = torch.randn(256, 1600), torch.randn(256, 256)
    results = []
    for layer in (auto, dense):
        y = layer(x)
        results.append([y, *torch.autograd.grad(y, [layer.core, *layer.factors, layer.bias], grad_y)])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * b.abs().max().item())


def test_flops_as_counted():
    """lowrank_costs' forward flops (its large GEMM and per-row GEMMs, plus building the operand) as torch counts
    them."""
    layer = BTLinear(1600, 256, in_shape=(8, 8, 5, 5), out_shape=(16, 4, 2, 2), ranks=(4, 3, 2, 2), num_blocks=3,
                     contraction="lowrank")
    x = torch.randn(64, 1600)
    with FlopCounterMode(display=False) as counter:
        layer(x)
    gemm, small, _ = lowrank_costs(*layer._key(), 64)
    assert 2 * 64 * 1600 * 3 * 4 * 16 == gemm  # 2 B I (N R_0) J'
    assert counter.get_total_flops() == pytest.approx(gemm + small, rel=0.05)


def test_einsum_cached_matches_torch_einsum(seed):
    torch.manual_seed(seed)
    a, b, c = torch.randn(3, 4, 5), torch.randn(5, 6), torch.randn(6, 3, 2)
    torch.testing.assert_close(einsum_cached("ijk,kl,lim->jm", a, b, c), torch.einsum("ijk,kl,lim->jm", a, b, c))
