"""Hooks, pruning and parametrizations on a BT RNN's input projection behave as nn.Module promises on every
recurrence path: the Python loop, the fused op, torch.compile and torch.export."""
import pytest
import torch
from rnn_helpers import INPUT, flat_outputs, make
from torch import nn
from torch.nn.utils import parametrize, prune

PATHS = ["loop", "fused", "compiled", "exported"]
KINDS = ["lstm", "rnn_tanh", "gru"]


def run(model, x, path):
    """The model's flat outputs ``[out, *states]`` on ``path``."""
    model.recurrence = "loop" if path == "loop" else "fused"
    if path == "compiled":
        torch._dynamo.reset()
        return flat_outputs(*torch.compile(model, backend="aot_eager")(x))
    if path == "exported":
        program = torch.export.export(model, (x,))
        return flat_outputs(*program.module()(x))
    return flat_outputs(*model(x))


def dense_reference(model, x, zero_input=False, shift=None, core_scale=1.0):
    """The same layer as torch.nn's RNN with the hooks' effect written into its input: a first layer whose
    projection sees zeros, whose output is shifted by ``shift`` (added to ``b_ih``), whose core is scaled."""
    with torch.no_grad():
        projection = model.input_projection
        originals = [(p, p.detach().clone()) for p in (projection.core, projection.bias)]
        projection.core.mul_(core_scale)
        if shift is not None:
            projection.bias.add_(shift)
        try:
            dense = model.to_dense_module()
        finally:
            for parameter, value in originals:
                parameter.copy_(value)
        if zero_input:  # only the first layer's input projection sees zeros: deeper layers keep theirs
            dense.weight_ih_l0.zero_()
        return flat_outputs(*dense(x))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("path", PATHS)
def test_forward_hooks_and_pre_hooks_take_effect(seed, kind, path):
    torch.manual_seed(seed)
    model = make(kind, num_layers=2)
    x = torch.randn(5, 3, INPUT, dtype=torch.float64)
    shift = torch.randn(model.input_projection.out_features, dtype=torch.float64)
    calls = []
    model.input_projection.register_forward_pre_hook(lambda module, args: (torch.zeros_like(args[0]),))
    model.input_projection.register_forward_hook(lambda module, args, output: output + shift)
    model.input_projection.register_forward_hook(lambda module, args, output: calls.append(args[0].shape))
    got = run(model, x, path)
    for a, b in zip(got, dense_reference(model, x, zero_input=True, shift=shift)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
    if path in ("loop", "fused"):
        assert calls == [x.shape]  # once per forward, with the pre-hook's zeros' shape


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("path", PATHS)
def test_parametrized_projection_core(seed, kind, path):
    torch.manual_seed(seed)
    model = make(kind, bidirectional=False)

    class Double(nn.Module):
        def forward(self, core):
            return 2 * core

    x = torch.randn(4, 2, INPUT, dtype=torch.float64)
    expected = dense_reference(model, x, core_scale=2.0)
    parametrize.register_parametrization(model.input_projection, "core", Double())
    for a, b in zip(run(model, x, path), expected):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("path", ["loop", "fused", "compiled"])
def test_prune_then_train_several_steps(seed, kind, path):
    """Pruning recomputes the core in a pre-hook every forward: training runs (no 'backward through the graph
    a second time'), pruned entries stay zero, and fused equals loop afterwards."""
    torch.manual_seed(seed)
    model = make(kind, num_layers=2)
    prune.l1_unstructured(model.input_projection, "core", amount=0.5)
    mask = model.input_projection.core_mask.clone()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model.recurrence = "loop" if path == "loop" else "fused"
    step = torch.compile(model, backend="aot_eager") if path == "compiled" else model
    if path == "compiled":
        torch._dynamo.reset()
    for _ in range(3):
        x = torch.randn(5, 3, INPUT, dtype=torch.float64)
        optimizer.zero_grad()
        sum(o.square().sum() for o in flat_outputs(*step(x))).backward()
        optimizer.step()
    assert torch.equal(model.input_projection.core_orig.grad * (1 - mask), torch.zeros_like(mask))
    x = torch.randn(6, 2, INPUT, dtype=torch.float64)
    results = {}
    for recurrence in ("fused", "loop"):
        model.recurrence = recurrence
        model.zero_grad()
        outputs = flat_outputs(*model(x))
        sum(o.square().sum() for o in outputs).backward()
        assert torch.equal(model.input_projection.core, model.input_projection.core_orig * mask)
        results[recurrence] = outputs + [p.grad.clone() for p in model.parameters()]
    for a, b in zip(results["fused"], results["loop"]):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
