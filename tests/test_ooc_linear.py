"""OutOfCoreLinear against nn.Linear with the same weights: outputs, gradients, optimizer steps."""
import copy

import gemm_helpers
import pytest
import torch
from torch import nn

from accel.nn.ooc_linear import OutOfCoreLinear
from accel.ooc import Engine

seeded_global_rng = gemm_helpers.seeded_global_rng  # autouse fixture: torch's global generator seeded per test

ENGINE = dict(devices=["cpu", "cpu"], memory_limit=2 * 40_000)  # small: many blocks and slabs


def pair(in_features, out_features, bias, dtype, seed):
    torch.manual_seed(seed)
    linear = nn.Linear(in_features, out_features, bias=bias, dtype=dtype)
    return linear, OutOfCoreLinear.from_linear(copy.deepcopy(linear), **ENGINE)  # its own parameters


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype,tolerance", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("input_shape", [(6, 37), (2, 5, 37), (1, 37)])
def test_outputs_and_gradients_equal_linear(bias, dtype, tolerance, input_shape, seed):
    linear, layer = pair(37, 29, bias, dtype, seed)
    x = torch.randn(*input_shape, dtype=dtype, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    y, y_ref = layer(x), linear(x_ref)
    assert y.shape == y_ref.shape and y.dtype == dtype
    torch.testing.assert_close(y, y_ref, rtol=tolerance, atol=tolerance)
    grad = torch.randn_like(y)
    y.backward(grad)
    y_ref.backward(grad)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=tolerance, atol=tolerance)
    torch.testing.assert_close(layer.weight.grad, linear.weight.grad, rtol=tolerance, atol=tolerance)
    if bias:
        torch.testing.assert_close(layer.bias.grad, linear.bias.grad, rtol=tolerance, atol=tolerance)
    assert layer.weight.grad.device.type == "cpu"


@pytest.mark.parametrize("optimizer", [
    lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
    lambda p: torch.optim.Adam(p, lr=1e-2),
])
def test_optimizer_steps_match(optimizer, seed):
    torch.manual_seed(seed)
    reference = nn.Sequential(nn.Linear(23, 41), nn.Tanh(), nn.Linear(41, 7)).double()
    model = copy.deepcopy(reference)
    shared = Engine(**ENGINE)  # one engine (one memory budget) for both layers
    model[0] = OutOfCoreLinear.from_linear(model[0], engine=shared)  # (from_linear shares the parameters)
    model[2] = OutOfCoreLinear.from_linear(model[2], engine=shared)
    opt, opt_ref = optimizer(model.parameters()), optimizer(reference.parameters())
    for _ in range(4):
        x, target = torch.randn(16, 23, dtype=torch.float64), torch.randn(16, 7, dtype=torch.float64)
        for net, opt_ in ((model, opt), (reference, opt_ref)):
            opt_.zero_grad()
            nn.functional.mse_loss(net(x), target).backward()
            opt_.step()
    for p, p_ref in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, p_ref, rtol=1e-10, atol=1e-10)
    # in-place optimizer updates invalidated the cached weight tiles: the last forward used fresh weights
    x = torch.randn(3, 23, dtype=torch.float64)
    torch.testing.assert_close(model(x), reference(x), rtol=1e-10, atol=1e-10)


def test_construction_init_and_state_dict(seed):
    torch.manual_seed(seed)
    layer = OutOfCoreLinear(50, 20, devices=["cpu"])
    assert layer.weight.shape == (20, 50) and layer.bias.shape == (20,)
    bound = 1 / 50 ** 0.5
    assert layer.weight.abs().max() <= bound and layer.bias.abs().max() <= bound  # nn.Linear's init
    assert layer.weight.std() > bound / 4  # not zeros
    other = OutOfCoreLinear(50, 20, devices=["cpu"])
    other.load_state_dict(layer.state_dict())
    torch.testing.assert_close(other.weight, layer.weight)
    assert "devices=['cpu']" in repr(layer)
    assert OutOfCoreLinear(5, 3, bias=False).bias is None


def test_dtype_conversion_applies_but_parameters_stay_on_the_host():
    layer = OutOfCoreLinear(8, 4, devices=["cpu"])
    layer.double()
    assert layer.weight.dtype == torch.float64 and layer.weight.device.type == "cpu"
    y = layer(torch.randn(2, 8, dtype=torch.float64))
    assert y.dtype == torch.float64


def test_errors():
    with pytest.raises(ValueError, match="in_features"):
        OutOfCoreLinear(0, 3)
    with pytest.raises(ValueError, match="to the Engine"):
        OutOfCoreLinear(3, 3, devices=["cpu"], engine=Engine(["cpu"]))
    with pytest.raises(TypeError, match="nn.Linear"):
        OutOfCoreLinear.from_linear(nn.Conv1d(3, 3, 1))
    layer = OutOfCoreLinear(8, 4, devices=["cpu"])
    with pytest.raises(ValueError, match="last dimension 8"):
        layer(torch.randn(2, 7))
    with pytest.raises(TypeError, match="float64"):
        layer(torch.randn(2, 8, dtype=torch.float64))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_activations_on_gpu(seed):
    torch.manual_seed(seed)
    linear = nn.Linear(300, 200)
    layer = OutOfCoreLinear.from_linear(copy.deepcopy(linear), devices=["cuda:0"], memory_limit=1 << 20)
    x = torch.randn(64, 300, device="cuda", requires_grad=True)
    y = layer(x)
    assert y.device == x.device and layer.weight.device.type == "cpu"
    y.square().sum().backward()
    x_ref = x.detach().cpu().requires_grad_()
    linear(x_ref).square().sum().backward()
    torch.testing.assert_close(y.cpu(), linear(x_ref).detach(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(x.grad.cpu(), x_ref.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(layer.weight.grad, linear.weight.grad, rtol=1e-4, atol=1e-4)


def test_inference_mode_then_training(seed):
    """Under torch.inference_mode (which does not reach the engine's threads) the layer and accel.gemm still
    compute; a training step afterwards works and agrees."""
    import accel
    torch.manual_seed(seed)
    layer = OutOfCoreLinear(96, 40)
    x = torch.randn(12, 96)
    with torch.inference_mode():
        y_inference = layer(x)
        product = accel.gemm(x, layer.weight.t())
    y = layer(x)
    y.square().sum().backward()
    torch.testing.assert_close(y_inference, y.detach())
    torch.testing.assert_close(product, x @ layer.weight.detach().t(), rtol=1e-5, atol=1e-5)
    assert layer.weight.grad is not None


def test_the_layer_uses_only_the_public_engine_api():
    """accel/nn/ooc_linear.py imports nothing from accel.ooc but its public names."""
    import ast
    import inspect

    import accel.nn.ooc_linear as module
    import accel.ooc

    for node in ast.walk(ast.parse(inspect.getsource(module))):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("accel.ooc"):
            assert node.module == "accel.ooc", node.module
            assert {alias.name for alias in node.names} <= set(accel.ooc.__all__)
