"""Helpers every BT strategy uses: the dtype products run in, and small einsums along a cached pairwise order."""
from __future__ import annotations

import functools
import math

import opt_einsum
import torch

__all__ = ["contract_steps", "einsum_cached", "einsum_flops", "matmul_dtype", "rest_equation", "rest_shapes"]


def matmul_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """The dtype the products of ``tensors`` should run in: autocast's where it is on for their device
    (small weight-side ops then come out in mixed dtypes, which ``mm`` refuses), else the promoted one."""
    device = tensors[0].device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def contract_steps(steps, operands) -> torch.Tensor:
    """Run ``opt_einsum``'s pairwise contraction list with ``torch.einsum`` (as ``opt_einsum`` does:
    each step pops its operands by position and appends the result)."""
    operands = list(operands)
    for positions, equation in steps:
        picked = [operands.pop(p) for p in positions]
        operands.append(torch.einsum(equation, *picked))
    return operands[0]


@functools.lru_cache(maxsize=256)
def _searched_steps(equation: str, shapes: tuple) -> tuple:
    _, info = opt_einsum.contract_path(equation, *shapes, shapes=True)
    return tuple((tuple(step[0]), step[2]) for step in info.contraction_list)


@torch.compiler.assume_constant_result  # a constant for Dynamo: the search is not traced (nor its lru_cache)
def _pairwise_steps(equation: str, shapes: tuple) -> tuple:
    return _searched_steps(equation, shapes)


def einsum_cached(equation: str, *operands: torch.Tensor) -> torch.Tensor:
    """``torch.einsum(equation, *operands)`` along a pairwise order searched once per shapes (given three or more
    operands, ``torch.einsum`` would search the order on every call)."""
    return contract_steps(_pairwise_steps(equation, tuple(tuple(t.shape) for t in operands)), operands)


@functools.lru_cache(maxsize=256)
def einsum_flops(equation: str, shapes: tuple) -> int:
    """Flops of :func:`einsum_cached` as torch runs it: each pairwise step is one (batched) GEMM over all the
    indices its operands carry, ``2 x`` their sizes' product."""
    inputs = equation.split("->")[0].split(",")
    if len(inputs) < 2:  # one operand: a permutation, no GEMM
        return 0
    sizes = {index: size for term, shape in zip(inputs, shapes) for index, size in zip(term, shape)}
    total = 0
    for _, step in _searched_steps(equation, shapes):
        total += 2 * math.prod(sizes[index] for index in set(step.split("->")[0]) - {","})
    return total


def rest_equation(d: int, inputs_first: bool = False) -> str:
    """The einsum of ``core, factor_1..factor_{d-1}`` into the rest of the block term (all but factor 0):
    ``(N, R_0, I_1.., J_1..)``, or with ``inputs_first`` ``(I_1.., N, R_0, J_1..)`` (the low-rank path's)."""
    ranks = "abcdefghij"[:d]
    ins, outs = "klmnopqrst"[:d], "uvwxyzABCD"[:d]
    terms = [f"Z{ranks}"] + [f"Z{ins[k]}{outs[k]}{ranks[k]}" for k in range(1, d)]
    output = f"{ins[1:]}Z{ranks[0]}{outs[1:]}" if inputs_first else f"Z{ranks[0]}{ins[1:]}{outs[1:]}"
    return ",".join(terms) + "->" + output


def rest_shapes(in_shape, out_shape, ranks, num_blocks) -> tuple:
    """The shapes of ``core, factor_1..factor_{d-1}`` (the operands of :func:`rest_equation`)."""
    return ((num_blocks, *ranks),) + tuple((num_blocks, i, j, r)
                                           for i, j, r in zip(in_shape[1:], out_shape[1:], ranks[1:]))
