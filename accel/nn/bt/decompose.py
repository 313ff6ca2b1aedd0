"""Block-term decomposition of a dense weight: a sum of ``N`` Tucker blocks.

tensorly has Tucker, TT, TR and CP but no block-term decomposition (BTD); this module adds one, in
the spirit and conventions of tensorly's Tucker (``tl.tucker_to_tensor`` of each block rebuilds it;
the tests check every contraction here against tensorly's).

1. Compress: a sum of ``N`` blocks has multilinear rank ``<= N * R_k``, so the tensor is first
   reduced to its Tucker core with ranks ``N * R_k`` (HOSVD, then HOOI sweeps). This is the only
   step, with the final error and an optional last refinement, that touches the full-size tensor.
2. In that small core, a greedy start (block n is the Tucker fit of what blocks 1..n-1 left) and a
   few random starts are each refined; the best is lifted back (and refined in the full space when
   the compression lost something, where the optimum may leave the compressed subspace).
3. The refinement is block-coordinate descent: alternating least squares whose coordinate blocks
   are "the mode-k factors of all blocks" (k = 1..d), each solved exactly through its normal
   equations, then the cores block by block (Gauss-Seidel; the joint core system would need
   ``(N prod R)^2`` memory: 2 GiB for N=4, R=8, d=4).

Refining each Tucker block alone against the others' residual (HOOI per block) and starting from
the greedy fit alone were tried first: on random tensors that are exactly block-term they stall at
1-20% relative error (local minima); with compression, restarts and joint updates most such tensors
are recovered to 1e-8 or better, but BTD is non-convex and a few are not.

Speed: a sweep never rebuilds a block. The projections ``T x_{m != k} U_n^(m)T`` that the mode-k
normal equations need are shared through a two-level dimension tree (the tensor is contracted over
one half of the modes once per half-sweep, with all blocks' factors stacked into one GEMM), and the
error is ``||T||^2 - 2 sum <T, X_n> + sum <X_n, X_m>``, evaluated on ``R^d`` cores; it is recomputed
explicitly once it is small enough for that difference to lose digits. On cores above 65,536 entries
the starts are screened after 10 sweeps and only the best is refined on. BLAS runs single-threaded
inside (threadpoolctl, when installed): threads only add synchronisation to GEMMs this small, and
oversubscribe a busy machine. Computed in float64 NumPy; ``experiments/bt_decompose_speed.py`` times it.
"""
from __future__ import annotations

import contextlib
import math
from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

try:
    from threadpoolctl import threadpool_limits
except ImportError:  # optional: without it BLAS keeps its own thread count
    threadpool_limits = None

__all__ = ["block_term_decomposition", "matrix_to_bt_tensor"]

# The sweeps are thousands of small and batched GEMMs, which multithreaded BLAS runs slower than one thread (its
# synchronisation outweighs the work, worse on a busy machine), so BLAS is held to this many threads.
_BLAS_THREADS = 1

# Cores with more entries than this get fewer random starts, screened after _SCREEN_SWEEPS sweeps.
_LARGE_CORE = 2**16
_SCREEN_SWEEPS = 10

# Below this relative error the Gram-formula error ||T||^2 - 2<T,X> + ||X||^2 (float64, unit ||T||) keeps
# too few digits: the residual is then formed explicitly.
_EXPLICIT_ERROR_BELOW = 1e-4


def matrix_to_bt_tensor(weight: np.ndarray, in_shape: Sequence[int], out_shape: Sequence[int]) -> np.ndarray:
    """Fold an ``(out_features, in_features)`` matrix into the d-order tensor with modes ``I_k * J_k``.

    Mode k's index is ``i_k * J_k + j_k``, matching a factor of shape ``(I_k, J_k, R_k)`` reshaped to
    ``(I_k * J_k, R_k)``.
    """
    d = len(in_shape)
    w = weight.T.reshape(*in_shape, *out_shape)  # (I_1..I_d, J_1..J_d)
    interleave = [axis for k in range(d) for axis in (k, d + k)]
    return w.transpose(interleave).reshape([i * j for i, j in zip(in_shape, out_shape)])


def _contract(x: np.ndarray, matrix: np.ndarray, mode: int) -> np.ndarray:
    """``out[.., r, ..] = sum_s x[.., s, ..] matrix[s, r]`` on axis ``mode``: ``x x_mode matrix.T``.

    Never copies a transposed ``x`` (as ``np.tensordot`` does): x is viewed as (before, s, after) and
    the product is one GEMM, or a batch of them. For a last mode, ``(M.T @ X.T).T`` is used because
    OpenBLAS runs the tall-skinny ``X @ M`` several times slower.
    """
    shape = x.shape
    size, rank = matrix.shape
    before, after = math.prod(shape[:mode]), math.prod(shape[mode + 1:])
    if after == 1:
        out = np.ascontiguousarray((matrix.T @ x.reshape(before, size).T).T)
    elif before == 1:
        out = matrix.T @ x.reshape(size, after)
    else:
        out = np.matmul(matrix.T, x.reshape(before, size, after))
    return out.reshape(shape[:mode] + (rank,) + shape[mode + 1:])


def _project(x: np.ndarray, factors: Sequence[np.ndarray], modes: Sequence[int]) -> np.ndarray:
    """``x x_m factors[m].T`` for each m in ``modes`` (in that order)."""
    for m in modes:
        x = _contract(x, factors[m], m)
    return x


def _expand(core: np.ndarray, factors: Sequence[np.ndarray]) -> np.ndarray:
    """The full tensor of one Tucker block, ``core x_1 U_1 ... x_d U_d``."""
    return _project(core, [f.T for f in factors], range(core.ndim))


def _gram(x: np.ndarray, mode: int) -> np.ndarray:
    """``X_(mode) @ X_(mode).T`` for the mode unfolding, without forming the unfolding."""
    size = x.shape[mode]
    before, after = math.prod(x.shape[:mode]), x.size // (math.prod(x.shape[:mode]) * size)
    if after == 1:
        m = x.reshape(before, size)
        return m.T @ m
    if before == 1:
        m = x.reshape(size, after)
        return m @ m.T
    x3 = x.reshape(before, size, after)
    return np.matmul(x3, x3.transpose(0, 2, 1)).sum(axis=0)


def _leading_subspace(x: np.ndarray, mode: int, rank: int) -> np.ndarray:
    """Orthonormal basis of the ``rank`` leading left singular vectors of the mode unfolding.

    From the eigenvectors of its Gram matrix (tens of ms where an SVD of a 64 x 65,536 unfolding takes
    seconds); a direction of singular value s is resolved to about ``eps * s_max^2 / s^2``, ample for
    the truncations here. A mode kept whole gets the identity, which is exact.
    """
    if rank == x.shape[mode]:
        return np.eye(rank)
    _, vectors = np.linalg.eigh(_gram(x, mode))
    return np.ascontiguousarray(vectors[:, ::-1][:, :rank])


def _stacked_projections(tensor: np.ndarray, blocks_factors, modes: Sequence[int]) -> list[np.ndarray]:
    """``[tensor x_m U_n^(m)T for m in modes]`` for every block n, where ``modes[0] == 0``.

    Axis 0 is contracted for all blocks at once, one GEMM with the blocks' factors stacked, whose
    output rows then split into contiguous per-block slices.
    """
    first, *rest = modes
    stacked = _contract(tensor, np.concatenate([f[first] for f in blocks_factors], axis=1), first)
    partials, offset = [], 0
    for factors in blocks_factors:
        rank = factors[first].shape[1]
        partials.append(_project(stacked[offset:offset + rank], factors, rest))
        offset += rank
    return partials


def _sweep_projections(tensor: np.ndarray, blocks_factors: list[list[np.ndarray]], reversed_tensor=None):
    """For k = 0..d-1, yield ``(k, [T x_{m != k} U_n^(m)T for each block n])``, then ``(None, [T x_m U_n^(m)T])``.

    The factors are read when needed, so a caller that updates mode k's factors (in place, in
    ``blocks_factors``) before asking for the next item gets Gauss-Seidel projections. Two-level
    dimension tree: the tensor is contracted over the second half of the modes once for all
    first-half updates and vice versa. ``reversed_tensor`` (``T`` with its axes reversed, contiguous;
    made here if not given) lets the second half be contracted from a leading axis too.
    """
    d = tensor.ndim
    halves = (list(range(d // 2)), list(range(d // 2, d)))
    if halves[0]:
        if reversed_tensor is None:
            reversed_tensor = np.ascontiguousarray(tensor.transpose(range(d)[::-1]))
        reversed_partials = _stacked_projections(reversed_tensor, [f[::-1] for f in blocks_factors],
                                                 [d - 1 - m for m in halves[1][::-1]])
        partials = [np.ascontiguousarray(p.transpose(range(d)[::-1])) for p in reversed_partials]
        for k in halves[0]:
            others = [m for m in halves[0] if m != k]
            yield k, [_project(p, f, others) for p, f in zip(partials, blocks_factors)]
        partials = _stacked_projections(tensor, blocks_factors, halves[0])
    else:
        partials = [tensor] * len(blocks_factors)
    for k in halves[1]:
        others = [m for m in halves[1] if m != k]
        yield k, [_project(p, f, others) for p, f in zip(partials, blocks_factors)]
    yield None, [_project(p, f, halves[1]) for p, f in zip(partials, blocks_factors)]


def _tucker(tensor: np.ndarray, ranks: Sequence[int], n_iter: int, tol: float = 1e-12):
    """Tucker decomposition (HOSVD start, then HOOI sweeps until the fit gains less than ``tol``)."""
    factors = [_leading_subspace(tensor, k, r) for k, r in enumerate(ranks)]
    core = _project(tensor, factors, range(tensor.ndim))
    if all(r == s for r, s in zip(ranks, tensor.shape)):
        return core, factors
    fit = float(np.vdot(core, core))
    reversed_tensor = np.ascontiguousarray(tensor.transpose(range(tensor.ndim)[::-1])) if n_iter else None
    for _ in range(n_iter):
        for k, (projection,) in _sweep_projections(tensor, [factors], reversed_tensor):
            if k is None:
                core = projection
            else:
                factors[k] = _leading_subspace(projection, k, ranks[k])
        new_fit = float(np.vdot(core, core))
        if new_fit - fit <= tol * new_fit:
            break
        fit = new_fit
    return core, factors


def _cross(factors_a: Sequence[np.ndarray], factors_b: Sequence[np.ndarray]) -> list[np.ndarray]:
    return [a.T @ b for a, b in zip(factors_a, factors_b)]


class _Blocks:
    """N Tucker blocks (``cores[n]`` of shape R_1..R_d, ``factors[n][k]`` of shape (S_k, R_k), orthonormal columns)."""

    def __init__(self, cores, factors):
        self.cores, self.factors = cores, factors

    def dense(self) -> np.ndarray:
        return sum(_expand(core, factors) for core, factors in zip(self.cores, self.factors))

    def projected(self, m: int, n: int, modes=None) -> np.ndarray:
        """Block m seen through block n's factors: ``G_m x_k (U_n^(k)T U_m^(k))`` on ``modes`` (default: all)."""
        modes = range(self.cores[m].ndim) if modes is None else modes
        cross = _cross(self.factors[m], self.factors[n])  # (R_m, R_n), as _contract wants
        return _project(self.cores[m], cross, modes)

    def update_mode(self, k: int, projections: Sequence[np.ndarray]) -> None:
        """Least-squares mode-k factors of all blocks jointly (the rest fixed), then re-orthonormalised."""
        others = [m for m in range(self.cores[0].ndim) if m != k]
        rhs = [np.tensordot(p, core, axes=(others, others)) for p, core in zip(projections, self.cores)]
        gram = np.block([[np.tensordot(core_n, self.projected(m, n, others), axes=(others, others))
                          for m in range(len(self.cores))] for n, core_n in enumerate(self.cores)])
        solution = np.linalg.lstsq(gram, np.concatenate(rhs, axis=1).T, rcond=1e-12)[0].T  # gram is symmetric PSD
        offset = 0
        for n, core in enumerate(self.cores):
            rank = core.shape[k]
            q, r = np.linalg.qr(solution[:, offset:offset + rank])  # orthonormal factor, scale into the core
            offset += rank
            self.factors[n][k] = q
            self.cores[n] = _contract(core, r.T, k)

    def update_cores(self, projections: Sequence[np.ndarray]) -> None:
        """Block by block, the least-squares core with the others fixed: ``(T - sum_{m != n} X_m) x U_n^T``.

        ``projections[n] = T x U_n^T``; the factors are orthonormal, so no system is solved.
        """
        for n, projection in enumerate(projections):
            self.cores[n] = projection - sum(self.projected(m, n) for m in range(len(self.cores)) if m != n)

    def error(self, tensor: np.ndarray, squared_norm: float, projections: Sequence[np.ndarray]) -> float:
        """``||T - X||``, from ``projections[n] = T x U_n^T`` (explicitly when small, see _EXPLICIT_ERROR_BELOW)."""
        inner = sum(np.vdot(p, c) for p, c in zip(projections, self.cores))
        self_inner = sum(np.vdot(self.cores[n], self.projected(m, n))
                         for n in range(len(self.cores)) for m in range(len(self.cores)))
        squared = squared_norm - 2 * inner + self_inner
        if squared < (_EXPLICIT_ERROR_BELOW ** 2) * squared_norm:
            return float(np.linalg.norm(tensor - self.dense()))
        return math.sqrt(squared)


def _greedy_start(tensor, ranks, num_blocks, tucker_iter) -> _Blocks:
    """Greedy: block n is the Tucker decomposition of what blocks 1..n-1 left."""
    cores, factors, residual = [], [], tensor
    for _ in range(num_blocks):
        core, block_factors = _tucker(residual, ranks, tucker_iter)
        cores.append(core)
        factors.append(block_factors)
        residual = residual - _expand(core, block_factors)
    return _Blocks(cores, factors)


def _random_start(tensor, ranks, num_blocks, rng) -> _Blocks:
    """Random orthonormal factors, cores fitted by least squares."""
    factors = [[np.linalg.qr(rng.standard_normal((s, r)))[0] for s, r in zip(tensor.shape, ranks)]
               for _ in range(num_blocks)]
    blocks = _Blocks([np.zeros(ranks) for _ in range(num_blocks)], factors)
    blocks.update_cores([_project(tensor, f, range(tensor.ndim)) for f in factors])
    return blocks


def _refine(tensor, blocks: _Blocks, n_iter: int, tol: float, progress) -> float:
    """Alternating least squares sweeps (in place); returns the final error (unit-norm tensor: relative)."""
    squared_norm = float(np.vdot(tensor, tensor))
    error = float(np.linalg.norm(tensor - blocks.dense()))
    done, n_iter = 0, n_iter if len(blocks.cores) > 1 else 0
    reversed_tensor = np.ascontiguousarray(tensor.transpose(range(tensor.ndim)[::-1])) if n_iter else None
    for _ in range(n_iter):
        for k, projections in _sweep_projections(tensor, blocks.factors, reversed_tensor):
            if k is None:
                blocks.update_cores(projections)
            else:
                blocks.update_mode(k, projections)
        new_error = blocks.error(tensor, squared_norm, projections)
        done += 1
        progress.update(1)
        converged = error - new_error < tol * max(error, 1e-300) or new_error < tol
        error = new_error
        if converged:
            break
    progress.update(n_iter - done)
    return error


def block_term_decomposition(weight, *, in_shape: Sequence[int] | None = None,
                             out_shape: Sequence[int] | None = None, ranks: int | Sequence[int] = 4,
                             num_blocks: int = 2, n_iter: int = 50, tol: float = 1e-10,
                             num_restarts: int | None = None, tucker_iter: int = 10, random_state: int | None = 0,
                             full_space_iter: int | None = None, progress: bool | None = None):
    r"""Approximate a weight as a sum of ``num_blocks`` Tucker blocks.

    Args:
        weight (Tensor or ndarray): either an ``(out_features, in_features)`` matrix (as
            ``nn.Linear.weight``; then ``in_shape`` and ``out_shape`` are required), or a d-order tensor
            whose mode k has size ``I_k * J_k`` (then ``in_shape``/``out_shape`` are optional and, if
            given, split each mode into ``(I_k, J_k)``).
        in_shape (sequence of int, optional): ``I_1..I_d`` with ``prod = in_features``.
        out_shape (sequence of int, optional): ``J_1..J_d`` with ``prod = out_features``.
        ranks (int or sequence of int): Tucker ranks ``R_1..R_d`` of every block; an int is capped at
            each mode's size.
        num_blocks (int): the number ``N`` of blocks. Default: 2.
        n_iter (int): refinement sweeps per start, in the compressed core (0: greedy start only). Default: 50.
        tol (float): stop a refinement when a sweep improves the error by less than this fraction,
            or when the relative error falls below it. Default: 1e-10.
        num_restarts (int, optional): random starts tried besides the greedy one, in the compressed
            core; the best is kept. Default: 16 when that core has at most 65,536 entries, else 2.
        tucker_iter (int): most HOOI sweeps per Tucker fit (compression and greedy blocks); a fit stops
            earlier once a sweep gains less than 1e-12 of it. Default: 10.
        random_state (int, optional): seed of the random starts. Default: 0.
        full_space_iter (int, optional): refinement sweeps on the full tensor after lifting the best start
            back, done only when the compression lost more than ``tol`` (otherwise the optimum lies in
            the compressed subspace and these sweeps would repeat the core's). Default: ``n_iter``.
        progress (bool, optional): show a tqdm bar over the refinement sweeps. Default (None): shown
            on a terminal when the decomposition runs longer than 2 seconds.

    Returns:
        ``(cores, factors, relative_error)``: ``cores`` of shape ``(N, R_1..R_d)``; ``factors`` a list of
        d tensors, the k-th of shape ``(N, I_k, J_k, R_k)`` when the shapes are known, else
        ``(N, I_k * J_k, R_k)``; ``relative_error = ||W - W_bt||_F / ||W||_F``. Torch tensors (with the
        input's dtype and device) when ``weight`` is a tensor, NumPy arrays otherwise.
    """
    is_torch = isinstance(weight, torch.Tensor)
    array = weight.detach().cpu().double().numpy() if is_torch else np.asarray(weight, dtype=np.float64)
    if not np.isfinite(array).all():  # else the eigensolver fails later with "Eigenvalues did not converge"
        first = tuple(int(i) for i in np.argwhere(~np.isfinite(array))[0])
        raise ValueError(f"weight holds {int(np.isnan(array).sum())} NaN and {int(np.isinf(array).sum())} infinite "
                         f"entries (the first at index {first}, of shape {array.shape}): a block-term decomposition "
                         f"needs finite values")
    for name, value, low in (("num_blocks", num_blocks, 1), ("n_iter", n_iter, 0), ("tucker_iter", tucker_iter, 0),
                             ("num_restarts", num_restarts, 0), ("full_space_iter", full_space_iter, 0)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
            kind = "a positive" if low else "a non-negative"
            raise ValueError(f"{name} must be {kind} int, got {value!r}")
    if (in_shape is None) != (out_shape is None):
        raise ValueError(f"give both in_shape and out_shape or neither, got in_shape={in_shape}, out_shape={out_shape}")
    if array.ndim == 2 and in_shape is not None and len(in_shape) > 0 and (
            math.prod(in_shape) == array.shape[1] and math.prod(out_shape) == array.shape[0]):
        tensor = matrix_to_bt_tensor(array, in_shape, out_shape)
    elif in_shape is None:
        if array.ndim < 2:
            raise ValueError(f"a weight without in_shape/out_shape must be a tensor of order >= 2, "
                             f"got shape {array.shape}")
        tensor = array
    else:
        modes = tuple(i * j for i, j in zip(in_shape, out_shape))
        if len(in_shape) != len(out_shape) or tuple(array.shape) != modes:
            raise ValueError(f"weight of shape {tuple(array.shape)} is neither an (out_features, in_features) = "
                             f"({math.prod(out_shape)}, {math.prod(in_shape)}) matrix nor a tensor with modes "
                             f"I_k*J_k = {modes} (in_shape={tuple(in_shape)}, out_shape={tuple(out_shape)})")
        tensor = array
    sizes = tensor.shape
    if isinstance(ranks, int) and not isinstance(ranks, bool):
        ranks = [min(ranks, s) for s in sizes]
    ranks = [int(r) for r in ranks]
    if len(ranks) != len(sizes) or any(not 1 <= r <= s for r, s in zip(ranks, sizes)):
        raise ValueError(f"ranks={ranks} must hold one int in [1, mode size] for each of the modes {tuple(sizes)}")

    limit = (threadpool_limits(limits=_BLAS_THREADS, user_api="blas") if threadpool_limits is not None
             else contextlib.nullcontext())
    with limit:
        cores, factors, error = _decompose(tensor, ranks, num_blocks, n_iter, tol, num_restarts, tucker_iter,
                                           random_state, full_space_iter, progress)
    if in_shape is not None:
        factors = [f.reshape(num_blocks, i, j, r) for f, i, j, r in zip(factors, in_shape, out_shape, ranks)]
    if is_torch:
        def convert(a):
            return torch.from_numpy(np.ascontiguousarray(a)).to(device=weight.device, dtype=weight.dtype)
        return convert(cores), [convert(f) for f in factors], error
    return cores, factors, error


def _decompose(tensor, ranks, num_blocks, n_iter, tol, num_restarts, tucker_iter, random_state, full_space_iter,
               progress):
    """block_term_decomposition on a validated tensor: stacked cores, stacked (N, S_k, R_k) factors, error."""
    sizes = tensor.shape
    norm = np.linalg.norm(tensor)
    scale = norm if norm > 0 else 1.0
    tensor = np.ascontiguousarray(tensor / scale)  # unit norm: errors and tolerances below are relative
    rng = np.random.default_rng(random_state)
    # Compress: a sum of N blocks has multilinear rank <= N*R_k, so the search happens in the small core.
    compressed_ranks = [min(num_blocks * r, s) for r, s in zip(ranks, sizes)]
    small, bases = _tucker(tensor, compressed_ranks, tucker_iter)
    lost = math.sqrt(max(0.0, float(np.vdot(tensor, tensor) - np.vdot(small, small))))
    if small.shape == sizes:
        lost = 0.0  # identity bases: nothing was lost
    elif lost < _EXPLICIT_ERROR_BELOW:
        lost = float(np.linalg.norm(tensor - _expand(small, bases)))
    large = small.size > _LARGE_CORE
    if num_restarts is None:
        num_restarts = 2 if large else 16
    # On a large core every start gets a few sweeps and only the best one is refined further.
    screen = min(n_iter, _SCREEN_SWEEPS) if large else n_iter
    refine_full = lost > tol and num_blocks > 1
    full_space_iter = min(n_iter, 10) if full_space_iter is None else full_space_iter
    total = (1 + num_restarts) * screen + (n_iter - screen) + (full_space_iter if refine_full else 0)
    with tqdm(total=total, desc="block-term decomposition", unit="sweep", leave=False,
              disable=None if progress is None else not progress, delay=2.0 if progress is None else 0.0) as bar:
        best, best_error = None, np.inf
        for start in range(1 + num_restarts):
            blocks = (_greedy_start(small, ranks, num_blocks, tucker_iter) if start == 0
                      else _random_start(small, ranks, num_blocks, rng))
            error = _refine(small, blocks, screen, tol, bar)
            if error < best_error:
                best, best_error = blocks, error
            bar.set_postfix(best_error=f"{math.hypot(best_error, lost):.3g}")
        if screen < n_iter:
            _refine(small, best, n_iter - screen, tol, bar)
        blocks = _Blocks(best.cores, [[basis @ f for basis, f in zip(bases, factors)] for factors in best.factors])
        if refine_full:
            _refine(tensor, blocks, full_space_iter, tol, bar)
        error = float(np.linalg.norm(tensor - blocks.dense()))

    cores = np.stack([core * scale for core in blocks.cores])
    factors = [np.stack([fs[k] for fs in blocks.factors]) for k in range(len(sizes))]
    return cores, factors, error
