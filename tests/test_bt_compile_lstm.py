"""The compiled training step of a BTLSTM whose projection takes the dense path: what its graphs hold (the
recurrence and the projection's dense path as one op forward and one backward each, the final state's gradient passed to the recurrence op as is) and its results against eager for every use of the outputs. Speed
is measured by experiments/bt_compile.py, not here."""
import pytest
import torch
from torch._dynamo.testing import AotEagerAndRecordGraphs

from accel.nn import BTLSTM

STEPS, BATCH = 5, 4
# the loss a step takes of (output, (h_n, c_n)): the sequence only (h_n's gradient is zero), everything, or the
# final states only (eager's recurrence backward then gets no gradient for the sequence)
LOSSES = {
    "sequence": lambda out, h, c: out.square().sum(),
    "all": lambda out, h, c: out.square().sum() + (h * c).sum() + h.sum(),
    "final states": lambda out, h, c: h.square().sum() + c.sum(),
}


def step(model, x, loss):
    model.zero_grad(set_to_none=True)
    out, (h, c) = model(x)
    LOSSES[loss](out, h, c).backward()
    return [out.detach(), h.detach(), c.detach()] + [p.grad.clone() for p in model.parameters() if p.requires_grad]


def ops(graphs) -> set:
    return {str(node.target) for graph in graphs for node in graph.graph.nodes if node.op == "call_function"}


@pytest.mark.parametrize("loss", list(LOSSES))
def test_compiled_lstm_step_graphs_and_results(seed, loss):
    torch.manual_seed(seed)
    model = BTLSTM(64, 32, batch_first=True).double()
    assert model.input_projection.uses_dense(STEPS * BATCH)  # 20 rows: the dense path, under compile too
    torch._dynamo.reset()
    backend = AotEagerAndRecordGraphs()
    compiled = torch.compile(model, backend=backend, fullgraph=True)  # fullgraph: a graph break raises
    for steps, batch in ((STEPS, BATCH), (7, 3)):  # the second size recompiles with symbolic sizes
        x = torch.randn(batch, steps, 64, dtype=torch.float64)
        got, want = step(compiled, x, loss), step(model, x, loss)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
    assert len(backend.bw_graphs) == 2
    forward, backward = ops(backend.fw_graphs), ops(backend.bw_graphs)
    assert "accel.recurrence_v2.default" in forward and "accel.recurrence_backward_v2.default" in backward
    # the input projection's dense path: the eager kernels as one op each way
    assert "accel.bt_dense_v1.default" in forward and "accel.bt_dense_backward_v1.default" in backward
    # no (T, B, H) zeros with h_n's gradient scattered in: the final state's gradient reaches the recurrence op as is
    assert not any("select_scatter" in op for op in backward), sorted(backward)


def test_compiled_lstm_weights_without_gradients(seed):
    """A frozen projection bias and a frozen hidden weight: no gradient for them, the others equal eager's."""
    torch.manual_seed(seed)
    model = BTLSTM(64, 32, batch_first=True).double()
    model.input_projection.bias.requires_grad_(False)
    model.weight_hh_l0.requires_grad_(False)
    x = torch.randn(BATCH, STEPS, 64, dtype=torch.float64)
    torch._dynamo.reset()
    got = step(torch.compile(model, backend="aot_eager", fullgraph=True), x, "all")
    assert model.input_projection.bias.grad is None and model.weight_hh_l0.grad is None
    for a, b in zip(got, step(model, x, "all")):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
