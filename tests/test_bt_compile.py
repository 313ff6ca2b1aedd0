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
    ranks), and two forced onto the opt_einsum and the low-rank paths."""
    chain = BTLinear(4096, 64, in_shape=(16, 16, 16), out_shape=(4, 4, 4), ranks=2)
    dense = BTLinear(64, 64, in_shape=(4, 4, 4), out_shape=(4, 4, 4), ranks=16, num_blocks=1)
    einsum = BTLinear(64, 32, in_shape=(4, 4, 4), out_shape=(2, 4, 4), ranks=3, contraction="einsum")
    lowrank = BTLinear(32, 64, in_shape=(4, 8), out_shape=(16, 4), ranks=2, contraction="lowrank")
    # float64: compiled and eager may contract in another order (a dynamic batch's plan, pieces)
    return nn.Sequential(chain, nn.Tanh(), dense, nn.Tanh(), einsum, nn.Tanh(), lowrank).double()


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
                                                                                                   "einsum", "lowrank"]
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
    # the compiled dense path runs the eager kernels in the layer's workspace: the same real buffers
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


@pytest.mark.parametrize("need_x", [False, True])
@pytest.mark.parametrize("batch", [5, 30])  # under / over the 24 input features: batched-GEMM / flat layout
def test_compiled_dense_op_passes_opcheck(seed, need_x, batch):
    """The dense path's custom op (used under torch.compile): fake shapes, autograd and schema checked by torch."""
    from accel.nn.bt._dense import rebuild_operands
    from accel.nn.bt._traced import _rebuild_linear_op

    torch.manual_seed(seed)
    layer = BTLinear(24, 12, in_shape=(2, 3, 4), out_shape=(3, 2, 2), ranks=2, dtype=torch.float64)
    left, right = rebuild_operands(layer.core, list(layer.factors))
    x = torch.randn(batch, 24, dtype=torch.float64, requires_grad=need_x)
    bias = layer.bias.detach()
    torch.library.opcheck(_rebuild_linear_op, (x, left, right, bias, 3, layer.workspace.key))
    torch.library.opcheck(_rebuild_linear_op, (x, left, right, None, 3, layer.workspace.key))
    y = _rebuild_linear_op(x, left, right, bias, 3, layer.workspace.key)
    torch.testing.assert_close(y, x @ layer.to_dense().t() + bias, rtol=1e-10, atol=1e-12)
    assert torch.autograd.gradcheck(lambda x, a, b, c: _rebuild_linear_op(x, a, b, c, 3, layer.workspace.key),
                                    (x.detach().requires_grad_(need_x), left.detach().requires_grad_(),
                                     right.detach().requires_grad_(), bias.clone().requires_grad_()))


def test_workspace_copies_start_empty_under_their_own_key(seed):
    """The compiled dense op finds a layer's workspace by key: a deep copy or a pickled layer gets its own."""
    import copy
    import io

    from accel.nn.bt._dense import workspace_by_key

    torch.manual_seed(seed)
    layer = BTLinear(24, 12, in_shape=(2, 3, 4), out_shape=(3, 2, 2), ranks=2, contraction="dense")
    x = torch.randn(5, 24)
    layer(x).sum().backward()
    buffer = io.BytesIO()
    torch.save(layer, buffer)
    buffer.seek(0)
    for other in (copy.deepcopy(layer), torch.load(buffer, weights_only=False)):
        assert other.workspace is not layer.workspace and other.workspace.key != layer.workspace.key
        assert workspace_by_key(other.workspace.key) is other.workspace and not other.workspace._buffers
        torch.testing.assert_close(other(x), layer(x), rtol=0, atol=0)
    assert workspace_by_key(layer.workspace.key) is layer.workspace and layer.workspace._buffers


def factorized_layers(max_intermediate_bytes=16 * 1024):
    """Layers on the chain and the einsum path whose eager product splits a batch of 17 or more rows into
    pieces (small `max_intermediate_bytes`): there a compiled layer runs the opaque op."""
    chain = BTLinear(64, 256, in_shape=(4, 4, 4), out_shape=(4, 8, 8), ranks=4, contraction="gemm")
    einsum = BTLinear(64, 256, in_shape=(4, 4, 4), out_shape=(4, 8, 8), ranks=4, contraction="einsum")
    for layer in (chain, einsum):
        layer.max_intermediate_bytes = max_intermediate_bytes
        assert layer.chunk_size(17) < 17
    return chain, einsum


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
@pytest.mark.parametrize("x_needs_grad", [False, True])
def test_compiled_factorized_paths_run_the_eager_code(seed, backend, x_needs_grad):
    """Under torch.compile the GEMM chain and the einsum path are one opaque op running the eager product
    (bt_compiled.py): outputs and the weights' and input's gradients equal eager's bit for bit (the bias
    gradient is the compiled graph's own sum), at a second (dynamic) batch size too; no kept graph outlives
    its backward."""
    from accel.nn.bt import _compiled as bt_compiled

    torch.manual_seed(seed)
    for layer in factorized_layers():
        torch._dynamo.reset()
        compiled = torch.compile(layer, fullgraph=True, backend=backend)
        for rows in (32, 17, 40):
            x = torch.randn(rows, 64, requires_grad=x_needs_grad)
            got = step(compiled, x) + ([x.grad.clone()] if x_needs_grad else [])
            x.grad = None
            want = step(layer, x) + ([x.grad.clone()] if x_needs_grad else [])
            names = ["output"] + [name for name, _ in layer.named_parameters()] + ["input"] * x_needs_grad
            for name, a, b in zip(names, got, want):
                if name == "bias":
                    torch.testing.assert_close(a, b)
                else:
                    assert torch.equal(a, b), (layer.contraction, rows, name)
            assert not bt_compiled._GRAPHS


def test_compiled_factorized_graph_lifetime_and_second_backward(seed):
    """A forward whose backward never runs frees its kept graph with the output; no_grad keeps none; a second
    backward through the same compiled graph raises an error naming the limitation, never a wrong gradient."""
    import gc

    from accel.nn.bt import _compiled as bt_compiled

    torch.manual_seed(seed)
    layer = factorized_layers()[0]
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    x = torch.randn(24, 64)
    y = compiled(x)
    assert len(bt_compiled._GRAPHS) == 1
    del y
    gc.collect()
    assert not bt_compiled._GRAPHS
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), layer(x), rtol=0, atol=0)
    assert not bt_compiled._GRAPHS
    loss = compiled(x).sum()
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="one backward per forward"):
        loss.backward()


def test_compiled_factorized_op_passes_opcheck(seed):
    """The factorized path's custom op (used under torch.compile): fake shapes and schema checked by torch."""
    from accel.nn.bt._compiled import _forward_op

    torch.manual_seed(seed)
    layer = factorized_layers()[0]
    x = torch.randn(5, 64)
    args = (x, layer.core.detach(), [f.detach() for f in layer.factors], [4, 4, 4], [4, 8, 8], list(layer.ranks),
            "gemm", layer.max_intermediate_bytes, False, False)
    torch.library.opcheck(_forward_op, args, test_utils=("test_schema", "test_faketensor"))
    torch.testing.assert_close(_forward_op(*args)[0], layer(x) - layer.bias, rtol=1e-6, atol=1e-6)


def test_compiled_factorized_path_is_one_opaque_op_where_eager_splits_the_batch(seed):
    """Dynamo's graph holds the factorized product as the one op where eager splits the batch into pieces (no
    traced GEMMs or einsums to regenerate); where the batch is one piece it holds the traced ops."""
    torch.manual_seed(seed)
    graphs = []

    def recording_backend(graph_module, example_inputs):
        graphs.append([str(node.target) for node in graph_module.graph.nodes if node.op == "call_function"])
        return graph_module.forward

    for max_intermediate_bytes, opaque in ((16 * 1024, True), (8 * 2**20, False)):
        for layer in factorized_layers(16 * 1024):
            layer.max_intermediate_bytes = max_intermediate_bytes
            torch._dynamo.reset()
            torch.compile(layer, fullgraph=True, backend=recording_backend)(torch.randn(24, 64))
            traced = [t for t in graphs[-1] for op in ("matmul", "bmm", "einsum", "mm") if op in t]
            assert ("accel.bt_factorized.default" in graphs[-1]) == opaque and bool(traced) != opaque, graphs[-1]
