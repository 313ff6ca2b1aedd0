import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from accel.nn import BTLinear
from accel.nn.bt.linear import ELEMENT_FLOPS, FACTORIZED_FLOP_PENALTY, REBUILD_FLOP_PENALTY, balanced_factors
from accel.nn.bt._lowrank import lowrank_costs
from accel.nn.bt._paths import GROUPED_CHAIN_FLOP_PENALTY, LOWRANK_GEMM_FLOP_PENALTY, LOWRANK_STEP_FLOPS, chain_plan

SHAPES = {  # d -> (in_shape, out_shape)
    2: ((6, 5), (4, 3)),
    3: ((4, 3, 5), (2, 3, 2)),
    4: ((3, 2, 4, 2), (2, 2, 3, 2)),
    5: ((2, 3, 2, 2, 3), (2, 2, 1, 3, 2)),
}


@pytest.mark.parametrize("d", sorted(SHAPES))
@pytest.mark.parametrize("num_blocks,ranks", [(1, 2), (2, 3), (3, 1)])
@pytest.mark.parametrize("contraction", ["factorized", "gemm", "einsum", "dense", "lowrank", "auto"])
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


@pytest.mark.parametrize("contraction", ["gemm", "einsum", "dense", "lowrank"])
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


def test_auto_picks_dense_when_cheaper_and_factorized_at_ucf11():
    big = BTLinear(57600, 1024, in_shape=(8, 20, 20, 18), out_shape=(16, 4, 4, 4), ranks=4, num_blocks=2)
    assert not big.uses_dense(96)
    cost = big.cost(96)
    assert cost["rebuild"] + cost["matmul"] > 10 * cost["factorized"]
    # nearly full ranks on a tiny layer: rebuilding W once beats contracting factors for a big batch
    small = BTLinear(16, 16, in_shape=(4, 4), out_shape=(4, 4), ranks=16, num_blocks=3)
    assert small.uses_dense(4096) and not big.uses_dense(1)
    cost = small.cost(4096)
    assert cost["rebuild"] + cost["matmul"] <= cost["factorized"]
    # measured fastest (forward+backward, 1 thread): the low-rank path at 16x12x8x8 -> 16x4x4x4, N=4, batch 128
    # (52 ms against the rebuilt W's 75 and the chain's 211) and at the moving-digits BTLSTM's 1,600 -> 16x4x2x2
    # over 256 rows (R=4: 3.7 against 6.4 and 12.4 ms); the rebuild at UCF11 -> 256 outputs, batch 96
    assert BTLinear(12288, 1024, in_shape=(16, 12, 8, 8), out_shape=(16, 4, 4, 4), num_blocks=4).method(128) == "lowrank"
    assert BTLinear(1600, 256, in_shape=(8, 8, 5, 5), out_shape=(16, 4, 2, 2), ranks=4).method(256) == "lowrank"
    assert BTLinear(57600, 256, ranks=4).method(96) == "dense"
    for layer in (big, small, BTLinear(4096, 1024, ranks=2, num_blocks=2), BTLinear(1600, 256, ranks=2)):
        for batch in (1, 64, 4096):  # the documented rule
            cost = layer.cost(batch)
            dense = REBUILD_FLOP_PENALTY * cost["rebuild"] + cost["matmul"] + ELEMENT_FLOPS * layer.in_features * \
                layer.out_features
            factorized = FACTORIZED_FLOP_PENALTY * cost["factorized"] + ELEMENT_FLOPS * cost["factorized_elements"]
            if layer.factorized_method(batch) == "gemm" and chain_plan(*layer._key(), batch)[0] is not None:
                factorized = GROUPED_CHAIN_FLOP_PENALTY * cost["factorized"] + ELEMENT_FLOPS * cost["factorized_elements"]
            gemm, small_ops, elements = lowrank_costs(*layer._key(), batch)
            lowrank = (LOWRANK_GEMM_FLOP_PENALTY * gemm + FACTORIZED_FLOP_PENALTY * small_ops + ELEMENT_FLOPS * elements
                       + LOWRANK_STEP_FLOPS * (len(layer.in_shape) - 1))
            assert (cost["auto_dense"], cost["auto_lowrank"], cost["auto_factorized"]) == (dense, lowrank, factorized)
            expected = min((dense, 0, "dense"), (lowrank, 1, "lowrank"), (factorized, 2, layer.factorized_method(batch)))
            assert layer.method(batch) == expected[2]
            assert layer.uses_dense(batch) == (expected[2] == "dense")


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


@pytest.mark.parametrize("contraction", ["gemm", "einsum"])
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


@pytest.mark.parametrize("d", sorted(SHAPES))
def test_gemm_chain_matches_einsum_twin(seed, d):
    """The GEMM chain against the opt_einsum path on the same weights: outputs and all gradients."""
    torch.manual_seed(seed)
    in_shape, out_shape = SHAPES[d]
    gemm = BTLinear(math.prod(in_shape), math.prod(out_shape), in_shape=in_shape, out_shape=out_shape, ranks=(2,) * d,
                    num_blocks=3, contraction="gemm", dtype=torch.float64)
    einsum = BTLinear(gemm.in_features, gemm.out_features, in_shape=in_shape, out_shape=out_shape, ranks=(2,) * d,
                      num_blocks=3, contraction="einsum", dtype=torch.float64)
    einsum.load_state_dict(gemm.state_dict())
    x = torch.randn(5, 2, gemm.in_features, dtype=torch.float64, requires_grad=True)
    grad_out = torch.randn(5, 2, gemm.out_features, dtype=torch.float64)
    results = []
    for layer in (gemm, einsum):
        y = layer(x)
        results.append((y, *torch.autograd.grad(y, [x, layer.core, *layer.factors, layer.bias], grad_out)))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_factorized_method_rule():
    ucf11 = BTLinear(57600, 1024, in_shape=(8, 20, 20, 18), out_shape=(16, 4, 4, 4), ranks=4, num_blocks=2)
    assert ucf11.factorized_method(96) == "gemm" and not ucf11.uses_dense(96)
    cost = ucf11.cost(96)
    assert cost["factorized"] == cost["gemm"] <= 1.15 * cost["einsum"]
    # the last mode (8) grows to N J R = 64 columns: the chain costs 1.4x the flops and is not used
    frames = BTLinear(12288, 1024, in_shape=(16, 12, 8, 8), out_shape=(16, 4, 4, 4), ranks=4, num_blocks=4)
    cost = frames.cost(128)
    assert frames.factorized_method(128) == "einsum"
    assert cost["gemm"] > 1.15 * cost["einsum"] == 1.15 * cost["factorized"]
    one_mode = BTLinear(6, 4, in_shape=(6,), out_shape=(4,), contraction="factorized")
    assert one_mode.factorized_method(8) == "einsum" and one_mode.cost(8)["gemm"] is None
    assert one_mode(torch.randn(8, 6)).shape == (8, 4)
    with pytest.raises(ValueError, match=r"needs at least 2 modes, got in_shape=\(6,\)"):
        BTLinear(6, 4, in_shape=(6,), out_shape=(4,), contraction="gemm")


def test_empty_batch_every_contraction(seed):
    torch.manual_seed(seed)
    for contraction in ("auto", "gemm", "einsum", "dense", "lowrank"):
        layer = BTLinear(24, 12, in_shape=(2, 3, 4), out_shape=(3, 2, 2), contraction=contraction)
        assert layer(torch.randn(0, 24)).shape == (0, 12)


@pytest.mark.parametrize("d", sorted(SHAPES))
@pytest.mark.parametrize("input_grad", [False, True])
def test_gemm_chain_training_flops_match_counted(seed, d, input_grad):
    """The chain's flop model against torch's FlopCounterMode over a real forward+backward; the only
    difference allowed is the (tiny) weight preparation outside the chain."""
    from torch.utils.flop_counter import FlopCounterMode

    from accel.nn.bt._contract import gemm_chain_training_flops, grouped_shapes
    from accel.nn.bt._paths import chain_plan

    torch.manual_seed(seed)
    in_shape, out_shape = SHAPES[d]
    layer = BTLinear(math.prod(in_shape), math.prod(out_shape), in_shape=in_shape, out_shape=out_shape, ranks=2,
                     num_blocks=3, bias=False, contraction="gemm")
    x = torch.randn(256, layer.in_features, requires_grad=input_grad)
    with FlopCounterMode(display=False) as counter:
        layer(x).sum().backward()
    split = chain_plan(*layer._key(), 256)[0]  # the chain over all modes, or over two merged ones
    shapes = layer._key()[:3] if split is None else grouped_shapes(*layer._key()[:3], split)
    modelled = gemm_chain_training_flops(*shapes, 3, 256, input_grad)
    counted = counter.get_total_flops()
    # the weight preparation: the core merged with factor 1 (of the merged modes too: no longer tiny), forward
    # and backward (the Kronecker products of merged factors are elementwise products, which count no flops)
    preparation = 6 * 3 * math.prod(shapes[2]) * shapes[0][1] * shapes[1][1]
    assert modelled <= counted <= modelled * 1.01 + (preparation if split is not None else 0)


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


@pytest.mark.parametrize("contraction", ["gemm", "einsum", "dense", "lowrank"])
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
    for bad in (2.5, 1.0, 0.0, -0.5, float("nan")):
        with pytest.raises(ValueError, match=rf"ranks={bad!r}: a float rank is a fraction .* must be in \(0, 1\)"):
            BTLinear(20, 6, in_shape=(4, 5), out_shape=(2, 3), ranks=bad)
    with pytest.raises(TypeError, match="ranks must be an int, a float in \\(0, 1\\) or 2 ints"):
        BTLinear(20, 6, in_shape=(4, 5), out_shape=(2, 3), ranks="4")
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


@pytest.mark.parametrize("contraction", ["auto", "factorized", "dense", "lowrank"])
def test_product_is_forward_without_the_bias(seed, contraction):
    torch.manual_seed(seed)
    layer = BTLinear(24, 12, in_shape=(2, 3, 4), out_shape=(3, 2, 2), ranks=2, contraction=contraction)
    x = torch.randn(2, 5, 24)
    torch.testing.assert_close(layer.product(x) + layer.bias, layer(x))
    assert layer.product(x).shape == (2, 5, 12)
