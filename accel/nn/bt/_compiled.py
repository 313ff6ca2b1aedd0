"""How :class:`~accel.nn.BTLinear` runs under ``torch.compile``: the dense path and the GEMM chain as opaque
``torch.library`` ops that run the eager kernels.

Traced as ordinary ops (:func:`~accel.nn.bt._dense.rebuild_matmul`, :func:`~accel.nn.bt._contract.gemm_chain_contract`
over the whole batch) both lose what makes the eager forms fast on CPU: Inductor allocates the dense path's ``W`` and
its gradient afresh on every call (full-size buffers that page-fault), and the chain runs the whole batch as one
piece whose intermediates fall out of the last-level cache. As ops they keep both:

- ``accel::bt_dense_v1`` / ``accel::bt_dense_backward_v1``: :func:`~accel.nn.bt._dense.dense_forward` and
  :func:`~accel.nn.bt._dense.dense_backward` with the layer's :class:`~accel.nn.bt._dense.RebuildWorkspace`, named
  by its integer key held in a 0-d tensor (an op takes no Python object; an int would be a constant Dynamo guards
  on, one graph per layer); the bias fused into the product, its gradient a GEMV, as eager.
- ``accel::bt_gemm_chain_v1`` / ``accel::bt_gemm_chain_backward_v1``: the chain over cache-sized pieces of the
  batch (:func:`~accel.nn.bt._contract.chunk_rows`), :func:`~accel.nn.bt._contract.chain_forward` and the
  hand-written :func:`~accel.nn.bt._contract.chain_backward` per piece; the piece count is computed at run time,
  so a symbolic batch works. What the backward needs (flat tensors of the whole batch, every piece's part in turn)
  stays in the layer's workspace between the two ops, named by the identity of the operands: as fresh op outputs
  these full-batch tensors would page-fault on every call. A backward whose forward's intermediates were
  replaced since (the layer called again first, or the workspace cleared) runs the forward again: never stale.

The small weight-side ops (``rebuild_operands``, ``mode_matrices``) stay in the graph with ordinary autograd.
Not for ``torch.export`` (nor ONNX or ``jit.trace``): an exported program holds ordinary ops only
(:mod:`accel.nn.bt._traced`).

The op names carry a version (``_v1``): a compiled graph cached on disk calls the ops by name, so a change of an
op's schema or meaning takes a new suffix (``_v2``) and old cached graphs can never call the new op.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from accel.nn.bt._common import matmul_dtype
from accel.nn.bt._contract import chain_backward, chain_forward, chunk_rows, mode_matrices, saved_numels
from accel.nn.bt._dense import (
    RebuildWorkspace,
    column_sums,
    dense_backward,
    dense_forward,
    rebuild_operands,
    workspace_by_key,
)

__all__ = ["DENSE_OP", "DENSE_BACKWARD_OP", "GEMM_CHAIN_OP", "GEMM_CHAIN_BACKWARD_OP", "compiled_dense",
           "compiled_gemm_chain"]

DENSE_OP, DENSE_BACKWARD_OP = "accel::bt_dense_v1", "accel::bt_dense_backward_v1"
GEMM_CHAIN_OP, GEMM_CHAIN_BACKWARD_OP = "accel::bt_gemm_chain_v1", "accel::bt_gemm_chain_backward_v1"


# ---- the dense path ----

@torch.library.custom_op(DENSE_OP, mutates_args=())
def _dense(x: Tensor, left: Tensor, right: Tensor, bias: Optional[Tensor], out0: int,
           workspace_key: Tensor) -> Tensor:
    """``x @ (left @ right) (+ bias)``, ``W`` written into the workspace registered under ``workspace_key`` (a 0-d
    CPU tensor: :attr:`~accel.nn.bt._dense.RebuildWorkspace.key_tensor`)."""
    return dense_forward(x, left, right, out0, workspace_by_key(workspace_key), bias)


@_dense.register_fake
def _(x, left, right, bias, out0, workspace_key):
    return x.new_empty(x.shape[0], left.shape[0] * right.shape[1] // x.shape[1])


@torch.library.custom_op(DENSE_BACKWARD_OP, mutates_args=())
def _dense_backward(grad_y: Tensor, x: Tensor, left: Tensor, right: Tensor, out0: int, workspace_key: Tensor,
                    needs: list[bool]) -> list[Tensor]:
    """The gradients of ``x``, ``left``, ``right`` and the bias, each empty where ``needs`` says it is not needed
    (an op returns tensors only; none aliases an input or the workspace)."""
    grads = dense_backward(grad_y, x, left, right, out0, workspace_by_key(workspace_key), tuple(needs[:3]))
    grads = (*grads, column_sums(grad_y) if needs[3] else None)
    return [g if g is not None else x.new_empty(0) for g in grads]


@_dense_backward.register_fake
def _(grad_y, x, left, right, out0, workspace_key, needs):
    shapes = (x.shape, left.shape, right.shape, (grad_y.shape[1],))
    return [x.new_empty(shape if need else (0,)) for shape, need in zip(shapes, needs)]


def _dense_setup_context(ctx, inputs, output):
    x, left, right, _, ctx.out0, workspace_key = inputs
    ctx.save_for_backward(x, left, right, workspace_key)


def _dense_autograd(ctx, grad_y):
    x, left, right, workspace_key = ctx.saved_tensors
    needs = list(ctx.needs_input_grad[:4])
    grads = torch.ops.accel.bt_dense_backward_v1(grad_y, x, left, right, ctx.out0, workspace_key, needs)
    return (*[g if need else None for g, need in zip(grads, needs)], None, None)


_dense.register_autograd(_dense_autograd, setup_context=_dense_setup_context)


def compiled_dense(x: Tensor, core: Tensor, factors, workspace: RebuildWorkspace,
                   bias: Tensor | None = None) -> Tensor:
    """:func:`~accel.nn.bt._dense.rebuild_linear` (the bias included) as one op forward and one backward."""
    left, right = rebuild_operands(core, list(factors))
    dtype = matmul_dtype(x, left, right)
    return torch.ops.accel.bt_dense_v1(x.to(dtype).contiguous(), left.to(dtype), right.to(dtype),
                                       None if bias is None else bias.to(dtype), factors[0].shape[2],
                                       workspace.key_tensor)


# ---- the GEMM chain ----


def _shapes(merged: Tensor, in_shape, out_shape, ranks) -> tuple:
    return tuple(in_shape), tuple(out_shape), tuple(ranks), merged.shape[0]


def _pieces(x: Tensor, shapes: tuple, max_intermediate_bytes: int):
    """``(start, rows)`` of each piece of the batch, as the eager chain splits it."""
    batch = x.shape[0]
    rows = chunk_rows(shapes, batch, x.element_size(), max_intermediate_bytes, x.device.type)
    return [(start, min(rows, batch - start)) for start in range(0, batch, max(rows, 1))]


def _operands_id(x, merged, first, mode, max_intermediate_bytes) -> tuple:
    """What identifies a forward's intermediates: its operands' memory and layout, and the piece size. The backward
    op's operands are the forward's own (saved by autograd, which refuses a backward after they were modified in
    place); while they are alive no other tensor has their addresses, so an equal identity means equal data."""
    return (max_intermediate_bytes, *[(t.data_ptr(), tuple(t.shape), t.stride(), t.dtype, t.device)
                                      for t in (x, merged, first, *mode)])


def _forward_pieces(x, merged, first, mode, shapes, max_intermediate_bytes, y, saved) -> None:
    """The chain over the batch's pieces, ``y`` and the flat ``saved`` tensors written in place."""
    numels = saved_numels(*shapes)
    has_p = len(shapes[0]) > 2
    for start, rows in _pieces(x, shapes, max_intermediate_bytes):
        parts = [s[start * n:(start + rows) * n] for s, n in zip(saved, numels)]
        sinks = {"y": y[start:start + rows], "p": parts[0] if has_p else None, "zp": parts[int(has_p)],
                 "inner": parts[int(has_p) + 1:]}
        chain_forward(x[start:start + rows], shapes, merged, first, mode, sinks)


@torch.library.custom_op(GEMM_CHAIN_OP, mutates_args=())
def _gemm_chain(x: Tensor, merged: Tensor, first: Tensor, mode: list[Tensor], in_shape: list[int],
                out_shape: list[int], ranks: list[int], max_intermediate_bytes: int,
                workspace_key: Tensor) -> Tensor:
    """``y = x W`` ``(B, prod J)`` through the GEMM chain in cache-sized pieces; what its backward needs
    (:func:`~accel.nn.bt._contract.saved_numels`, every piece's part in turn) is kept in the layer's workspace
    under the identity of its operands (:func:`_operands_id`)."""
    shapes = _shapes(merged, in_shape, out_shape, ranks)
    batch = x.shape[0]
    workspace = workspace_by_key(workspace_key)
    y = x.new_empty(batch, math.prod(out_shape))
    saved = [workspace.get(f"chain_saved_{k}", (batch * n,), x) for k, n in enumerate(saved_numels(*shapes))]
    workspace.chain_saved = None  # being overwritten: no earlier forward's backward may take them
    _forward_pieces(x, merged, first, mode, shapes, max_intermediate_bytes, y, saved)
    workspace.chain_saved = (_operands_id(x, merged, first, mode, max_intermediate_bytes), saved)
    return y


@_gemm_chain.register_fake
def _(x, merged, first, mode, in_shape, out_shape, ranks, max_intermediate_bytes, workspace_key):
    return x.new_empty(x.shape[0], math.prod(out_shape))


@torch.library.custom_op(GEMM_CHAIN_BACKWARD_OP, mutates_args=())
def _gemm_chain_backward(grad_y: Tensor, x: Tensor, merged: Tensor, first: Tensor, mode: list[Tensor],
                         in_shape: list[int], out_shape: list[int], ranks: list[int],
                         max_intermediate_bytes: int, workspace_key: Tensor, need_x: bool) -> list[Tensor]:
    """``[grad_x, grad_merged, grad_first, *grad_mode]`` (``grad_x`` empty unless ``need_x``), each piece's
    gradients from :func:`~accel.nn.bt._contract.chain_backward`, the weights' summed over the pieces.

    The forward's intermediates come from the workspace where they are still the ones of these operands; where a
    later forward (the layer called again before this backward) or ``workspace.clear()`` replaced them, the
    forward is run again first."""
    shapes = _shapes(merged, in_shape, out_shape, ranks)
    numels = saved_numels(*shapes)
    workspace = workspace_by_key(workspace_key)
    kept = workspace.chain_saved
    if kept is not None and kept[0] == _operands_id(x, merged, first, mode, max_intermediate_bytes):
        saved = kept[1]
    else:
        saved = [x.new_empty(x.shape[0] * n) for n in numels]
        _forward_pieces(x, merged, first, mode, shapes, max_intermediate_bytes,
                        x.new_empty(x.shape[0], math.prod(out_shape)), saved)
    has_p = len(in_shape) > 2
    grad_x = x.new_empty(x.shape if need_x else (0,))
    totals = None
    for start, rows in _pieces(x, shapes, max_intermediate_bytes):
        parts = [s[start * n:(start + rows) * n] for s, n in zip(saved, numels)]
        p = parts[0].view(merged.shape[0], -1, merged.shape[1]) if has_p else None
        zp = parts[int(has_p)].view(-1, first.shape[0])
        gx, *grads = chain_backward(grad_y[start:start + rows], x[start:start + rows], shapes, merged, first, mode,
                                    p, zp, parts[int(has_p) + 1:], need_x)
        grads = [grads[0], grads[1], *grads[2]]
        if need_x:
            grad_x[start:start + rows] = gx
        totals = grads if totals is None else [t.add_(g) for t, g in zip(totals, grads)]
    return [grad_x, *totals]


@_gemm_chain_backward.register_fake
def _(grad_y, x, merged, first, mode, in_shape, out_shape, ranks, max_intermediate_bytes, workspace_key,
      need_x):
    # contiguous, as the kernels return them (the mode matrices themselves may be strided views)
    return [x.new_empty(x.shape if need_x else (0,)), *[t.new_empty(t.shape) for t in (merged, first, *mode)]]


def _chain_setup_context(ctx, inputs, output):
    x, merged, first, mode, ctx.in_shape, ctx.out_shape, ctx.ranks, ctx.max_intermediate_bytes, key = inputs
    ctx.num_mode = len(mode)
    ctx.save_for_backward(x, merged, first, *mode, key)


def _chain_autograd(ctx, grad_y):
    x, merged, first, *rest = ctx.saved_tensors
    mode, key = rest[:ctx.num_mode], rest[ctx.num_mode]
    need_x = ctx.needs_input_grad[0]
    grad_x, grad_merged, grad_first, *grad_mode = torch.ops.accel.bt_gemm_chain_backward_v1(
        grad_y, x, merged, first, mode, ctx.in_shape, ctx.out_shape, ctx.ranks,
        ctx.max_intermediate_bytes, key, need_x)
    return grad_x if need_x else None, grad_merged, grad_first, grad_mode, None, None, None, None, None


_gemm_chain.register_autograd(_chain_autograd, setup_context=_chain_setup_context)


def compiled_gemm_chain(x: Tensor, core: Tensor, factors, in_shape, out_shape, ranks, max_intermediate_bytes: int,
                        workspace: RebuildWorkspace) -> Tensor:
    """:func:`~accel.nn.bt._contract.chain_product` as one op forward and one backward."""
    if len(in_shape) < 2:
        raise ValueError(f"the GEMM chain needs d >= 2 modes, got in_shape={tuple(in_shape)}")
    dtype = matmul_dtype(x, core)  # under autocast the weight-side ops come out in mixed dtypes
    mode, merged, first = mode_matrices(core.to(dtype), [f.to(dtype) for f in factors])
    return torch.ops.accel.bt_gemm_chain_v1(x.to(dtype).contiguous(), merged, first, mode, list(in_shape),
                                            list(out_shape), list(ranks), max_intermediate_bytes,
                                            workspace.key_tensor)
