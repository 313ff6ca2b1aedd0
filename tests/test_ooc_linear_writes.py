"""No stale tile, whatever writes the weight: OutOfCoreLinear against nn.Linear under every write path
that bypasses (or not) torch's version counter, double backward, and copies of the layer."""
import copy
import io
import pickle

import gemm_helpers
import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from accel.nn.ooc_linear import OutOfCoreLinear
from accel.ooc import Engine

seeded_global_rng = gemm_helpers.seeded_global_rng  # autouse fixture: torch's global generator seeded per test

BIG = dict(devices=["cpu"], memory_limit=8 << 20)  # every tile fits: a stale cache would be used


def pair(seed, in_features=24, out_features=17, dtype=torch.float64):
    torch.manual_seed(seed)
    linear = nn.Linear(in_features, out_features, dtype=dtype)
    return linear, OutOfCoreLinear.from_linear(copy.deepcopy(linear), **BIG)  # its own parameters


def assert_forward_is_current(layer, generator):
    x = torch.randn(5, layer.in_features, generator=generator, dtype=layer.weight.dtype)
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("make_optimizer", [
    lambda p: torch.optim.AdamW(p, lr=0.05, fused=True),
    lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, fused=True),
    lambda p: torch.optim.Adam(p, lr=0.05, foreach=True),
], ids=["fused_adamw", "fused_sgd", "foreach_adam"])
def test_optimizer_steps_match_linear(make_optimizer, seed):
    linear, layer = pair(seed)
    generator = torch.Generator().manual_seed(seed)
    opt, opt_ref = make_optimizer(layer.parameters()), make_optimizer(linear.parameters())
    for _ in range(6):
        x = torch.randn(9, 24, generator=generator, dtype=torch.float64)
        target = torch.randn(9, 17, generator=generator, dtype=torch.float64)
        for net, optimizer in ((layer, opt), (linear, opt_ref)):
            optimizer.zero_grad()
            F.mse_loss(net(x), target).backward()
            optimizer.step()
        assert_forward_is_current(layer, generator)
    torch.testing.assert_close(layer.weight, linear.weight, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(layer.bias, linear.bias, rtol=1e-10, atol=1e-10)


def _write_data(layer, new):
    layer.weight.data = new.clone()


def _write_data_in_place(layer, new):
    layer.weight.data.copy_(new)


def _write_numpy_view(layer, new):
    layer.weight.detach().numpy()[...] = new.numpy()


def _write_vector_to_parameters(layer, new):
    vector = nn.utils.parameters_to_vector(layer.parameters()).detach()
    vector[: new.numel()] = new.reshape(-1)
    nn.utils.vector_to_parameters(vector, layer.parameters())


def _write_load_state_dict(layer, new):
    layer.load_state_dict({"weight": new, "bias": layer.bias.detach().clone()})


@pytest.mark.parametrize("write", [_write_data, _write_data_in_place, _write_numpy_view,
                                   _write_vector_to_parameters, _write_load_state_dict])
def test_every_write_path_is_seen(write, seed):
    linear, layer = pair(seed)
    generator = torch.Generator().manual_seed(seed)
    opt, opt_ref = (torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.5) for m in (layer, linear))
    for _ in range(3):
        x = torch.randn(7, 24, generator=generator, dtype=torch.float64)
        for net, optimizer in ((layer, opt), (linear, opt_ref)):  # a step, tiles loaded in forward/backward
            optimizer.zero_grad()
            net(x).square().mean().backward()
            optimizer.step()
        new = torch.randn(17, 24, generator=generator, dtype=torch.float64)
        write(layer, new)
        write(linear, new)
        assert_forward_is_current(layer, generator)
    for p, p_ref in zip(layer.parameters(), linear.parameters()):
        torch.testing.assert_close(p, p_ref, rtol=1e-10, atol=1e-10)


def test_tiles_are_shared_between_forward_and_backward_once_each(seed):
    torch.manual_seed(seed)
    layer = OutOfCoreLinear(40, 30, **BIG)
    x = torch.randn(12, 40, requires_grad=True)
    layer.engine.reset_totals()
    layer(x).sum().backward()
    totals = layer.engine.totals
    # x, W and the output gradient each loaded once (fp32 tiles), plus the bias read as C in the forward
    assert totals.bytes_to_device == 4 * (12 * 40 + 30 * 40 + 12 * 30) + 4 * 12 * 30
    assert totals.cache_hits > 0 and totals.calls == 3
    assert all(len(worker.cache) == 0 for worker in layer.engine.workers)  # the scope closed with the backward


def test_default_engine_is_shared_and_modest(monkeypatch):
    import accel.nn.ooc_linear as module
    from accel.ooc import CPUWorker

    monkeypatch.setattr(module, "_shared_engines", {})
    monkeypatch.setattr(CPUWorker, "default_memory_limit", lambda self: 1 << 30)  # (free memory moves)
    first, second = OutOfCoreLinear(8, 4, devices=["cpu"]), OutOfCoreLinear(6, 3, devices=["cpu"])
    assert first.engine is second.engine  # one budget for every layer on these devices
    assert first.engine.workers[0].account.limit == 1 << 28  # a quarter of what accel.gemm would take
    assert OutOfCoreLinear(8, 4, devices=["cpu"], memory_limit=1 << 20).engine is not first.engine


def test_no_graph_no_tiles_kept(seed):
    torch.manual_seed(seed)
    layer = OutOfCoreLinear(20, 10, **BIG)
    with torch.no_grad():
        layer(torch.randn(3, 20))
    assert all(len(worker.cache) == 0 for worker in layer.engine.workers)


def test_double_backward_gradient_penalty_matches_linear(seed):
    linear, layer = pair(seed)
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(6, 24, generator=generator, dtype=torch.float64)
    for net in (layer, linear):
        inputs = x.clone().requires_grad_()
        output = net(inputs)
        (gradient,) = torch.autograd.grad(output.tanh().sum(), inputs, create_graph=True)
        (output.square().mean() + gradient.square().sum()).backward()
    assert linear.weight.grad.abs().max() > 0
    torch.testing.assert_close(layer.weight.grad, linear.weight.grad, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(layer.bias.grad, linear.bias.grad, rtol=1e-10, atol=1e-10)


def test_gradcheck_and_gradgradcheck(seed):
    _, layer = pair(seed, 6, 5)
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    function = lambda x, w, b: torch.func.functional_call(layer, {"weight": w, "bias": b}, (x,))  # noqa: E731
    inputs = (x, layer.weight.detach().clone().requires_grad_(), layer.bias.detach().clone().requires_grad_())
    assert torch.autograd.gradcheck(function, inputs)
    assert torch.autograd.gradgradcheck(function, inputs)


def _model(seed, engine=None):
    torch.manual_seed(seed)
    kwargs = dict(engine=engine) if engine is not None else BIG
    return nn.Sequential(OutOfCoreLinear(12, 9, dtype=torch.float64, **kwargs), nn.Tanh(),
                         OutOfCoreLinear(9, 4, dtype=torch.float64, **kwargs))


def _torch_save_load(model):
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


@pytest.mark.parametrize("copy_model", [copy.deepcopy, lambda m: pickle.loads(pickle.dumps(m)), _torch_save_load],
                         ids=["deepcopy", "pickle", "torch_save"])
def test_copies_are_normal_modules_with_a_new_engine(copy_model, seed):
    shared = Engine(["cpu", "cpu"], memory_limit=1 << 20)
    model = _model(seed, shared)
    x = torch.randn(3, 12, dtype=torch.float64)
    copied = copy_model(model)
    torch.testing.assert_close(copied(x), model(x))
    assert copied[0].engine is not shared and copied[0].engine is copied[2].engine  # new, still shared
    assert copied[0].engine.devices == shared.devices
    assert [w.account.limit for w in copied[0].engine.workers] == [w.account.limit for w in shared.workers]
    with torch.no_grad():
        copied[0].weight.add_(1.0)  # a copy's parameters are its own
    assert not torch.equal(copied[0].weight, model[0].weight)


def test_averaged_model(seed):
    model = _model(seed)
    averaged = torch.optim.swa_utils.AveragedModel(model)
    generator = torch.Generator().manual_seed(seed)
    weights = [model[0].weight.detach().clone()]
    for _ in range(2):
        with torch.no_grad():
            model[0].weight.add_(torch.randn(9, 12, generator=generator, dtype=torch.float64))
        weights.append(model[0].weight.detach().clone())
        averaged.update_parameters(model)
    torch.testing.assert_close(averaged.module[0].weight, torch.stack(weights[1:]).mean(0))
    x = torch.randn(2, 12, dtype=torch.float64)
    reference = averaged.module[2](torch.tanh(F.linear(x, averaged.module[0].weight, averaged.module[0].bias)))
    torch.testing.assert_close(averaged(x), reference)


def test_state_dict_interop_with_linear(seed):
    linear, layer = pair(seed)
    other = nn.Linear(24, 17, dtype=torch.float64)
    other.load_state_dict(layer.state_dict())
    x = torch.randn(3, 24, dtype=torch.float64)
    torch.testing.assert_close(other(x), layer(x))
    assert np.isfinite(other.weight.detach().numpy()).all()
