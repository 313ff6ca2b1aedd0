"""The eager factorized product of :class:`~accel.nn.BTLinear`: ``y = x W`` without rebuilding ``W``.

The batch is split into pieces whose largest intermediate fits ``max_intermediate_bytes`` (on CPU these
contractions are memory-bound: pieces that stay in the last-level cache run faster, and allocations above
glibc's 32 MiB mmap threshold page-fault on every call, measured ~0.9 ms per MiB on the development VM,
10x a reused allocation); each piece goes through the GEMM chain (:mod:`accel.nn.bt._contract`) or the
``opt_einsum`` path (:mod:`accel.nn.bt._paths`). Module-level functions of the weights, so the compiled
twin (:mod:`accel.nn.bt._compiled`) runs exactly this code on the real tensors.
"""
from __future__ import annotations

import math

import torch

from accel.nn.bt._contract import gemm_chain_contract, gemm_chain_largest, grouped_shapes
from accel.nn.bt._dense import matmul_dtype
from accel.nn.bt._paths import chain_plan, factorized_expression

__all__ = ["chunk_rows", "factorized_product"]


def chunk_rows(key: tuple, method: str, batch: int, element_size: int, max_intermediate_bytes: int,
               device_type: str = "cpu") -> int:
    """Rows per piece of a factorized product over ``batch`` rows (``key``: in_shape, out_shape, ranks,
    num_blocks). Equal pieces, so at most two cached expressions; GPU inputs are not split."""
    if batch <= 1 or device_type != "cpu":
        return max(batch, 1)
    if method == "gemm":  # the chain on the modes as chain_plan groups them for this batch
        split = chain_plan(*key, batch)[0]
        shapes = key[:3] if split is None else grouped_shapes(*key[:3], split)
        largest = gemm_chain_largest(*shapes, key[3], batch)
    else:
        largest = factorized_expression(*key, batch)[2]
    per_row = largest * element_size / batch
    rows = max(1, int(max_intermediate_bytes // max(per_row, 1)))
    pieces = math.ceil(batch / rows)
    return math.ceil(batch / pieces)


def contract(x: torch.Tensor, core: torch.Tensor, factors, key: tuple, method: str) -> torch.Tensor:
    """One piece: ``x`` ``(B, prod I_k)`` -> ``(B, prod J_k)`` by ``method`` (``"gemm"`` or ``"einsum"``)."""
    in_shape, out_shape, ranks, _ = key
    if method == "gemm":
        return gemm_chain_contract(x, core, factors, in_shape, out_shape, ranks, chain_plan(*key, x.shape[0])[0])
    expression = factorized_expression(*key, x.shape[0])[0]
    dtype = matmul_dtype(x, core)  # opt_einsum's pairwise steps refuse autocast's mixed dtypes
    operands = [t.to(dtype) for t in (core, *factors)]
    y = expression(x.reshape(x.shape[0], *in_shape).to(dtype), *operands, backend="torch")
    return y.reshape(x.shape[0], math.prod(out_shape))


def factorized_product(x: torch.Tensor, core: torch.Tensor, factors, key: tuple, method: str,
                       max_intermediate_bytes: int) -> torch.Tensor:
    """``x @ W`` over the whole batch in cache-sized pieces, differentiable (each piece's own backward)."""
    batch = x.shape[0]
    if not batch:
        return contract(x, core, factors, key, method)
    rows = chunk_rows(key, method, batch, x.element_size(), max_intermediate_bytes, x.device.type)
    pieces = x.split(rows)
    if len(pieces) == 1:
        return contract(x, core, factors, key, method)
    return torch.cat([contract(piece, core, factors, key, method) for piece in pieces])
