"""The low-rank path of :class:`~accel.nn.BTLinear`: the input meets the block-term weight's two thin factors in
turn, and ``W`` is never built.

Every block-term weight is a product of two thin matrices (the split the dense path builds ``W`` from,
:func:`~accel.nn.bt._dense.rebuild_operands`): factor 0 as ``left`` ``(J_0, I_0 K)`` and the core contracted with
factors 1.. as ``right`` ``(I', K J')``, with ``K = N R_0`` and ``I' = I_1..``, ``J' = J_1..``. So::

    z[b, i_0, k, j'] = sum_i'       x[b, i_0, i'] right[i', k j']     one GEMM, (B I_0, I') x (I', K J')
    y[b, j_0, j']    = sum_(i_0 k)  left[j_0, i_0 k] z[b, i_0 k, j']   one small GEMM per row

Forward flops ``2 B I K J' (1 + J_0 / I')`` against the dense product's ``2 B I J``: fewer wherever
``K (1 / J_0 + 1 / I') < 1``, i.e. a small ``N R_0`` beside a wide first output mode and a wide rest of the
input. The backward (input without grad) is the same two GEMMs again, and the weight-side work is only
``right``, ``N R_0`` times ``W / (I_0 J_0)`` elements. Which path a batch takes is the cost model's choice
(:mod:`accel.nn.bt._paths`).

Ordinary differentiable ops only, so the same function is its own traced twin (compile, export, ONNX).
"""
from __future__ import annotations

import functools
import math

import torch

from accel.nn.bt._common import einsum_cached, einsum_flops, matmul_dtype, rest_equation, rest_shapes

__all__ = ["lowrank_costs", "lowrank_linear", "lowrank_operands"]


def lowrank_operands(core: torch.Tensor, factors) -> tuple[torch.Tensor, torch.Tensor]:
    """``(left, right)``: factor 0 as ``(J_0, I_0 K)`` and the rest of the block term as ``(I', K J')``
    (``K = N R_0``). Differentiable."""
    num_blocks, in0, out0, rank0 = factors[0].shape
    right = einsum_cached(rest_equation(len(factors), inputs_first=True), core, *factors[1:])
    in_rest = math.prod([f.shape[1] for f in factors[1:]])  # a list: strict export cannot trace a generator here
    left = factors[0].permute(2, 1, 0, 3).reshape(out0, in0 * num_blocks * rank0)
    return left, right.reshape(in_rest, -1)


def lowrank_linear(x: torch.Tensor, core: torch.Tensor, factors, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W (+ bias)`` through ``left`` and ``right`` (module docstring); ``x`` is ``(B, prod I_k)``, the
    result ``(B, prod J_k)``."""
    left, right = lowrank_operands(core, list(factors))
    dtype = matmul_dtype(x, left, right)
    left, right = left.to(dtype), right.to(dtype)
    batch, in_features = x.shape
    in_rest = right.shape[0]
    in0 = in_features // in_rest
    k = left.shape[1] // in0
    z = torch.mm(x.to(dtype).reshape(batch * in0, in_rest), right)  # (B I_0, K J')
    z = z.view(batch, in0 * k, right.shape[1] // k)  # (B, I_0 K, J')
    # bmm with left expanded, not a 2-D @ 3-D matmul: that copies z into a transposed layout first
    y = torch.bmm(left.expand(batch, -1, -1), z).view(batch, left.shape[0] * z.shape[2])  # (B, J_0 J')
    return y if bias is None else y + bias.to(y.dtype)


@functools.lru_cache(maxsize=256)
def lowrank_costs(in_shape, out_shape, ranks, num_blocks, batch) -> tuple[int, int, int]:
    """``(gemm_flops, small_flops, elements)`` of a forward pass: the large GEMM (input by ``right``) and the
    per-row GEMMs plus building ``right`` (small ops), and the elements written (``right``, ``z``, ``y``)."""
    in0, out0, rank0 = in_shape[0], out_shape[0], ranks[0]
    in_rest, out_rest, k = math.prod(in_shape[1:]), math.prod(out_shape[1:]), num_blocks * rank0
    gemm = 2 * batch * in0 * in_rest * k * out_rest
    per_row = 2 * batch * out0 * in0 * k * out_rest
    right_flops = einsum_flops(rest_equation(len(in_shape), inputs_first=True),
                               rest_shapes(in_shape, out_shape, ranks, num_blocks))
    elements = in_rest * k * out_rest + batch * in0 * k * out_rest + batch * out0 * out_rest
    return gemm, per_row + right_flops, elements
