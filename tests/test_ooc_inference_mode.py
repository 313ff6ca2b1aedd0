"""accel.gemm and OutOfCoreLinear under torch.inference_mode behave as torch.mm and nn.Linear do: inputs and
layers made there work inside and outside it, and where torch refuses (an inference tensor saved for backward)
accel refuses with torch's own error."""
import gemm_helpers
import pytest
import torch
from torch import nn

import accel
from accel.nn import OutOfCoreLinear
from accel.ooc import Engine

seeded_global_rng = gemm_helpers.seeded_global_rng  # autouse fixture: torch's global generator seeded per test

ENGINE = dict(devices=["cpu", "cpu"], memory_limit=2 * 40_000)  # small: many blocks and slabs
SAVED_FOR_BACKWARD = "Inference tensors cannot be saved for backward"


def made_in_inference_mode(*shape, generator, dtype=torch.float32):
    values = torch.randn(*shape, generator=generator, dtype=dtype)
    with torch.inference_mode():
        made = values.clone()
    assert made.is_inference()
    return made


def test_gemm_input_made_in_inference_mode_inside_and_outside(seed):
    generator = torch.Generator().manual_seed(seed)
    a, b = made_in_inference_mode(40, 30, generator=generator), torch.randn(30, 20, generator=generator)
    engine = Engine(**ENGINE)
    with torch.inference_mode():
        torch.testing.assert_close(accel.gemm(a, b, **ENGINE), torch.mm(a, b))
        torch.testing.assert_close(engine.gemm(b, a, trans_a=True, trans_b=True), torch.mm(b.t(), a.t()))
    torch.testing.assert_close(accel.gemm(a, b, **ENGINE), torch.mm(a, b))
    with torch.no_grad():
        torch.testing.assert_close(engine.gemm(a, b), torch.mm(a, b))


def test_persistent_cache_never_keeps_inference_tiles(seed):
    """An inference tensor written in place inside inference mode bumps no version counter: its tiles must
    not outlive the call, even on an engine that keeps tiles between calls."""
    generator = torch.Generator().manual_seed(seed)
    engine = Engine(["cpu"], memory_limit=40_000, persist_cache=True)
    a = made_in_inference_mode(50, 40, generator=generator, dtype=torch.float64)
    b = made_in_inference_mode(40, 30, generator=generator, dtype=torch.float64)
    with torch.inference_mode():
        first = engine.gemm(a, b)
        assert len(engine.workers[0].cache) == 0  # (a plain tensor's tiles would stay: persist_cache=True)
        b.mul_(-2.0)  # no version bump: only the tile lifetime keeps the next call right
        second = engine.gemm(a, b)
    torch.testing.assert_close(first, a @ (b / -2.0))
    torch.testing.assert_close(second, a @ b)
    engine.gemm(a.clone(), b.clone())  # the control: plain tensors' tiles do stay
    assert len(engine.workers[0].cache) > 0


def test_gemm_autograd_with_inference_operands_as_torch(seed):
    generator = torch.Generator().manual_seed(seed)
    a = torch.randn(12, 9, generator=generator, dtype=torch.float64, requires_grad=True)
    b = torch.randn(9, 7, generator=generator, dtype=torch.float64, requires_grad=True)
    c = made_in_inference_mode(7, generator=generator, dtype=torch.float64)
    # C is never saved for backward: torch.addmm takes an inference C, and so does accel.gemm
    accel.gemm(a, b, c, beta=0.5, **ENGINE).square().sum().backward()
    grads = a.grad, b.grad
    a.grad = b.grad = None
    torch.addmm(c, a, b, beta=0.5).square().sum().backward()
    torch.testing.assert_close(grads, (a.grad, b.grad))
    # an inference operand whose partner needs a gradient must be saved: torch refuses, and so does accel
    frozen = made_in_inference_mode(12, 9, generator=generator, dtype=torch.float64)
    with pytest.raises(RuntimeError, match=SAVED_FOR_BACKWARD):
        torch.mm(frozen, b)
    with pytest.raises(RuntimeError, match=SAVED_FOR_BACKWARD):
        accel.gemm(frozen, b, **ENGINE)


def test_layer_input_made_in_inference_mode_inside_and_outside(seed):
    torch.manual_seed(seed)
    linear = nn.Linear(30, 20)
    layer = OutOfCoreLinear.from_linear(linear, **ENGINE)
    x = made_in_inference_mode(6, 30, generator=torch.Generator().manual_seed(seed))
    with torch.inference_mode():
        torch.testing.assert_close(layer(x), linear(x))
    with torch.no_grad():
        torch.testing.assert_close(layer(x), linear(x))
    for module in (linear, layer):  # with a graph to record, both refuse to save x, in torch's words
        with pytest.raises(RuntimeError, match=SAVED_FOR_BACKWARD):
            module(x)


def test_layer_constructed_in_inference_mode_then_used_there(seed):
    with torch.inference_mode():
        torch.manual_seed(seed)
        linear = nn.Linear(30, 20)
        torch.manual_seed(seed)
        layer = OutOfCoreLinear(30, 20, **ENGINE)  # the same initialisation draws as nn.Linear
        assert layer.weight.is_inference()
        torch.testing.assert_close(layer.weight, linear.weight)
        x = torch.randn(5, 30)
        torch.testing.assert_close(layer(x), linear(x))
        from_linear = OutOfCoreLinear.from_linear(linear, **ENGINE)
        torch.testing.assert_close(from_linear(x), linear(x))
    plain = torch.randn(4, 30)  # and outside inference mode, as nn.Linear made there
    with torch.no_grad():
        torch.testing.assert_close(layer(plain), linear(plain))
    torch.testing.assert_close(layer(plain).detach(), linear(plain).detach())
