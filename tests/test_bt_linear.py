import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from accel.nn import BTLinear
from accel.nn.bt.linear import balanced_factors

SHAPES = {  # d -> (in_shape, out_shape)
    2: ((6, 5), (4, 3)),
    3: ((4, 3, 5), (2, 3, 2)),
    4: ((3, 2, 4, 2), (2, 2, 3, 2)),
    5: ((2, 3, 2, 2, 3), (2, 2, 1, 3, 2)),
}


@pytest.mark.parametrize("d", sorted(SHAPES))
@pytest.mark.parametrize("num_blocks,ranks", [(1, 2), (2, 3), (3, 1)])
@pytest.mark.parametrize("contraction", ["gemm", "dense", "lowrank", "auto"])
def test_contraction_equals_dense_weight(seed, d, num_blocks, ranks, contraction):
    torch.manual_seed(seed)
    in_shape, out_shape = SHAPES[d]
    layer = BTLinear(math.prod(in_shape), math.prod(out_shape), in_shape=in_shape, out_shape=out_shape, ranks=ranks,
                     num_blocks=num_blocks, contraction=contraction, dtype=torch.float64)
    x = torch.randn(2, 7, layer.in_features, dtype=torch.float64)
    reference = x @ layer.to_dense().t() + layer.bias
    torch.testing.assert_close(layer(x), reference, rtol=1e-10, atol=1e-12)
    # gradients of the fast path against the dense reference
    y = layer(x)
    grad_out = torch.randn_like(y)
    grads = torch.autograd.grad(y, [layer.core, *layer.factors, layer.bias], grad_out)
    ref_grads = torch.autograd.grad(reference, [layer.core, *layer.factors, layer.bias], grad_out)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("contraction", ["gemm", "dense", "lowrank"])
def test_gradcheck(seed, contraction):
    torch.manual_seed(seed)
    layer = BTLinear(24, 12, in_shape=(2, 3, 4), out_shape=(3, 2, 2), ranks=2, num_blocks=2,
                     contraction=contraction, dtype=torch.float64)
    x = torch.randn(3, 24, dtype=torch.float64, requires_grad=True)
    params = [layer.core, *layer.factors, layer.bias]

    def f(x, core, *rest):
        return torch.func.functional_call(layer, dict(zip(["core", *[f"factors.{k}" for k in range(3)], "bias"],
                                                          [core, *rest])), (x,))
    assert torch.autograd.gradcheck(f, (x, *params))


def test_auto_clear_cut_cases():
    """Cases where the right strategy is not in doubt: one row through a huge weight never rebuilds it; a tiny weight
    of full rank under a huge batch always does; a layer of one mode has no chain."""
    big = BTLinear(57600, 1024, in_shape=(8, 20, 20, 18), out_shape=(16, 4, 4, 4), ranks=4, num_blocks=2)
    assert big.method(1) != "dense" and not big.uses_dense(1)
    small = BTLinear(16, 16, in_shape=(4, 4), out_shape=(4, 4), ranks=16, num_blocks=3)
    assert small.method(2 ** 20) == "dense" and small.uses_dense(2 ** 20)
    one_mode = BTLinear(6, 4, in_shape=(6,), out_shape=(4,))
    assert one_mode.cost(8)["gemm"] is None and one_mode.method(8) in ("dense", "lowrank")
    assert one_mode(torch.randn(8, 6)).shape == (8, 4)
    # the grid rows of experiments/bt_speed.py: "auto" takes the strategy measured fastest there
    assert big.method(96) == "gemm"
    assert BTLinear(70200, 1024, in_shape=(10, 18, 13, 30), out_shape=(16, 4, 4, 4)).method(96) == "gemm"
    assert BTLinear(12288, 1024, in_shape=(16, 12, 8, 8), out_shape=(16, 4, 4, 4), num_blocks=4).method(128) == "lowrank"
    assert BTLinear(64, 1024, in_shape=(4, 4, 2, 2), out_shape=(16, 4, 4, 4)).method(3200) == "dense"
    assert BTLinear(1600, 256, in_shape=(8, 8, 5, 5), out_shape=(16, 4, 2, 2), ranks=2).method(256) == "lowrank"


def test_cost_profile_is_the_models_data():
    """The profile changes the decision the way its fields say, and is checked."""
    from accel.nn.bt import CostProfile

    layer = BTLinear(64, 1024, in_shape=(4, 4, 2, 2), out_shape=(16, 4, 4, 4))
    assert layer.method(3200) == "dense"
    layer.cost_profile = CostProfile(rebuild_flop_weight=1e6)  # rebuilding W made prohibitive
    assert layer.method(3200) != "dense"
    default = layer.cost(3200)
    cheap_memory = BTLinear(64, 1024, in_shape=(4, 4, 2, 2), out_shape=(16, 4, 4, 4),
                            cost_profile=CostProfile(element_flops=0.0)).cost(3200)
    assert cheap_memory["auto_dense"] == default["matmul"] + 2 * default["rebuild"]
    with pytest.raises(ValueError, match="CostProfile.element_flops"):
        CostProfile(element_flops=-1.0)
    with pytest.raises(TypeError, match="cost_profile must be"):
        BTLinear(64, 32, cost_profile={"element_flops": 1.0})


@pytest.mark.parametrize("contraction", ["gemm", "dense", "lowrank"])
def test_model_flops_equal_counted_flops(seed, contraction):
    """Each strategy's forward flops in the cost model against torch's own count (FlopCounterMode), exactly."""
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(seed)
    for in_shape, out_shape, num_blocks, batch in (((4, 3, 5), (2, 3, 2), 3, 37), ((3, 2, 4, 2), (2, 2, 3, 2), 2, 64),
                                                   ((8, 8, 5, 5), (16, 4, 2, 2), 2, 256)):
        layer = BTLinear(math.prod(in_shape), math.prod(out_shape), in_shape=in_shape, out_shape=out_shape, ranks=2,
                         num_blocks=num_blocks, bias=False, contraction=contraction)
        layer.max_intermediate_bytes = 2 ** 40  # one piece: the model counts the whole batch
        x = torch.randn(batch, layer.in_features)
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            layer(x)
        cost = layer.cost(batch)
        modelled = {"gemm": cost["gemm"], "dense": cost["rebuild"] + cost["matmul"], "lowrank": cost["lowrank"]}
        assert counter.get_total_flops() == modelled[contraction], (in_shape, contraction)


def test_removed_contractions_name_the_replacement():
    for name in ("einsum", "factorized"):
        with pytest.raises(ValueError, match=f"contraction='{name}' is no longer offered: use 'gemm'"):
            BTLinear(24, 12, contraction=name)
    layer = BTLinear(24, 12)
    with pytest.raises(ValueError, match="contraction must be one of"):
        layer.contraction = "fast"


def test_ucf11_parameter_count():
    layer = BTLinear(57600, 4 * 256, in_shape=(8, 20, 20, 18), out_shape=(4 * 4, 4, 4, 4), ranks=4, num_blocks=2,
                     bias=False)
    assert layer.num_weight_parameters == 3392 == sum(p.numel() for p in layer.parameters())
    assert int(layer.compression_ratio) == 17388
    assert 57600 * 1024 // 3392 == 17388


def test_parameter_count_formula_and_bias(seed):
    torch.manual_seed(seed)
    layer = BTLinear(60, 24, in_shape=(3, 4, 5), out_shape=(2, 3, 4), ranks=(2, 3, 4), num_blocks=3)
    expected = 3 * (3 * 2 * 2 + 4 * 3 * 3 + 5 * 4 * 4 + 2 * 3 * 4)
    assert layer.num_weight_parameters == expected
    assert layer.num_parameters == expected + 24 == sum(p.numel() for p in layer.parameters())


def test_initial_weight_variance_matches_nn_linear(seed):
    torch.manual_seed(seed)
    in_features, out_features, trials = 640, 96, 24
    variances = torch.stack([BTLinear(in_features, out_features, ranks=3, num_blocks=2).to_dense().detach().var()
                             for _ in range(trials)])
    linear_var = torch.stack([nn.Linear(in_features, out_features).weight.detach().var() for _ in range(trials)])
    target = 1.0 / (3 * in_features)
    assert abs(linear_var.mean().item() / target - 1) < 0.02  # nn.Linear's default, the target itself
    # entries of one W share factors, so per-layer variances scatter; the mean over layers must match
    standard_error = variances.std().item() / math.sqrt(trials)
    assert abs(variances.mean().item() - target) < 5 * standard_error + 0.02 * target
    assert abs(variances.mean().item() / target - 1) < 0.25


def test_any_leading_shape_and_state_dict(seed):
    torch.manual_seed(seed)
    layer = BTLinear(30, 12, ranks=2)
    assert layer(torch.randn(30)).shape == (12,)
    assert layer(torch.randn(2, 3, 4, 30)).shape == (2, 3, 4, 12)
    assert layer(torch.randn(0, 30)).shape == (0, 12)
    clone = BTLinear(30, 12, ranks=2)
    clone.load_state_dict(layer.state_dict())
    x = torch.randn(5, 30)
    torch.testing.assert_close(clone(x), layer(x))


def test_automatic_shapes():
    layer = BTLinear(57600, 256)
    assert math.prod(layer.in_shape) == 57600 and math.prod(layer.out_shape) == 256
    assert layer.num_modes == 4 and max(layer.in_shape) <= 16
    assert balanced_factors(57600, 4) == (16, 16, 15, 15)
    assert BTLinear(7, 12).in_shape == (7,)  # a prime gives one mode
    assert BTLinear(24, 10, in_shape=(4, 6)).out_shape == (5, 2)


def test_from_linear_copies_bias_and_reports_error(seed):
    torch.manual_seed(seed)
    linear = nn.Linear(20, 6)
    layer = BTLinear.from_linear(linear, in_shape=(4, 5), out_shape=(2, 3), ranks=(8, 15), num_blocks=1)
    assert layer.reconstruction_error < 1e-5
    x = torch.randn(4, 20)
    torch.testing.assert_close(layer(x), linear(x), rtol=1e-4, atol=1e-5)
    with pytest.raises(TypeError, match="nn.Linear"):
        BTLinear.from_linear(nn.Conv1d(2, 2, 1))


def test_errors_name_the_numbers():
    with pytest.raises(ValueError, match=r"in_shape=\(4, 4\) has product 16, but in_features=20"):
        BTLinear(20, 6, in_shape=(4, 4), out_shape=(2, 3))
    with pytest.raises(ValueError, match=r"ranks\[1\]=16 must be in \[1, I_1\*J_1\] = \[1, 15\]"):
        BTLinear(20, 6, in_shape=(4, 5), out_shape=(2, 3), ranks=(2, 16))
    with pytest.raises(ValueError, match="same number of modes"):
        BTLinear(20, 6, in_shape=(4, 5), out_shape=(6,))
    layer = BTLinear(20, 6, in_shape=(4, 5), out_shape=(2, 3))
    with pytest.raises(ValueError, match=r"expected input of shape \(\*, 20\), got \(3, 21\)"):
        layer(torch.randn(3, 21))
    with pytest.raises(ValueError, match=r"got \(\)"):
        layer(torch.tensor(1.0))
    with pytest.raises(ValueError, match="contraction must be one of"):
        BTLinear(20, 6, contraction="fast")
    with pytest.warns(UserWarning, match=r"ranks=100 exceeds the size I_k\*J_k of mode\(s\) \[0, 1\] \(mode sizes "
                      r"\(8, 15\)\): capped to ranks=\(8, 15\)"):
        assert BTLinear(20, 6, in_shape=(4, 5), out_shape=(2, 3), ranks=100).ranks == (8, 15)  # an int is capped
    with pytest.warns(UserWarning, match=r"mode\(s\) \[0\] .*capped to ranks=\(8, 10\)"):
        assert BTLinear(20, 6, in_shape=(4, 5), out_shape=(2, 3), ranks=10).ranks == (8, 10)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a rank within every mode's size: no warning
        assert set(BTLinear(256, 160, ranks=np.int64(3)).ranks) == {3}


@pytest.mark.parametrize("contraction", ["gemm"])
def test_cpu_pieces_match_one_piece(seed, contraction):
    """The batch is split on CPU to bound intermediates; the result must not depend on the split."""
    torch.manual_seed(seed)
    layer = BTLinear(120, 24, in_shape=(4, 5, 6), out_shape=(2, 3, 4), ranks=2, num_blocks=2,
                     contraction=contraction, dtype=torch.float64)
    x = torch.randn(37, 120, dtype=torch.float64)
    whole = layer(x)
    layer.max_intermediate_bytes = 1  # one row per piece
    assert layer.chunk_size(37, x) == 1
    torch.testing.assert_close(layer(x), whole, rtol=1e-12, atol=1e-12)
    layer.max_intermediate_bytes = 20_000  # several rows (each row's largest intermediate is 480-960 bytes)
    assert 1 < layer.chunk_size(37, x) < 37
    torch.testing.assert_close(layer(x), whole, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("d", sorted(SHAPES))
def test_gemm_chain_gradcheck_every_order(seed, d):
    """The hand-written backward of the GEMM chain, input gradient included, for d = 2..5."""
    from accel.nn.bt._contract import gemm_chain_contract

    torch.manual_seed(seed)
    in_shape, out_shape = SHAPES[d]
    layer = BTLinear(math.prod(in_shape), math.prod(out_shape), in_shape=in_shape, out_shape=out_shape, ranks=2,
                     num_blocks=2, contraction="gemm", dtype=torch.float64)
    x = torch.randn(3, layer.in_features, dtype=torch.float64, requires_grad=True)

    def f(x, core, *factors):
        return gemm_chain_contract(x, core, factors, layer.in_shape, layer.out_shape, layer.ranks)
    assert torch.autograd.gradcheck(f, (x, layer.core, *layer.factors))


def test_one_mode_layer_refuses_the_chain():
    with pytest.raises(ValueError, match=r"needs at least 2 modes, got in_shape=\(6,\)"):
        BTLinear(6, 4, in_shape=(6,), out_shape=(4,), contraction="gemm")


def test_empty_batch_every_contraction(seed):
    torch.manual_seed(seed)
    for contraction in ("auto", "gemm", "dense", "lowrank"):
        layer = BTLinear(24, 12, in_shape=(2, 3, 4), out_shape=(3, 2, 2), contraction=contraction)
        assert layer(torch.randn(0, 24)).shape == (0, 12)


@pytest.mark.parametrize("d", sorted(SHAPES))
@pytest.mark.parametrize("input_grad", [False, True])
def test_gemm_chain_training_flops_match_counted(seed, d, input_grad):
    """The chain's flop model against torch's FlopCounterMode over a real forward+backward, exactly: the chain's
    GEMMs plus the weight preparation (the core merged into factor 1, forward and backward)."""
    from torch.utils.flop_counter import FlopCounterMode

    from accel.nn.bt._contract import gemm_chain_training_flops

    torch.manual_seed(seed)
    in_shape, out_shape = SHAPES[d]
    layer = BTLinear(math.prod(in_shape), math.prod(out_shape), in_shape=in_shape, out_shape=out_shape, ranks=2,
                     num_blocks=3, bias=False, contraction="gemm")
    x = torch.randn(256, layer.in_features, requires_grad=input_grad)
    with FlopCounterMode(display=False) as counter:
        layer(x).sum().backward()
    layer.max_intermediate_bytes = 2 ** 40  # one piece
    modelled = gemm_chain_training_flops(*layer._key(), 256, input_grad)
    preparation = 6 * 3 * math.prod(layer.ranks) * in_shape[1] * out_shape[1]
    assert counter.get_total_flops() == modelled + preparation


def test_dense_path_workspace_shared_between_forwards(seed):
    """The dense path reuses one buffer for W: a second forward (here of another layer writing the same
    buffer) before the first backward must not change the first's gradients, input gradient included."""
    torch.manual_seed(seed)
    kwargs = dict(in_shape=(3, 4, 2), out_shape=(2, 3, 2), ranks=2, num_blocks=2, contraction="dense",
                  dtype=torch.float64)
    first, second = BTLinear(24, 12, **kwargs), BTLinear(24, 12, **kwargs)
    second.workspace = first.workspace
    x1 = torch.randn(5, 24, dtype=torch.float64, requires_grad=True)
    x2 = torch.randn(5, 24, dtype=torch.float64, requires_grad=True)
    y1, y2 = first(x1), second(x2)
    g1, g2 = torch.randn_like(y1), torch.randn_like(y2)
    grads1 = torch.autograd.grad(y1, [x1, first.core, *first.factors], g1)
    grads2 = torch.autograd.grad(y2, [x2, second.core, *second.factors], g2)
    for layer, x, g, grads in ((first, x1, g1, grads1), (second, x2, g2, grads2)):
        reference = x @ layer.to_dense().t() + layer.bias
        for got, want in zip(grads, torch.autograd.grad(reference, [x, layer.core, *layer.factors], g)):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    assert "MiB" in repr(first.workspace)
    first.workspace.clear()
    torch.testing.assert_close(first(x1), y1)


@pytest.mark.parametrize("batch", [5, 63, 64, 97])
def test_dense_path_layouts_match_dense_weight(seed, batch):
    """With wide batched GEMMs (J' = 64 columns) the dense path runs as a batched GEMM over the first output
    mode for batches under the input width, as one GEMM with the bias fused through W in the (I, J) layout
    from it on: both against x W^T + b, the input, factor and bias gradients included, the second call reusing
    the workspace."""
    from accel.nn.bt._dense import weight_rows_first
    torch.manual_seed(seed)
    layer = BTLinear(64, 128, in_shape=(4, 4, 4), out_shape=(2, 8, 8), ranks=2, num_blocks=2, contraction="dense",
                     dtype=torch.float64)
    assert weight_rows_first(batch, 64, 128, 2) == (batch >= 64)
    for _ in range(2):
        x = torch.randn(batch, 64, dtype=torch.float64, requires_grad=True)
        y = layer(x)
        reference = x @ layer.to_dense().t() + layer.bias
        torch.testing.assert_close(y, reference, rtol=1e-10, atol=1e-12)
        grad_out = torch.randn_like(y)
        inputs = [x, layer.core, *layer.factors, layer.bias]
        grads, reference_grads = (torch.autograd.grad(out, inputs, grad_out) for out in (y, reference))
        for got, want in zip(grads, reference_grads):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("contraction", ["gemm", "dense", "lowrank"])
def test_autocast_bfloat16(seed, contraction):
    """Under CPU autocast the products run in bfloat16 (the weight-side ops come out in mixed dtypes,
    which every path must reconcile) and match float32 to bfloat16 precision, gradients included."""
    torch.manual_seed(seed)
    layer = BTLinear(24, 12, in_shape=(3, 4, 2), out_shape=(2, 3, 2), contraction=contraction)
    x = torch.randn(5, 24)
    reference = layer(x)
    reference_grad = torch.autograd.grad(reference.sum(), layer.core)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16  # like nn.Linear under autocast
    grad = torch.autograd.grad(y.float().sum(), layer.core)[0]
    scale = reference.abs().max().item()
    torch.testing.assert_close(y.float(), reference, rtol=0, atol=0.05 * scale)
    assert grad.dtype == torch.float32
    torch.testing.assert_close(grad, reference_grad, rtol=0, atol=0.05 * reference_grad.abs().max().item())


@pytest.mark.parametrize("fraction", [0.5, 0.05, 0.003])
def test_float_ranks_are_a_fraction_of_dense_parameters(seed, fraction):
    """As tensorly-torch: the largest common rank whose weight fits in that fraction of the dense weight."""
    rng = np.random.default_rng(seed)
    in_shape = tuple(int(v) for v in rng.integers(3, 9, size=3))
    out_shape = tuple(int(v) for v in rng.integers(3, 9, size=3))
    num_blocks = int(rng.integers(1, 4))
    in_features, out_features = math.prod(in_shape), math.prod(out_shape)
    budget = fraction * in_features * out_features
    sizes = [i * j for i, j in zip(in_shape, out_shape)]

    def parameters(rank):
        ranks = [min(rank, s) for s in sizes]
        return num_blocks * (sum(s * r for s, r in zip(sizes, ranks)) + math.prod(ranks))
    if parameters(1) > budget:
        with pytest.raises(ValueError, match=rf"ranks={fraction} allows .* but rank 1 with num_blocks={num_blocks}"):
            BTLinear(in_features, out_features, in_shape=in_shape, out_shape=out_shape, ranks=fraction,
                     num_blocks=num_blocks)
        return
    layer = BTLinear(in_features, out_features, in_shape=in_shape, out_shape=out_shape, ranks=fraction,
                     num_blocks=num_blocks)
    rank = max(layer.ranks)
    assert layer.ranks == tuple(min(rank, s) for s in sizes)
    assert layer.num_weight_parameters == parameters(rank) <= budget
    assert rank == max(sizes) or parameters(rank + 1) > budget  # the largest that fits


def test_bad_float_and_other_ranks_are_named():
    for bad in (2.5, 1.5, 0.0, -0.5, float("nan")):
        with pytest.raises(ValueError, match=rf"ranks={bad!r}: a float rank is a fraction .* must be in \(0, 1\]"):
            BTLinear(20, 6, in_shape=(4, 5), out_shape=(2, 3), ranks=bad)
    with pytest.raises(ValueError, match="ranks='4': the only string is 'same'"):
        BTLinear(20, 6, in_shape=(4, 5), out_shape=(2, 3), ranks="4")
    with pytest.raises(TypeError, match="ranks must be an int, a float in \\(0, 1\\], 'same' or 2 ints"):
        BTLinear(20, 6, in_shape=(4, 5), out_shape=(2, 3), ranks=b"4")
    with pytest.raises(ValueError, match=r"ranks=1e-05 allows 0 weight parameters, but rank 1"):
        BTLinear(20, 6, in_shape=(4, 5), out_shape=(2, 3), ranks=1e-5)


def test_layers_larger_than_dense_warn_with_the_figures():
    with pytest.warns(UserWarning, match=r"BTLinear\(97, 64\) with in_shape=\(97,\), out_shape=\(64,\), "
                      r"ranks=\(4,\), num_blocks=2 has 49,672 weight parameters, 8.0x the 6,208 of a dense weight"):
        BTLinear(97, 64)  # a prime in_features: one mode, no compression
    with pytest.warns(UserWarning, match=r"num_blocks=1000 has 496,000 weight parameters, 12.1x the 40,960"):
        # 1000 * (4 * (5*4 + 4*4 + 4*4 + 4*2) + 4**4) = 496,000 for in_shape (4, 4, 4, 4), out_shape (5, 4, 4, 2)
        BTLinear(256, 160, num_blocks=1000)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert BTLinear(256, 160).compression_ratio > 1


@pytest.mark.parametrize("dtype", [torch.float64, torch.int64, torch.float16])
def test_input_dtype_must_match_parameters_as_nn_linear(seed, dtype):
    torch.manual_seed(seed)
    layer = BTLinear(24, 12, in_shape=(3, 4, 2), out_shape=(2, 3, 2), ranks=2)
    x = (torch.randn(5, 24) * 10).to(dtype)
    with pytest.raises(RuntimeError):
        nn.Linear(24, 12)(x)  # the behaviour matched
    with pytest.raises(RuntimeError, match=rf"input of dtype {dtype} but its parameters are torch.float32"):
        layer(x)
    torch.testing.assert_close(layer.double()(x.double()), x.double() @ layer.to_dense().t() + layer.bias)
    if dtype == torch.float16:  # autocast casts it, as for nn.Linear
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert layer.float()(x).dtype == torch.bfloat16


@pytest.mark.parametrize("contraction", ["auto", "dense", "lowrank", "gemm"])
def test_inference_mode_then_training(seed, contraction):
    """Buffers made under torch.inference_mode (the dense path's workspace) are not reused where they could
    not be written: a training step afterwards runs and agrees."""
    torch.manual_seed(seed)
    layer = BTLinear(64, 1024, in_shape=(4, 4, 4), out_shape=(8, 8, 16), contraction=contraction)
    x = torch.randn(96, 64)
    with torch.inference_mode():
        y_inference = layer(x)
    y = layer(x)
    y.square().sum().backward()
    torch.testing.assert_close(y_inference, y.detach(), rtol=1e-5, atol=1e-5)
    assert all(p.grad is not None for p in layer.parameters())


def test_rank_same_is_the_dense_parameter_count_as_in_tltorch():
    """tensorly-torch's spellings: "same" is the fraction 1.0, the largest common rank within the dense size."""
    same = BTLinear(256, 64, in_shape=(4, 4, 16), out_shape=(4, 4, 4), ranks="same")
    assert same.ranks == BTLinear(256, 64, in_shape=(4, 4, 16), out_shape=(4, 4, 4), ranks=1.0).ranks
    assert same.num_weight_parameters <= 256 * 64
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the next rank is capped at some modes' sizes, and larger than dense
        bigger = BTLinear(256, 64, in_shape=(4, 4, 16), out_shape=(4, 4, 4), ranks=max(same.ranks) + 1)
    assert bigger.num_weight_parameters > 256 * 64
    half = BTLinear(256, 64, in_shape=(4, 4, 16), out_shape=(4, 4, 4), ranks=0.5)
    assert half.num_weight_parameters <= 0.5 * 256 * 64


def test_meta_device_then_to_empty_and_reset_parameters(seed):
    """Built on the meta device (no memory), moved with to_empty, initialised with reset_parameters: trains."""
    torch.manual_seed(seed)
    layer = BTLinear(64, 32, in_shape=(4, 4, 4), out_shape=(2, 4, 4), ranks=2, device="meta")
    assert all(p.is_meta for p in layer.parameters())
    layer = layer.to_empty(device="cpu")
    layer.reset_parameters()
    assert all(torch.isfinite(p).all() for p in layer.parameters())
    for contraction in ("gemm", "dense", "lowrank"):
        layer.contraction = contraction
        x = torch.randn(8, 64)
        layer(x).square().sum().backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in layer.parameters())
        torch.testing.assert_close(layer(x), x @ layer.to_dense().t() + layer.bias, rtol=1e-5, atol=1e-5)
        layer.zero_grad()
    typed = BTLinear(64, 32, dtype=torch.float64, device="cpu")
    assert all(p.dtype == torch.float64 for p in typed.parameters())


def test_from_linear_takes_transformers_conv1d(seed):
    pytest.importorskip("transformers", reason="transformers is not installed: Conv1D cannot be built")
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(seed)
    conv = Conv1D(24, 36)  # nf=24 outputs, nx=36 inputs: weight (36, 24), y = x @ weight + bias
    with torch.no_grad():
        conv.bias.normal_()
    layer = BTLinear.from_linear(conv, in_shape=(3, 3, 4), out_shape=(2, 3, 4), ranks=(6, 9, 16), num_blocks=1)
    x = torch.randn(5, 36)
    torch.testing.assert_close(layer(x), conv(x), rtol=1e-4, atol=1e-4)
    with pytest.raises(TypeError, match="nn.Linear or transformers' Conv1D, got Conv1d"):
        BTLinear.from_linear(nn.Conv1d(3, 3, 1))


@pytest.mark.parametrize("factorization", ["tucker", "cp"])
def test_tltorch_round_trip(seed, factorization):
    """tensorly-torch's FactorizedLinear (Tucker or CP) -> BTLinear -> FactorizedLinear (Tucker): the same layer."""
    tltorch = pytest.importorskip("tltorch", reason="tensorly-torch is not installed")
    torch.manual_seed(seed)
    source = tltorch.FactorizedLinear((4, 3, 2), (2, 3, 4), factorization=factorization,
                                      rank=(2, 2, 3, 2, 2, 1) if factorization == "tucker" else 3)
    with torch.no_grad():
        source.bias.normal_()
    x = torch.randn(7, 24)
    bt = BTLinear.from_tltorch(source)
    assert bt.in_shape == (4, 3, 2) and bt.out_shape == (2, 3, 4)
    assert bt.num_blocks == (1 if factorization == "tucker" else 3)
    torch.testing.assert_close(bt(x), source(x), rtol=1e-4, atol=1e-5)
    back = bt.to_tltorch()
    assert type(back.weight).__name__ == "TuckerTensorized"
    torch.testing.assert_close(back(x), bt(x), rtol=1e-4, atol=1e-5)


def test_tltorch_formats_that_are_not_block_terms_are_refused():
    tltorch = pytest.importorskip("tltorch", reason="tensorly-torch is not installed")
    tt = tltorch.FactorizedLinear((4, 3), (2, 3), factorization="blocktt", rank=2)
    with pytest.raises(ValueError, match="converts Tucker and CP weights .* is not: use BTLinear.from_dense"):
        BTLinear.from_tltorch(tt)
    with pytest.raises(TypeError, match="from_tltorch expects tltorch.FactorizedLinear, got Linear"):
        BTLinear.from_tltorch(nn.Linear(4, 4))


def test_importing_accel_nn_leaves_the_compile_cache_tag_alone():
    """The library touches no process-wide compile setting: torch.compiler.config.cache_key_tag is the user's."""
    import subprocess
    import sys

    code = ("import torch; torch.compiler.config.cache_key_tag = 'users-own'\n"
            "import accel.nn, accel.nn.bt.linear\n"
            "from accel.nn import BTLinear; BTLinear(24, 12)(torch.randn(3, 24))\n"
            "print(torch.compiler.config.cache_key_tag)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "users-own"
