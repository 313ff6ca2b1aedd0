"""OutOfCoreLinear's construction conventions: device/dtype factory arguments as nn.Linear takes them, the
meta device with to_empty() and reset_parameters(), from_linear on transformers' Conv1D, and parameters kept
(not copied) so that tied weights stay tied."""
import logging

import gemm_helpers
import pytest
import torch
from torch import nn

from accel.nn import OutOfCoreLinear
from accel.ooc import Engine

seeded_global_rng = gemm_helpers.seeded_global_rng  # autouse fixture: torch's global generator seeded per test

ENGINE = dict(devices=["cpu", "cpu"], memory_limit=2 * 40_000)  # small: many blocks and slabs


def sgd_step(module, x, target):
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    optimizer.zero_grad()
    loss = nn.functional.mse_loss(module(x), target)
    loss.backward()
    optimizer.step()
    return loss.detach()


def test_device_and_dtype_factory_arguments_as_linear():
    layer = OutOfCoreLinear(5, 3, True, "cpu", torch.float64, **ENGINE)  # nn.Linear's positional order
    reference = nn.Linear(5, 3, True, "cpu", torch.float64)
    assert layer.weight.dtype == reference.weight.dtype == torch.float64 and layer.weight.device.type == "cpu"
    assert OutOfCoreLinear(5, 3, device=torch.device("cpu"), dtype=torch.bfloat16).bias.dtype == torch.bfloat16
    with pytest.raises(ValueError, match=r"host memory: device='cuda:0'.*devices=\['cuda:0'\]"):
        OutOfCoreLinear(5, 3, device="cuda:0")
    with pytest.raises(ValueError, match="unknown device"):
        OutOfCoreLinear(5, 3, device="nowhere")


def test_meta_to_empty_reset_parameters_then_train_a_step(seed):
    layer = OutOfCoreLinear(50, 20, device="meta", **ENGINE)
    assert layer.weight.is_meta and layer.bias.is_meta
    with pytest.raises(RuntimeError, match="to_empty"):
        layer(torch.randn(2, 50))
    layer.to_empty(device="cpu")
    assert layer.weight.device.type == "cpu" and isinstance(layer.weight, nn.Parameter)
    torch.manual_seed(seed)
    layer.reset_parameters()
    torch.manual_seed(seed)
    reference = nn.Linear(50, 20)  # the same draws: nn.Linear's initialisation
    torch.testing.assert_close(layer.weight, reference.weight)
    torch.testing.assert_close(layer.bias, reference.bias)
    generator = torch.Generator().manual_seed(seed)
    x, target = torch.randn(8, 50, generator=generator), torch.randn(8, 20, generator=generator)
    torch.testing.assert_close(sgd_step(layer, x, target), sgd_step(reference, x, target))
    torch.testing.assert_close(layer.weight, reference.weight)
    torch.testing.assert_close(layer.bias, reference.bias)


def test_a_model_made_on_meta_materialises_the_layer_on_the_host():
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), OutOfCoreLinear(8, 4, **ENGINE))
    assert all(p.is_meta for p in model.parameters())  # nothing allocated, the out-of-core layer included
    model.to_empty(device="cpu")
    for module in model.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert model(torch.randn(3, 6)).shape == (3, 4)


def test_transposed_weight_layout(seed):
    torch.manual_seed(seed)
    linear = nn.Linear(30, 20, dtype=torch.float64)
    layer = OutOfCoreLinear(30, 20, dtype=torch.float64, transposed_weight=True, **ENGINE)
    assert layer.weight.shape == (30, 20)
    with torch.no_grad():
        layer.weight.copy_(linear.weight.t())
        layer.bias.copy_(linear.bias)
    x = torch.randn(7, 30, dtype=torch.float64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    y, y_ref = layer(x), linear(x_ref)
    torch.testing.assert_close(y, y_ref)
    grad = torch.randn_like(y)
    y.backward(grad)
    y_ref.backward(grad)
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(layer.weight.grad, linear.weight.grad.t())
    torch.testing.assert_close(layer.bias.grad, linear.bias.grad)
    assert "transposed_weight=True" in repr(layer)


def test_from_linear_keeps_the_parameter_objects_so_ties_stay(seed):
    torch.manual_seed(seed)
    embedding = nn.Embedding(40, 12)
    head = nn.Linear(12, 40, bias=False)
    head.weight = embedding.weight  # GPT-2's lm_head tied to wte
    model = nn.ModuleDict(dict(embedding=embedding, head=head))
    model["head"] = OutOfCoreLinear.from_linear(head, **ENGINE)
    assert model["head"].weight is embedding.weight
    before = embedding.weight.detach().clone()
    tokens = torch.randint(0, 40, (5,), generator=torch.Generator().manual_seed(seed))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    model["head"](model["embedding"](tokens)).square().mean().backward()
    optimizer.step()
    assert model["head"].weight is model["embedding"].weight and not torch.equal(before, embedding.weight)
    assert len(list(model.parameters())) == 1  # still one parameter, trained through both uses


def test_from_linear_copies_where_it_must_and_says_so(seed, caplog):
    torch.manual_seed(seed)
    linear = nn.Linear(12, 8)
    with caplog.at_level(logging.INFO, logger="accel.nn.ooc_linear"):
        layer = OutOfCoreLinear.from_linear(linear, dtype=torch.float64, **ENGINE)
    assert layer.weight is not linear.weight and layer.weight.dtype == torch.float64
    torch.testing.assert_close(layer.weight, linear.weight.double())
    assert "copies weight" in caplog.text and "copies bias" in caplog.text
    with pytest.raises(ValueError, match="takes device from the layer"):
        OutOfCoreLinear.from_linear(linear, device="cpu")


def test_from_linear_takes_transformers_conv1d(seed):
    pytorch_utils = pytest.importorskip("transformers.pytorch_utils",
                                        reason="transformers is not installed (an optional test dependency)")
    torch.manual_seed(seed)
    conv = pytorch_utils.Conv1D(20, 30)  # nf=20 outputs, nx=30 inputs; weight stored (30, 20)
    nn.init.normal_(conv.bias)
    layer = OutOfCoreLinear.from_linear(conv, **ENGINE)
    assert layer.weight is conv.weight and layer.bias is conv.bias and layer.transposed_weight
    assert (layer.in_features, layer.out_features) == (30, 20)
    x = torch.randn(2, 3, 30, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    y, y_ref = layer(x), conv(x_ref)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    y.square().sum().backward()
    grads = x.grad, layer.weight.grad.clone(), layer.bias.grad.clone()
    conv.zero_grad()
    y_ref.square().sum().backward()
    torch.testing.assert_close(grads, (x_ref.grad, conv.weight.grad, conv.bias.grad), rtol=1e-5, atol=1e-5)
    assert layer.state_dict().keys() == conv.state_dict().keys()


def test_gpt2_lm_head_stays_tied(seed):
    transformers = pytest.importorskip("transformers", reason="transformers is not installed (optional)")
    torch.manual_seed(seed)
    config = transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=1, n_head=2)
    model = transformers.GPT2LMHeadModel(config).eval()
    tokens = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        expected = model(tokens).logits
    engine = Engine(**ENGINE)
    model.lm_head = OutOfCoreLinear.from_linear(model.lm_head, engine=engine)
    model.transformer.h[0].mlp.c_fc = OutOfCoreLinear.from_linear(model.transformer.h[0].mlp.c_fc, engine=engine)
    assert model.lm_head.weight is model.transformer.wte.weight
    with torch.no_grad():
        torch.testing.assert_close(model(tokens).logits, expected, rtol=1e-4, atol=1e-4)


def test_from_linear_refuses_other_layers():
    with pytest.raises(TypeError, match="nn.Linear or a transformers Conv1D, got Conv1d"):
        OutOfCoreLinear.from_linear(nn.Conv1d(3, 3, 1))
