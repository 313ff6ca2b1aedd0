"""torch.compile of models with BTLinear: one graph (no break) on every contraction path, static and dynamic
batch sizes, outputs and gradients equal to eager; the dense path and the GEMM chain as accel's custom ops (the eager
kernels), never in an exported program. Compile time and speed are measured by
experiments/bt_compile.py, not here."""
import math

import pytest
import torch
from torch import nn
from torch._dynamo.testing import AotEagerAndRecordGraphs

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
    # the compiled dense path reuses the layer's workspace: the same real buffers as before
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


def graph_ops(graphs) -> set:
    return {str(node.target) for graph in graphs for node in graph.graph.nodes if node.op == "call_function"}


# what torch.compile runs each strategy as: the dense path and the GEMM chain as accel's ops (the eager kernels),
# the low-rank path as ordinary ops
COMPILED_OPS = {"dense": ("accel.bt_dense_v1.default", "accel.bt_dense_backward_v1.default"),
                "gemm": ("accel.bt_gemm_chain_v1.default", "accel.bt_gemm_chain_backward_v1.default"),
                "lowrank": (None, None)}


def small_layer(contraction, bias=True, in_shape=(4, 3, 4), out_shape=(2, 4, 3)):
    layer = BTLinear(math.prod(in_shape), math.prod(out_shape), in_shape=in_shape, out_shape=out_shape, ranks=2,
                     contraction=contraction, bias=bias).double()
    layer.max_intermediate_bytes = 4096  # the chain in several pieces of the batch, as eager on a large layer
    return layer


def step_with_input(model, x, loss="square"):
    """Output and every gradient, the input's too; ``loss="sum"`` gives the output an expanded gradient."""
    model.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    y = model(x)
    (y.square().sum() if loss == "square" else y.sum()).backward()
    return [y.detach(), x.grad] + [p.grad.clone() for p in model.parameters()]


@pytest.mark.slow
@pytest.mark.parametrize("contraction", list(COMPILED_OPS))
@pytest.mark.parametrize("bias", [True, False])
def test_compiled_ops_match_eager_and_appear_in_graphs(seed, contraction, bias):
    """aot_eager, fullgraph, two batch sizes (the second symbolic): outputs and gradients equal eager's, and the
    forward and backward graphs call accel's ops for the dense path and the chain (the workspace's buffers reused)."""
    torch.manual_seed(seed)
    layer = small_layer(contraction, bias)
    assert layer.chunk_size(9) < 9  # the chain splits the batch: the op runs the pieces
    torch._dynamo.reset()
    backend = AotEagerAndRecordGraphs()
    compiled = torch.compile(layer, fullgraph=True, backend=backend)
    for rows, loss in ((9, "square"), (13, "sum"), (5, "square")):
        x = torch.randn(rows, layer.in_features, dtype=torch.float64)
        for a, b in zip(step_with_input(compiled, x, loss), step_with_input(layer, x, loss)):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
    forward_op, backward_op = COMPILED_OPS[contraction]
    forward, backward = graph_ops(backend.fw_graphs), graph_ops(backend.bw_graphs)
    if forward_op is None:
        assert not any("accel" in op for op in forward | backward), sorted(forward | backward)
    else:
        assert forward_op in forward and backward_op in backward, (sorted(forward), sorted(backward))
        assert backward_op not in forward and len(backend.fw_graphs) == 2  # static, then a dynamic batch


@pytest.mark.slow
@pytest.mark.parametrize("contraction", ["dense", "gemm"])
def test_compiled_ops_input_without_gradient(seed, contraction):
    """A first layer (the input needs no gradient): the backward op skips the input's gradient."""
    torch.manual_seed(seed)
    layer = small_layer(contraction)
    x = torch.randn(9, layer.in_features, dtype=torch.float64)
    torch._dynamo.reset()
    got = step(torch.compile(layer, fullgraph=True, backend="aot_eager"), x)
    for a, b in zip(got, step(layer, x)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


@pytest.mark.slow
@pytest.mark.parametrize("contraction", list(COMPILED_OPS))
def test_inductor_compiled_ops_match_eager(seed, contraction):
    """The default backend (Inductor) on each strategy, a static then a symbolic batch."""
    torch.manual_seed(seed)
    layer = small_layer(contraction)
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True)
    for rows in (9, 13):
        x = torch.randn(rows, layer.in_features, dtype=torch.float64)
        for a, b in zip(step_with_input(compiled, x), step_with_input(layer, x)):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


@pytest.mark.slow
@pytest.mark.parametrize("contraction", ["dense", "gemm"])
def test_compiled_ops_under_autocast_bf16(seed, contraction):
    """Under CPU autocast (bfloat16) the ops take the product's dtype as eager does: same dtype, close values."""
    torch.manual_seed(seed)
    layer = small_layer(contraction).float()
    x = torch.randn(9, layer.in_features)
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    results = []
    for model in (compiled, layer):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model.zero_grad(set_to_none=True)
            y = model(x)
        y.float().square().sum().backward()
        results.append([y.detach()] + [p.grad.clone() for p in layer.parameters()])
    assert results[0][0].dtype == results[1][0].dtype == torch.bfloat16
    for a, b in zip(*results):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2 * b.abs().max().item())


@pytest.mark.parametrize("contraction", list(COMPILED_OPS))
def test_exported_program_holds_ordinary_ops_only(seed, contraction):
    """torch.export (what ONNX builds on) never records accel's BT ops: an exported program runs anywhere."""
    torch.manual_seed(seed)
    layer = small_layer(contraction)
    x = torch.randn(9, layer.in_features, dtype=torch.float64)
    program = torch.export.export(layer, (x,))
    ops = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert not any("accel" in op for op in ops), sorted(ops)
    torch.testing.assert_close(program.module()(x), layer(x), rtol=1e-9, atol=1e-11)


def test_dense_ops_pass_opcheck(seed):
    from accel.nn.bt._dense import RebuildWorkspace, rebuild_operands

    torch.manual_seed(seed)
    layer = small_layer("dense")
    workspace = RebuildWorkspace()
    left, right = (t.detach().requires_grad_() for t in rebuild_operands(layer.core, list(layer.factors)))
    out0 = layer.out_shape[0]
    for rows, bias in ((5, layer.bias), (70, None)):  # 70 rows: W copied into the (I, J) layout
        x = torch.randn(rows, layer.in_features, dtype=torch.float64, requires_grad=True)
        bias = None if bias is None else bias.detach().requires_grad_()
        torch.library.opcheck(torch.ops.accel.bt_dense_v1.default, (x, left, right, bias, out0, workspace.key_tensor))
        grad_y = torch.randn(rows, layer.out_features, dtype=torch.float64)
        torch.library.opcheck(torch.ops.accel.bt_dense_backward_v1.default,
                              (grad_y, x.detach(), left.detach(), right.detach(), out0, workspace.key_tensor,
                               [True, True, True, bias is not None]))


@pytest.mark.parametrize("in_shape,out_shape", [((4, 3, 4), (2, 4, 3)), ((6, 5), (4, 3)), ((3, 2, 4, 2), (2, 2, 3, 2))])
def test_gemm_chain_ops_pass_opcheck(seed, in_shape, out_shape):
    from accel.nn.bt._contract import mode_matrices

    torch.manual_seed(seed)
    layer = small_layer("gemm", in_shape=in_shape, out_shape=out_shape)
    layer.max_intermediate_bytes = 2048
    mode, merged, first = (mode_matrices(layer.core.detach(), [f.detach() for f in layer.factors]))
    mode = [m.contiguous().requires_grad_() for m in mode]
    merged, first = merged.contiguous().requires_grad_(), first.contiguous().requires_grad_()
    x = torch.randn(9, layer.in_features, dtype=torch.float64, requires_grad=True)
    assert layer.chunk_size(9) < 9
    shapes = [list(in_shape), list(out_shape), list(layer.ranks), layer.max_intermediate_bytes]
    key = layer.workspace.key_tensor
    torch.library.opcheck(torch.ops.accel.bt_gemm_chain_v1.default, (x, merged, first, mode, *shapes, key))
    weights = [merged.detach(), first.detach(), [m.detach() for m in mode]]
    y = torch.ops.accel.bt_gemm_chain_v1(x.detach(), *weights, *shapes, key)
    grad_y = torch.randn_like(y)
    for need_x in (True, False):  # the forward's kept intermediates, then (cleared) the forward run again
        torch.library.opcheck(torch.ops.accel.bt_gemm_chain_backward_v1.default,
                              (grad_y, x.detach(), *weights, *shapes, key, need_x))
        layer.workspace.clear()


@pytest.mark.parametrize("between", ["call again", "clear"])
def test_gemm_chain_backward_after_its_intermediates_were_replaced(seed, between):
    """The layer called again (or its workspace cleared) between a compiled forward and its backward: the backward
    runs the forward again instead of taking the other call's intermediates."""
    torch.manual_seed(seed)
    layer = small_layer("gemm")
    x, other = torch.randn(9, layer.in_features, dtype=torch.float64), torch.randn(9, layer.in_features,
                                                                                   dtype=torch.float64)
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    for model in (compiled, layer):
        model.zero_grad(set_to_none=True)
        y = model(x)
        if between == "call again":
            model(other).sum().backward()  # its own forward and backward, in between
        else:
            layer.workspace.clear()
        y.square().sum().backward()
        if model is compiled:
            got = [y.detach()] + [p.grad.clone() for p in layer.parameters()]
    want = [y.detach()] + [p.grad.clone() for p in layer.parameters()]
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_gemm_chain_backward_takes_the_kept_intermediates(seed, monkeypatch, backend):
    """A compiled step runs the chain's forward once: the backward op finds its forward's intermediates."""
    import accel.nn.bt._compiled as compiled_ops

    calls = []
    forward_pieces = compiled_ops._forward_pieces
    monkeypatch.setattr(compiled_ops, "_forward_pieces", lambda *a: calls.append(1) or forward_pieces(*a))
    torch.manual_seed(seed)
    layer = small_layer("gemm")
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, backend=backend)
    for rows in (9, 13):
        calls.clear()
        step_with_input(compiled, torch.randn(rows, layer.in_features, dtype=torch.float64))
        assert len(calls) == 1


@pytest.mark.slow
def test_layer_used_twice_in_one_compiled_graph(seed):
    """Two calls of one layer in a graph: the second forward replaces the first one's kept intermediates."""
    torch.manual_seed(seed)
    layer = small_layer("gemm", in_shape=(4, 3, 4), out_shape=(4, 3, 4))

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = layer

        def forward(self, x):
            return self.layer(torch.tanh(self.layer(x)))

    model = Twice()
    x = torch.randn(9, layer.in_features, dtype=torch.float64)
    torch._dynamo.reset()
    for a, b in zip(step_with_input(torch.compile(model, fullgraph=True, backend="aot_eager"), x),
                    step_with_input(model, x)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


@pytest.mark.slow
def test_compiled_graph_ops(seed):
    """Every strategy in one model compiles into one graph: the dense path and the chain as accel's ops, the
    low-rank path as aten ops."""
    torch.manual_seed(seed)
    model = model_reaching_every_path()
    graphs = []

    def backend(graph_module, example_inputs):
        graphs.append(str(graph_module.graph))
        return graph_module.forward

    torch._dynamo.reset()
    torch.compile(model, fullgraph=True, backend=backend)(torch.randn(6, 4096, dtype=torch.float64))
    assert len(graphs) == 1
    assert "accel.bt_gemm_chain_v1" in graphs[0] and "accel.bt_dense_v1" in graphs[0], graphs
