"""torch.compile of models with BTLinear: one graph (no break) on every contraction path, static and dynamic
batch sizes, outputs and gradients equal to eager. Compile time and speed are measured by
experiments/bt_compile.py, not here."""
import pytest
import torch
from torch import nn

from accel.nn import BTLinear
from accel.nn.bt._paths import contraction_method


def model_reaching_every_path():
    """BTLinears whose contraction="auto" picks the GEMM chain (a wide input) and the rebuilt weight (full
    ranks), and one forced onto the low-rank path."""
    chain = BTLinear(4096, 64, in_shape=(16, 16, 16), out_shape=(4, 4, 4), ranks=2)
    dense = BTLinear(64, 32, in_shape=(4, 4, 4), out_shape=(4, 4, 2), ranks=(16, 16, 8), num_blocks=1)
    lowrank = BTLinear(32, 64, in_shape=(4, 8), out_shape=(16, 4), ranks=2, contraction="lowrank")
    # float64: compiled and eager may contract in another order (a dynamic batch's plan, pieces)
    return nn.Sequential(chain, nn.Tanh(), dense, nn.Tanh(), lowrank).double()


def step(model, x):
    model.zero_grad(set_to_none=True)
    y = model(x)
    y.square().sum().backward()
    return [y.detach()] + [p.grad.clone() for p in model.parameters()]


@pytest.mark.slow
def test_compile_no_graph_break_static_and_dynamic_batch(seed):
    """Graph breaks are Dynamo's: the aot_eager backend (Dynamo and AOTAutograd, forward and backward graphs,
    no code generation) shows them at a fraction of Inductor's compile time; Inductor is tested below."""
    torch.manual_seed(seed)
    model = model_reaching_every_path()
    keys = [layer._key() for layer in model[::2]]
    assert [contraction_method(*k, layer.contraction, 6) for k, layer in zip(keys, model[::2])] == ["gemm", "dense",
                                                                                                   "lowrank"]
    x = torch.randn(6, 4096, dtype=torch.float64)
    eager = step(model, x)
    workspace = dict(model[2].workspace._buffers)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")  # fullgraph: a graph break raises
    for rows in (6, 9, 13):  # 9: Dynamo recompiles with a symbolic batch
        batch_x = x if rows == 6 else torch.randn(rows, 4096, dtype=torch.float64)
        got = step(compiled, batch_x)
        want = eager if rows == 6 else step(model, batch_x)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
    assert sum(torch._dynamo.utils.counters["graph_break"].values()) == 0
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] <= 2  # static, then one dynamic graph
    # the traced dense path never touches the layer's workspace: the same real buffers as before
    assert {k: v.data_ptr() for k, v in model[2].workspace._buffers.items()} == \
        {k: v.data_ptr() for k, v in workspace.items()}
    assert all(type(v) is torch.Tensor for v in model[2].workspace._buffers.values())
    torch.testing.assert_close(step(model, x)[0], eager[0], rtol=0, atol=0)


def test_explain_default_layer_has_no_break(seed):
    """torch._dynamo.explain of a default BTLinear (the plan is a constant: no cost model in the graph)."""
    torch.manual_seed(seed)
    layer = BTLinear(4096, 64)
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(layer)(torch.randn(5, 4096))
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1, explanation.break_reasons


@pytest.mark.slow
def test_inductor_default_path_matches_eager(seed):
    torch.manual_seed(seed)
    layer = BTLinear(4096, 64, in_shape=(16, 16, 16), out_shape=(4, 4, 4), ranks=2)  # auto: the GEMM chain
    x = torch.randn(6, 4096)
    eager = step(layer, x)
    torch._dynamo.reset()
    for a, b in zip(step(torch.compile(layer, fullgraph=True), x), eager):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_workspace_copies_start_empty(seed):
    """A deep copy or a pickled layer gets its own empty workspace and computes the same."""
    import copy
    import io

    torch.manual_seed(seed)
    layer = BTLinear(24, 12, in_shape=(2, 3, 4), out_shape=(3, 2, 2), ranks=2, contraction="dense")
    x = torch.randn(5, 24)
    layer(x).sum().backward()
    buffer = io.BytesIO()
    torch.save(layer, buffer)
    buffer.seek(0)
    for other in (copy.deepcopy(layer), torch.load(buffer, weights_only=False)):
        assert other.workspace is not layer.workspace and not other.workspace._buffers
        torch.testing.assert_close(other(x), layer(x), rtol=0, atol=0)
    assert layer.workspace._buffers


@pytest.mark.slow
def test_compiled_graph_holds_ordinary_ops_only(seed):
    """Every strategy compiles into aten ops: no accel custom op, nothing kept outside the graph."""
    torch.manual_seed(seed)
    model = model_reaching_every_path()
    graphs = []

    def backend(graph_module, example_inputs):
        graphs.append(str(graph_module.graph))
        return graph_module.forward

    torch._dynamo.reset()
    torch.compile(model, fullgraph=True, backend=backend)(torch.randn(6, 4096, dtype=torch.float64))
    assert graphs and not any("accel" in g for g in graphs), graphs
