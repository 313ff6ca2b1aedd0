"""Shapes and ranks of a :class:`~accel.nn.BTLinear`: balanced factorisations of the feature sizes, and the
Tucker ranks resolved from an int, one int per mode, or tensorly-torch's spellings: a fraction of the dense
parameters, or ``"same"`` (as many as the dense weight)."""
from __future__ import annotations

import functools
import math
import numbers
import warnings
from typing import Sequence

__all__ = ["balanced_factors", "check_shape", "auto_num_modes", "weight_parameters", "resolve_ranks"]


def balanced_factors(n: int, num_factors: int) -> tuple[int, ...]:
    """Split ``n`` into ``num_factors`` integer factors as equal as possible, largest first.

    Among all factorisations, the one with the smallest largest factor (then the largest smallest
    factor) wins: ``balanced_factors(57600, 4) == (16, 16, 15, 15)``.
    """
    if n < 1 or num_factors < 1:
        raise ValueError(f"need n >= 1 and num_factors >= 1, got n={n}, num_factors={num_factors}")

    small = [k for k in range(1, math.isqrt(n) + 1) if n % k == 0]
    divisors = sorted(set(small) | {n // k for k in small}, reverse=True)

    @functools.cache
    def search(rest: int, slots: int, cap: int):
        if slots == 1:
            return (rest,) if rest <= cap else None
        best = None
        low = math.ceil(rest ** (1.0 / slots) - 1e-9)  # the largest factor is at least the slots-th root
        for first in divisors:
            if first > min(cap, rest) or rest % first:
                continue
            if first < low:
                break
            if (tail := search(rest // first, slots - 1, first)) is not None:
                candidate = (first, *tail)
                if best is None or (candidate[0], -candidate[-1]) < (best[0], -best[-1]):
                    best = candidate
        return best

    return search(n, num_factors, n)


def auto_num_modes(*sizes: int, max_modes: int = 4) -> int:
    """The largest d <= max_modes for which every size splits into d factors all >= 2."""
    for d in range(max_modes, 1, -1):
        if all(min(balanced_factors(s, d)) >= 2 for s in sizes):
            return d
    return 1


def check_shape(name: str, shape: Sequence[int], total: int, features_name: str) -> tuple[int, ...]:
    shape = tuple(int(s) for s in shape)
    if not shape or any(s < 1 for s in shape):
        raise ValueError(f"{name} must be a non-empty sequence of positive ints, got {shape}")
    if math.prod(shape) != total:
        raise ValueError(f"{name}={shape} has product {math.prod(shape)}, but {features_name}={total}")
    return shape


def weight_parameters(in_shape, out_shape, ranks, num_blocks) -> int:
    """``N * (sum_k I_k J_k R_k + prod_k R_k)``: the parameters of a block-term weight."""
    return num_blocks * (sum(i * j * r for i, j, r in zip(in_shape, out_shape, ranks)) + math.prod(ranks))


def resolve_ranks(ranks, in_shape, out_shape, num_blocks) -> tuple[int, ...]:
    """``R_1..R_d`` from ``ranks`` as :class:`~accel.nn.BTLinear` takes it (an int, capped per mode with a
    warning; a float in (0, 1], a fraction of the dense parameters; ``"same"``, the fraction 1; or one int per
    mode). Errors name the argument ``ranks``."""
    sizes = [i * j for i, j in zip(in_shape, out_shape)]
    if isinstance(ranks, str):
        if ranks != "same":
            raise ValueError(f"ranks={ranks!r}: the only string is 'same' (a weight with at most the dense "
                             f"weight's parameters); otherwise give an int, a float in (0, 1] or "
                             f"{len(sizes)} ints (one per mode)")
        ranks = 1.0
    if isinstance(ranks, float):
        return _ranks_for_fraction(ranks, in_shape, out_shape, num_blocks)
    if isinstance(ranks, numbers.Integral) and not isinstance(ranks, bool):
        if ranks < 1:
            raise ValueError(f"ranks must be >= 1, got {ranks}")
        capped = tuple(min(int(ranks), s) for s in sizes)
        if any(r < ranks for r in capped):
            warnings.warn(f"ranks={ranks} exceeds the size I_k*J_k of mode(s) "
                          f"{[k for k, s in enumerate(sizes) if s < ranks]} (mode sizes {tuple(sizes)}): "
                          f"capped to ranks={capped}", stacklevel=3)
        return capped
    if isinstance(ranks, (str, bytes)) or not isinstance(ranks, Sequence):
        raise TypeError(f"ranks must be an int, a float in (0, 1], 'same' or {len(sizes)} ints (one per mode), "
                        f"got {ranks!r}")
    ranks = tuple(ranks)
    if len(ranks) != len(sizes) or any(isinstance(r, bool) or not isinstance(r, numbers.Integral) for r in ranks):
        raise ValueError(f"ranks must be an int or {len(sizes)} ints (one per mode), got {ranks}")
    ranks = tuple(int(r) for r in ranks)
    for k, (r, s) in enumerate(zip(ranks, sizes)):
        if not 1 <= r <= s:
            raise ValueError(f"ranks[{k}]={r} must be in [1, I_{k}*J_{k}] = [1, {s}] "
                             f"(in_shape={in_shape}, out_shape={out_shape})")
    return ranks


def _ranks_for_fraction(fraction: float, in_shape, out_shape, num_blocks) -> tuple[int, ...]:
    """The largest common rank (capped per mode) whose weight has at most ``fraction`` of the dense parameters."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"ranks={fraction!r}: a float rank is a fraction of the dense weight's parameters and "
                         f"must be in (0, 1] ('same' is 1.0); give an int (or one int per mode) for a rank")
    sizes = [i * j for i, j in zip(in_shape, out_shape)]
    budget = fraction * math.prod(in_shape) * math.prod(out_shape)

    def parameters(rank):
        return weight_parameters(in_shape, out_shape, [min(rank, s) for s in sizes], num_blocks)
    if parameters(1) > budget:
        raise ValueError(f"ranks={fraction!r} allows {budget:,.0f} weight parameters, but rank 1 with "
                         f"num_blocks={num_blocks} already takes {parameters(1):,} (in_shape={in_shape}, "
                         f"out_shape={out_shape})")
    low, high = 1, max(sizes)  # parameters() grows with the rank: the largest rank within the budget
    while low < high:
        middle = (low + high + 1) // 2
        low, high = (middle, high) if parameters(middle) <= budget else (low, middle - 1)
    return tuple(min(low, s) for s in sizes)
