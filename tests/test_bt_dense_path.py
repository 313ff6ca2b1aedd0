"""BTLinear's dense path (W rebuilt, copied into the (I, J) layout, one GEMM) against its reference twin
``x @ layer.to_dense().t()`` (opt_einsum with autograd), on the shapes where the layout matters."""
import math

import pytest
import torch

from accel.nn import BTLinear
from accel.nn.bt_trace import rebuild_matmul

# (in_shape, out_shape): J_0 > 1 and J' > 1 so the copy between the layouts moves data; d = 2 and the
# moving-digits projection of experiments/bt_lstm.py (1,600 -> 16x4x2x2) included
SHAPES = [((5, 3), (4, 2)), ((3, 4, 2), (2, 3, 2)), ((8, 8, 5, 5), (16, 4, 2, 2))]


@pytest.mark.parametrize("in_shape,out_shape", SHAPES)
@pytest.mark.parametrize("input_grad", [False, True])
def test_dense_path_matches_reference(seed, in_shape, out_shape, input_grad):
    torch.manual_seed(seed)
    layer = BTLinear(math.prod(in_shape), math.prod(out_shape), in_shape=in_shape, out_shape=out_shape, ranks=2,
                     num_blocks=2, contraction="dense", dtype=torch.float64)
    x = torch.randn(9, layer.in_features, dtype=torch.float64, requires_grad=input_grad)
    wanted = [layer.core, *layer.factors, layer.bias] + ([x] if input_grad else [])
    grad_out = torch.randn(9, layer.out_features, dtype=torch.float64)
    results = []
    for forward in (layer, lambda x: x @ layer.to_dense().t() + layer.bias,
                    lambda x: rebuild_matmul(x, layer.core, layer.factors) + layer.bias):  # eager, reference, traced twin
        y = forward(x)
        results.append((y, *torch.autograd.grad(y, wanted, grad_out)))
    for fast, reference, traced in zip(*results):
        torch.testing.assert_close(fast, reference, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(traced, reference, rtol=1e-10, atol=1e-12)


def test_dense_path_twice_in_a_row_and_an_expanded_gradient(seed):
    """Repeated calls reuse the workspace (W, then its gradient, in the same two buffers); ``sum()``'s gradient
    arrives as an expanded view with zero strides."""
    torch.manual_seed(seed)
    kwargs = dict(in_shape=(8, 8, 5, 5), out_shape=(16, 4, 2, 2), ranks=4, dtype=torch.float64)
    layer = BTLinear(1600, 256, contraction="dense", **kwargs)
    reference = BTLinear(1600, 256, contraction="einsum", **kwargs)
    reference.load_state_dict(layer.state_dict())
    for _ in range(2):
        x = torch.randn(32, 1600, dtype=torch.float64)
        for module in (layer, reference):
            module.zero_grad()
            module(x).sum().backward()
        for fast, slow in zip(layer.parameters(), reference.parameters()):
            torch.testing.assert_close(fast.grad, slow.grad, rtol=1e-10, atol=1e-12)
    assert len(layer.workspace._buffers) == 2
