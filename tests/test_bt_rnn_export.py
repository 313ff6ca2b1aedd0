"""torch.export, torch.onnx.export (dynamo) and torch.compile of BT RNNs that have been run and trained:
dynamic batch and sequence length, results equal to eager, and the eager module unchanged afterwards."""
import pytest
import torch
from torch.export import Dim

from accel.nn import BTGRU, BTLSTM, BTRNN

INPUT, HIDDEN = 24, 6
CLASSES = {"lstm": BTLSTM, "gru": BTGRU, "rnn_relu": BTRNN}


class Outputs(torch.nn.Module):
    """The RNN with its outputs flattened to a tuple of tensors (what ONNX returns)."""

    def __init__(self, rnn):
        super().__init__()
        self.rnn = rnn

    def forward(self, x):
        out, state = self.rnn(x)
        return (out, *(state if isinstance(state, tuple) else (state,)))


def trained(kind, **kwargs):
    """A layer after one optimizer step (the state a user exports), in eval mode."""
    extra = {"nonlinearity": "relu"} if kind == "rnn_relu" else {}
    rnn = CLASSES[kind](INPUT, HIDDEN, in_shape=(4, 6), hidden_shape=(3, 2), ranks=2, **extra, **kwargs)
    optimizer = torch.optim.Adam(rnn.parameters(), lr=0.01)
    x = torch.randn(5, 3, INPUT).transpose(0, 1) if rnn.batch_first else torch.randn(5, 3, INPUT)
    rnn(x)[0].square().mean().backward()
    optimizer.step()
    optimizer.zero_grad()
    return Outputs(rnn).eval()


def fresh_input(model, steps, batch):
    x = torch.randn(steps, batch, INPUT)
    return x.transpose(0, 1).contiguous() if model.rnn.batch_first else x


def dynamic(model):
    steps, batch = Dim("steps", min=2, max=512), Dim("batch", min=2, max=512)
    return {"x": {1: steps, 0: batch} if model.rnn.batch_first else {0: steps, 1: batch}}


def assert_unchanged(model, x, expected):
    """The eager module still returns real tensors equal to its outputs before the export."""
    got = model(x)
    for a, b in zip(got, expected):
        assert type(a) is torch.Tensor
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.slow
@pytest.mark.parametrize("kind,options", [("lstm", {"num_layers": 2, "bidirectional": True}),
                                          ("gru", {"batch_first": True}), ("rnn_relu", {})])
def test_torch_export_dynamic_batch_and_length(seed, kind, options):
    torch.manual_seed(seed)
    model = trained(kind, **options)
    x = fresh_input(model, 5, 3)
    before = model(x)
    program = torch.export.export(model, (x,), dynamic_shapes=dynamic(model))
    targets = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert "accel.recurrence_v2.default" in targets  # one node per direction, not a loop unrolled at T=5
    for steps, batch in ((5, 3), (11, 2), (3, 7)):
        x_new = fresh_input(model, steps, batch)
        for a, b in zip(program.module()(x_new), model(x_new)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert_unchanged(model, x, before)


@pytest.mark.slow
@pytest.mark.parametrize("kind,options", [("lstm", {"bidirectional": True}), ("gru", {"num_layers": 2}),
                                          ("rnn_relu", {"batch_first": True})])
def test_onnx_export_dynamic_batch_and_length_matches_onnxruntime(seed, kind, options, tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime")
    torch.manual_seed(seed)
    model = trained(kind, **options)
    x = fresh_input(model, 5, 3)
    before = model(x)
    program = torch.onnx.export(model, (x,), dynamic_shapes=dynamic(model), dynamo=True, verbose=False)
    assert any(node.op_type in ("LSTM", "GRU", "RNN") for node in program.model.graph)
    path = tmp_path / "rnn.onnx"
    program.save(str(path))
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for steps, batch in ((5, 3), (9, 4)):
        x_new = fresh_input(model, steps, batch)
        got = session.run(None, {session.get_inputs()[0].name: x_new.numpy()})
        for a, b in zip(got, model(x_new)):
            torch.testing.assert_close(torch.from_numpy(a), b.detach(), rtol=1e-4, atol=1e-5)
    assert_unchanged(model, x, before)


@pytest.mark.slow
def test_compile_training_step_has_no_graph_break_and_matches_eager(seed):
    """fullgraph=True fails on any graph break; forward and every gradient equal eager's."""
    torch.manual_seed(seed)
    model = trained("lstm", batch_first=True).train()
    x = fresh_input(model, 5, 3)
    compiled = torch.compile(model, fullgraph=True, dynamic=False)
    outputs = compiled(x)
    sum(o.square().sum() for o in outputs).backward()
    compiled_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    expected = model(x)
    sum(o.square().sum() for o in expected).backward()
    # inductor fuses and reorders float32 sums (a gradient sums over batch and time): tolerances of that rounding
    for a, b in zip(outputs, expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for name, parameter in model.named_parameters():
        torch.testing.assert_close(compiled_grads[name], parameter.grad, rtol=1e-4, atol=1e-5,
                                   msg=lambda m, name=name: f"{name}: {m}")
