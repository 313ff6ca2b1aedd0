"""BTLinear under tracing: torch.export with a dynamic batch, ONNX (dynamo) through onnxruntime, jit.trace and
FakeTensors, on every contraction path, on layers that have already run and trained; tracing never changes the
eager module (no FakeTensor or traced tensor left in the workspace)."""
import dataclasses
import math

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode, is_fake

from accel.nn import BTLinear
from accel.nn.bt import CostProfile
from accel.nn.bt._paths import contraction_method
from accel.nn.bt._traced import SYMBOLIC_BATCH_PLAN_ROWS, plan_rows, traced_plan

CONTRACTIONS = ["auto", "gemm", "dense", "lowrank"]
SHAPES = {2: ((6, 5), (4, 3)), 3: ((2, 3, 4), (3, 2, 2)), 4: ((3, 2, 4, 2), (2, 2, 3, 2)),
          5: ((2, 3, 2, 2, 3), (2, 2, 1, 3, 2))}


def trained_layer(contraction, seed, in_shape=(2, 3, 4), out_shape=(3, 2, 2), ranks=2):
    """A layer that has run forward+backward, taken an optimizer step and run under no_grad (its dense path's
    workspace then holds W and grad W)."""
    torch.manual_seed(seed)
    layer = BTLinear(math.prod(in_shape), math.prod(out_shape), in_shape=in_shape, out_shape=out_shape, ranks=ranks,
                     num_blocks=2, contraction=contraction)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    layer(torch.randn(6, layer.in_features)).square().sum().backward()
    optimizer.step()
    with torch.no_grad():
        layer(torch.randn(6, layer.in_features))
    return layer


def assert_close_float32(got, want):
    """float32 against float32 in another contraction order: the trained layer's outputs reach 1e4-1e5, where
    rounding alone differs by ~1e-7 of the largest output (both sides' error against float64); an absolute
    tolerance of 1e-5 failed 5 seeds in 150 on an element that cancels to near zero."""
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 + 1e-6 * want.abs().max().item())


def snapshot(layer):
    return ({k: v.clone() for k, v in layer.state_dict().items()},
            {k: v.clone() for k, v in layer.workspace._buffers.items()})


def assert_unchanged(layer, before, x, y_before):
    """Parameters and workspace as they were, all plain tensors, and eager calls give the same result."""
    state, workspace = before
    for k, v in layer.state_dict().items():
        assert not is_fake(v) and torch.equal(v, state[k])
    assert set(layer.workspace._buffers) == set(workspace)
    for v in layer.workspace._buffers.values():
        assert type(v) is torch.Tensor and not is_fake(v)
    y = layer(x)
    assert type(y) is torch.Tensor and torch.equal(y, y_before)


@pytest.mark.slow
@pytest.mark.parametrize("contraction,no_grad", [(c, False) for c in CONTRACTIONS] + [("auto", True), ("dense", True)])
def test_export_dynamic_batch(seed, contraction, no_grad):
    """Under no_grad, exporting used to leave a FakeTensor in the dense path's workspace; with grad, mm(out=) failed."""
    layer = trained_layer(contraction, seed)
    x = torch.randn(5, 24)
    y_before = layer(x)
    before = snapshot(layer)
    with torch.set_grad_enabled(not no_grad):
        program = torch.export.export(layer, (torch.randn(4, 24),), dynamic_shapes=({0: torch.export.Dim("batch")},))
    assert_unchanged(layer, before, x, y_before)
    for batch in (2, 9, 33):
        x = torch.randn(batch, 24)
        assert_close_float32(program.module()(x), layer(x))


@pytest.mark.slow
@pytest.mark.parametrize("contraction", ["gemm", "dense", "lowrank"])
def test_export_leading_dimensions_dynamic(seed, contraction):
    """A (batch, time, features) input with both leading sizes dynamic, as an RNN's projection sees it."""
    layer = trained_layer(contraction, seed)
    dims = {0: torch.export.Dim("batch"), 1: torch.export.Dim("time")}
    program = torch.export.export(layer, (torch.randn(3, 4, 24),), dynamic_shapes=(dims,))
    x = torch.randn(5, 7, 24)
    assert_close_float32(program.module()(x), layer(x))


@pytest.mark.slow
@pytest.mark.parametrize("contraction", CONTRACTIONS)
def test_jit_trace(seed, contraction):
    layer = trained_layer(contraction, seed)
    x = torch.randn(5, 24)
    y_before = layer(x)
    before = snapshot(layer)
    with pytest.warns(torch.jit.TracerWarning):  # the plan is made for the traced batch size (a constant)
        traced = torch.jit.trace(layer, (torch.randn(4, 24),))
    assert_unchanged(layer, before, x, y_before)
    for batch in (1, 4, 9):  # another batch size runs the same ops, correctly
        x = torch.randn(batch, 24)
        assert_close_float32(traced(x), layer(x))


@pytest.mark.parametrize("contraction", ["auto", "dense"])
def test_fake_tensor_call_leaves_no_fake_in_workspace(seed, contraction):
    layer = trained_layer(contraction, seed)
    x = torch.randn(5, 24)
    y_before = layer(x)
    before = snapshot(layer)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        y = layer(mode.from_tensor(torch.randn(7, 24)))
    assert is_fake(y) and y.shape == (7, 12)
    assert_unchanged(layer, before, x, y_before)


@pytest.mark.parametrize("d", sorted(SHAPES))
@pytest.mark.parametrize("contraction", ["gemm", "dense", "lowrank"])
def test_traced_product_matches_eager_twin(seed, d, contraction):
    """The traced path's ops (run here eagerly) against the eager path: outputs and every gradient."""
    torch.manual_seed(seed)
    in_shape, out_shape = SHAPES[d]
    layer = BTLinear(math.prod(in_shape), math.prod(out_shape), in_shape=in_shape, out_shape=out_shape, ranks=2,
                     num_blocks=3, contraction=contraction, dtype=torch.float64)
    x = torch.randn(11, layer.in_features, dtype=torch.float64, requires_grad=True)
    grad_out = torch.randn(11, layer.out_features, dtype=torch.float64)
    results = []
    for product in (layer._traced_product, layer._eager_product):
        y = product(x)
        results.append((y, *torch.autograd.grad(y, [x, layer.core, *layer.factors], grad_out)))
    for traced, eager in zip(*results):
        torch.testing.assert_close(traced, eager, rtol=1e-10, atol=1e-12)


def test_plan_follows_eager_choice_and_symbolic_batches():
    ucf11 = ((8, 20, 20, 18), (16, 4, 4, 4), (4, 4, 4, 4), 2)
    small = ((4, 4), (4, 4), (16, 16), 3)
    moving = ((8, 8, 5, 5), (16, 4, 2, 2), (4, 4, 4, 4), 2)
    profile = dataclasses.astuple(CostProfile())
    for key, batch, method in ((ucf11, 96, "gemm"), (small, 4096, "dense"), (moving, 256, "lowrank")):
        assert contraction_method(*key, "auto", batch) == method  # the three methods are reached by "auto"
        assert traced_plan(*key, "auto", batch, profile) == method
    # jit.trace cannot record the chain: the cheaper of the other two replaces it
    assert traced_plan(*ucf11, "auto", 96, profile, gemm_chain=False) in ("dense", "lowrank")
    assert plan_rows(7) == 7 and plan_rows(torch.tensor(7)) == 7
    from torch.fx.experimental.symbolic_shapes import ShapeEnv
    symbolic = ShapeEnv().create_unbacked_symint()  # no example size: the documented default
    assert plan_rows(symbolic) == SYMBOLIC_BATCH_PLAN_ROWS


@pytest.mark.slow
@pytest.mark.parametrize("contraction", ["auto", "gemm", "dense", "lowrank"])
def test_onnx_export_matches_onnxruntime(seed, contraction, tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    layer = trained_layer(contraction, seed)
    x = torch.randn(5, 24)
    y_before = layer(x)
    before = snapshot(layer)
    program = torch.onnx.export(layer, (torch.randn(4, 24),), dynamic_shapes=({0: torch.export.Dim("batch")},),
                                dynamo=True, verbose=False)
    assert_unchanged(layer, before, x, y_before)
    program.save(str(tmp_path / "bt.onnx"))
    session = onnxruntime.InferenceSession(str(tmp_path / "bt.onnx"))
    for batch in (3, 17):
        x = torch.randn(batch, 24)
        out = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
        expected = layer(x)
        # onnxruntime sums in its own order: float32 rounding of sums that cancel, so the bound follows the scale
        # (an absolute 1e-5 failed once in CI at 3.9e-5 on an einsum-path output)
        scale = max(1.0, expected.abs().max().item())
        torch.testing.assert_close(torch.from_numpy(out), expected, rtol=1e-4, atol=1e-4 * scale)


@pytest.mark.slow
@pytest.mark.parametrize("contraction", ["gemm", "dense", "lowrank"])
def test_strict_export(seed, contraction):
    """torch.export's strict mode traces with Dynamo: the plan is a constant there too, and the dense path stays
    ordinary ops (the custom op of torch.compile is not exported)."""
    layer = trained_layer(contraction, seed)
    program = torch.export.export(layer, (torch.randn(4, 24),), dynamic_shapes=({0: torch.export.Dim("batch")},),
                                  strict=True)
    assert "bt_rebuild_linear" not in str(program.graph)
    x = torch.randn(9, 24)
    assert_close_float32(program.module()(x), layer(x))
