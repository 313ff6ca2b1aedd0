import numpy as np
import pytest
import torch

from accel.nn import BTLinear
from accel.nn.bt.decompose import block_term_decomposition, matrix_to_bt_tensor


def test_full_rank_reconstructs_to_machine_precision(seed):
    torch.manual_seed(seed)
    weight = torch.randn(12, 30, dtype=torch.float64)
    for num_blocks in (1, 2):
        layer = BTLinear.from_dense(weight, in_shape=(5, 6), out_shape=(3, 4), ranks=(15, 24), num_blocks=num_blocks)
        # near float64 precision: ~5e-13 relative / 3e-12 absolute seen over 40 seeds (SVDs of 15x24 unfoldings)
        assert layer.reconstruction_error < 1e-11
        torch.testing.assert_close(layer.to_dense(), weight, rtol=0, atol=1e-10)


def test_low_rank_recovers_true_block_term_structure(seed):
    torch.manual_seed(seed)
    source = BTLinear(64, 64, in_shape=(4, 4, 4), out_shape=(4, 4, 4), ranks=2, num_blocks=2, dtype=torch.float64)
    weight = source.to_dense().detach()
    # BTD is non-convex: with 8 random starts 2 of 30 random instances stalled at 2-8% error, with 24 none did
    layer = BTLinear.from_dense(weight, in_shape=(4, 4, 4), out_shape=(4, 4, 4), ranks=2, num_blocks=2,
                                num_restarts=24)
    measured = (layer.to_dense() - weight).norm() / weight.norm()
    assert abs(measured.item() - layer.reconstruction_error) < 1e-9  # the reported error is the true one
    assert layer.reconstruction_error < 1e-2
    # a random (unstructured) matrix of the same size is far from block-term with these ranks
    noise = BTLinear.from_dense(torch.randn(64, 64, dtype=torch.float64), in_shape=(4, 4, 4),
                                out_shape=(4, 4, 4), ranks=2, num_blocks=2, n_iter=5, num_restarts=0)
    assert noise.reconstruction_error > 0.5


def test_refinement_never_worse_than_greedy(seed):
    rng = np.random.default_rng(seed)
    tensor = rng.standard_normal((6, 8, 5))
    _, _, greedy = block_term_decomposition(tensor, ranks=2, num_blocks=3, n_iter=0, num_restarts=0)
    _, _, refined = block_term_decomposition(tensor, ranks=2, num_blocks=3, n_iter=20)
    assert refined <= greedy + 1e-12


def test_tensor_input_and_output_shapes(seed):
    rng = np.random.default_rng(seed)
    weight = rng.standard_normal((6, 20))  # out 6 = 2x3, in 20 = 4x5
    tensor = matrix_to_bt_tensor(weight, (4, 5), (2, 3))
    assert tensor.shape == (8, 15)
    assert tensor[1 * 2 + 1, 3 * 3 + 2] == weight[1 * 3 + 2, 1 * 5 + 3]  # W[j, i], i=(1,3), j=(1,2)
    cores, factors, error = block_term_decomposition(tensor, ranks=(3, 2), num_blocks=2)
    assert cores.shape == (2, 3, 2) and [f.shape for f in factors] == [(2, 8, 3), (2, 15, 2)]
    cores, factors, _ = block_term_decomposition(torch.from_numpy(weight).float(), in_shape=(4, 5), out_shape=(2, 3),
                                                 ranks=2, num_blocks=2)
    assert cores.dtype == torch.float32 and [tuple(f.shape) for f in factors] == [(2, 4, 2, 2), (2, 5, 3, 2)]


def test_errors_name_the_numbers():
    with pytest.raises(ValueError, match=r"\(6, 20\).*in_shape=\(4, 4\)"):
        block_term_decomposition(np.ones((6, 20)), in_shape=(4, 4), out_shape=(2, 3))
    with pytest.raises(ValueError, match="ranks=\\[9, 2\\]"):
        block_term_decomposition(np.ones((8, 15)), ranks=(9, 2))
    with pytest.raises(ValueError, match="num_blocks must be a positive int, got 0"):
        block_term_decomposition(np.ones((8, 15)), num_blocks=0)
    with pytest.raises(ValueError, match="full_space_iter must be a non-negative int, got -1"):
        block_term_decomposition(np.ones((8, 15)), full_space_iter=-1)


def test_contractions_match_tensorly(seed):
    """The BLAS-shaped contractions are checked against tensorly's plain mode products."""
    import tensorly as tl

    from accel.nn.bt.decompose import _Blocks, _contract, _leading_subspace, _sweep_projections

    # tltorch switches tensorly to its pytorch backend when imported (another test may have): numpy here
    with tl.backend_context("numpy"):
        rng = np.random.default_rng(seed)
        for shape in [(7,), (5, 6), (4, 6, 5), (3, 5, 4, 6), (3, 4, 2, 5, 3)]:
            d = len(shape)
            tensor = rng.standard_normal(shape)
            for mode in range(d):
                matrix = rng.standard_normal((shape[mode], 3))
                np.testing.assert_allclose(_contract(tensor, matrix, mode), tl.tenalg.mode_dot(tensor, matrix.T, mode),
                                           rtol=1e-12, atol=1e-12)
            ranks = [min(2, s) for s in shape]
            blocks_factors = [[np.linalg.qr(rng.standard_normal((s, r)))[0] for s, r in zip(shape, ranks)]
                              for _ in range(3)]
            for k, projections in _sweep_projections(tensor, blocks_factors):
                modes = [m for m in range(d) if m != k]
                for factors, projection in zip(blocks_factors, projections):
                    expected = tl.tenalg.multi_mode_dot(tensor, [factors[m] for m in modes], modes=modes, transpose=True)
                    np.testing.assert_allclose(projection, expected, rtol=1e-12, atol=1e-12)
            blocks = _Blocks([rng.standard_normal(ranks) for _ in blocks_factors], blocks_factors)
            dense = sum(tl.tucker_to_tensor((c, f)) for c, f in zip(blocks.cores, blocks.factors))
            np.testing.assert_allclose(blocks.dense(), dense, rtol=1e-12, atol=1e-12)
            # the Gram-formula error equals the explicit residual norm
            projections = [tl.tenalg.multi_mode_dot(tensor, f, transpose=True) for f in blocks_factors]
            explicit = np.linalg.norm(tensor - dense)
            assert abs(blocks.error(tensor, np.vdot(tensor, tensor), projections) - explicit) < 1e-9 * explicit
            if d == 1:
                continue  # a vector's unfolding has rank 1: its second singular direction is arbitrary
            # the Gram-eigenvector subspace is the SVD's
            basis = _leading_subspace(tensor, d - 1, ranks[-1])
            u = np.linalg.svd(tl.unfold(tensor, d - 1))[0][:, :ranks[-1]]
            np.testing.assert_allclose(basis @ basis.T, u @ u.T, atol=1e-8)


def test_moderately_large_block_term_weight_is_recovered(seed):
    """A 4096 x 256 weight whose 1M-entry tensor truly is block-term (core above the screening size)."""
    torch.manual_seed(seed)
    shapes = dict(in_shape=(8, 8, 8, 8), out_shape=(4, 4, 4, 4), ranks=5, num_blocks=4)
    source = BTLinear(4096, 256, **shapes, dtype=torch.float64)
    weight = source.to_dense().detach()
    layer = BTLinear.from_dense(weight, **shapes, random_state=seed)
    measured = (layer.to_dense() - weight).norm() / weight.norm()
    assert abs(measured.item() - layer.reconstruction_error) < 1e-9
    assert layer.reconstruction_error < 1e-6


def test_progress_bar_only_when_asked(capsys):
    tensor = np.random.default_rng().standard_normal((6, 8, 5))
    block_term_decomposition(tensor, ranks=2, num_blocks=2, n_iter=3, num_restarts=1, progress=True)
    assert "block-term decomposition" in capsys.readouterr().err
    block_term_decomposition(tensor, ranks=2, num_blocks=2, n_iter=3, num_restarts=1, progress=False)
    assert "block-term decomposition" not in capsys.readouterr().err


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_weight_is_named(seed, bad):
    rng = np.random.default_rng(seed)
    weight = torch.from_numpy(rng.standard_normal((6, 20)))
    row, column = int(rng.integers(6)), int(rng.integers(20))
    weight[row, column] = bad
    kind = "1 NaN and 0 infinite" if bad != bad else "0 NaN and 1 infinite"
    with pytest.raises(ValueError, match=rf"{kind} entries \(the first at index \({row}, {column}\)"):
        block_term_decomposition(weight, in_shape=(4, 5), out_shape=(2, 3))
    with pytest.raises(ValueError, match=kind):
        BTLinear.from_dense(weight, in_shape=(4, 5), out_shape=(2, 3))
