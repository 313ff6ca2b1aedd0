"""BTLinear's dense path (W rebuilt, copied into the (I, J) layout, one GEMM) against its reference twin
``x @ layer.to_dense().t()`` (opt_einsum with autograd), on the shapes where the layout matters."""
import math

import pytest
import torch

from accel.nn import BTLinear
from accel.nn.bt._dense import weight_rows_first
from accel.nn.bt._paths import chain_plan
from accel.nn.bt._traced import rebuild_matmul

# (in_shape, out_shape): J_0 > 1 and J' > 1 so the copy between the layouts moves data; d = 2 and the
# moving-digits projection of experiments/bt_lstm.py (1,600 -> 16x4x2x2) included
SHAPES = [((5, 3), (4, 2)), ((3, 4, 2), (2, 3, 2)), ((8, 8, 5, 5), (16, 4, 2, 2))]


@pytest.mark.parametrize("in_shape,out_shape", SHAPES)
@pytest.mark.parametrize("input_grad", [False, True])
@pytest.mark.parametrize("batch", [9, 96])
def test_dense_path_matches_reference(seed, in_shape, out_shape, input_grad, batch):
    """Both layouts of the product: W as built (batched over j_0) and W copied into (I, J) (the moving-digits
    shape at batch 96)."""
    torch.manual_seed(seed)
    layer = BTLinear(math.prod(in_shape), math.prod(out_shape), in_shape=in_shape, out_shape=out_shape, ranks=2,
                     num_blocks=2, contraction="dense", dtype=torch.float64)
    rows_first = weight_rows_first(batch, layer.in_features, layer.out_features, out_shape[0])
    assert rows_first == (batch == 96 and in_shape == (8, 8, 5, 5))
    x = torch.randn(batch, layer.in_features, dtype=torch.float64, requires_grad=input_grad)
    wanted = [layer.core, *layer.factors, layer.bias] + ([x] if input_grad else [])
    grad_out = torch.randn(batch, layer.out_features, dtype=torch.float64)
    results = []
    for forward in (layer, lambda x: x @ layer.to_dense().t() + layer.bias,  # eager, reference, traced twin
                    lambda x: rebuild_matmul(x, layer.core, layer.factors) + layer.bias):
        y = forward(x)
        results.append((y, *torch.autograd.grad(y, wanted, grad_out)))
    for fast, reference, traced in zip(*results):
        torch.testing.assert_close(fast, reference, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(traced, reference, rtol=1e-10, atol=1e-12)


def test_dense_path_twice_in_a_row_and_an_expanded_gradient(seed):
    """Repeated calls reuse the workspace (W, then its gradient, in the same two buffers, whichever layout the
    batch size picks); ``sum()``'s gradient arrives as an expanded view with zero strides."""
    torch.manual_seed(seed)
    kwargs = dict(in_shape=(8, 8, 5, 5), out_shape=(16, 4, 2, 2), ranks=4, dtype=torch.float64)
    layer = BTLinear(1600, 256, contraction="dense", **kwargs)
    reference = BTLinear(1600, 256, contraction="einsum", **kwargs)
    reference.load_state_dict(layer.state_dict())
    for batch in (64, 32, 64):  # (I, J) layout, built layout, (I, J) again
        x = torch.randn(batch, 1600, dtype=torch.float64)
        for module in (layer, reference):
            module.zero_grad()
            module(x).sum().backward()
        for fast, slow in zip(layer.parameters(), reference.parameters()):
            torch.testing.assert_close(fast.grad, slow.grad, rtol=1e-10, atol=1e-12)
        assert len(layer.workspace._buffers) == 2


CHAIN_SHAPES = [((6, 5), (4, 3)), ((4, 3, 5), (2, 3, 2)), ((8, 8, 5, 5), (16, 4, 2, 2)),
                ((3, 2, 4, 2, 3), (2, 2, 3, 2, 2))]


@pytest.mark.parametrize("in_shape,out_shape", CHAIN_SHAPES)
@pytest.mark.parametrize("split", [None, 1])
def test_gemm_chain_elements_match_counted(seed, in_shape, out_shape, split):
    """The cost model's element count of the chain (over all modes, or two merged ones) against the outputs of
    the GEMMs and copies a real forward runs. A batch of 509 (prime) tells the input-side tensors from the
    weight-side ones (whose sizes it never divides), which the model counts apart (the merged factors) or
    leaves out as small."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from accel.nn.bt._contract import gemm_chain_contract, gemm_chain_elements, grouped_shapes

    counted_ops = {torch.ops.aten.mm.default, torch.ops.aten.bmm.default, torch.ops.aten.clone.default,
                   torch.ops.aten.copy_.default}

    class CountElements(TorchDispatchMode):
        elements = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func in counted_ops and out.numel() % 509 == 0:
                self.elements += out.numel()
            return out

    torch.manual_seed(seed)
    layer = BTLinear(math.prod(in_shape), math.prod(out_shape), in_shape=in_shape, out_shape=out_shape, ranks=3,
                     num_blocks=2, bias=False)
    x = torch.randn(509, layer.in_features)
    with torch.no_grad(), CountElements() as counter:
        y = gemm_chain_contract(x, layer.core, layer.factors, layer.in_shape, layer.out_shape, layer.ranks, split)
    torch.testing.assert_close(y, x @ layer.to_dense().t(), rtol=1e-4, atol=1e-4)
    shapes = layer._key()[:3] if split is None else grouped_shapes(*layer._key()[:3], split)
    assert counter.elements + x.numel() == gemm_chain_elements(*shapes, 2, 509)


def test_auto_takes_the_measured_fastest_path():
    """Where forward+backward was timed on every path (1 thread, development CPU, a random output gradient; the
    comments in bt_paths.py): the moving-digits projection of experiments/bt_lstm.py at R = 1 / 2 / 4, batch 256
    (low-rank 2.1 / 3.2 / 3.7 ms, the chain 2.5 / 5.0 / 12.4, rebuilt W 5.9 / 5.8 / 6.4), at batch 32 (R=1: the
    chain 0.93 ms, low-rank 1.13; R=2: low-rank 1.6, the chain 2.0); a UCF11 input layer (the chain 94 ms,
    low-rank 127); 16x12x8x8 with N=4 at batch 128 (low-rank 52 ms, rebuilt W 75, the chain 211), 16 (low-rank
    12 ms, opt_einsum 21) and 6 (opt_einsum 9.2 ms, low-rank 10.6)."""
    def method(in_shape, out_shape, ranks, num_blocks, batch):
        layer = BTLinear(math.prod(in_shape), math.prod(out_shape), in_shape=in_shape, out_shape=out_shape,
                         ranks=ranks, num_blocks=num_blocks)
        method = layer.method(batch)
        return method if method != "gemm" else (method, chain_plan(*layer._key(), batch)[0])

    moving = ((8, 8, 5, 5), (16, 4, 2, 2))
    assert [method(*moving, rank, 2, 256) for rank in (1, 2, 4)] == ["lowrank"] * 3
    assert method(*moving, 1, 2, 32) == ("gemm", None) and method(*moving, 2, 2, 32) == "lowrank"
    assert method((8, 20, 20, 18), (16, 4, 4, 4), 4, 2, 96) == ("gemm", None)
    frames = ((16, 12, 8, 8), (16, 4, 4, 4), 4, 4)
    assert [method(*frames, batch) for batch in (128, 16, 6)] == ["lowrank", "lowrank", "einsum"]


@pytest.mark.parametrize("in_shape,out_shape", CHAIN_SHAPES[1:])
def test_grouped_chain_matches_reference_every_split(seed, in_shape, out_shape):
    """The chain on two merged modes (every split point) against the dense reference, input gradient included;
    and gradcheck in float64 at one split."""
    from accel.nn.bt._contract import gemm_chain_contract

    torch.manual_seed(seed)
    layer = BTLinear(math.prod(in_shape), math.prod(out_shape), in_shape=in_shape, out_shape=out_shape, ranks=2,
                     num_blocks=2, dtype=torch.float64)
    x = torch.randn(70, layer.in_features, dtype=torch.float64, requires_grad=True)
    grad_out = torch.randn(70, layer.out_features, dtype=torch.float64)
    wanted = [x, layer.core, *layer.factors]
    reference = torch.autograd.grad(x @ layer.to_dense().t(), wanted, grad_out)
    for split in range(1, len(in_shape)):
        y = gemm_chain_contract(x, layer.core, layer.factors, layer.in_shape, layer.out_shape, layer.ranks, split)
        torch.testing.assert_close(y, x @ layer.to_dense().t(), rtol=1e-10, atol=1e-12)
        for got, want in zip(torch.autograd.grad(y, wanted, grad_out), reference):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    small = x[:3].detach().requires_grad_()
    assert torch.autograd.gradcheck(lambda x, core, *factors: gemm_chain_contract(
        x, core, factors, layer.in_shape, layer.out_shape, layer.ranks, 1), (small, layer.core, *layer.factors))
    with pytest.raises(ValueError, match="split must be in"):
        gemm_chain_contract(x, layer.core, layer.factors, layer.in_shape, layer.out_shape, layer.ranks, 0)


def test_factorized_runs_the_grouped_chain_and_its_traced_plan(seed):
    """contraction="factorized" at the moving-digits shape, R=2, batch 96, runs the grouped chain (eager and traced
    plan) and matches the reference ("auto" takes the low-rank path there)."""
    from accel.nn.bt._traced import traced_plan

    torch.manual_seed(seed)
    layer = BTLinear(1600, 256, in_shape=(8, 8, 5, 5), out_shape=(16, 4, 2, 2), ranks=2, dtype=torch.float64,
                     contraction="factorized")
    assert traced_plan(*layer._key(), "factorized", 96) == ("gemm", 1)
    x = torch.randn(96, 1600, dtype=torch.float64)
    for product in (layer._eager_product, layer._traced_product):
        torch.testing.assert_close(product(x), x @ layer.to_dense().t(), rtol=1e-10, atol=1e-12)
