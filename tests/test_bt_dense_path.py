"""BTLinear's dense path (W rebuilt, copied into the (I, J) layout, one GEMM) against its reference twin
``x @ layer.to_dense().t()`` (ordinary autograd), on the shapes where the layout matters."""
import math

import pytest
import torch

from accel.nn import BTLinear
from accel.nn.bt._dense import rebuild_matmul, weight_rows_first

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
    reference = BTLinear(1600, 256, contraction="lowrank", **kwargs)
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
def test_gemm_chain_elements_match_counted(seed, in_shape, out_shape):
    """The cost model's element count of the chain against the outputs of the GEMMs and copies a real forward
    runs. A batch of 509 (prime) tells the input-side tensors from the weight-side ones (whose sizes it never
    divides), which the model leaves out as small."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from accel.nn.bt._contract import gemm_chain_contract, gemm_chain_elements

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
        y = gemm_chain_contract(x, layer.core, layer.factors, layer.in_shape, layer.out_shape, layer.ranks)
    torch.testing.assert_close(y, x @ layer.to_dense().t(), rtol=1e-4, atol=1e-4)
    assert counter.elements + x.numel() == gemm_chain_elements(*layer._key(), 509)
