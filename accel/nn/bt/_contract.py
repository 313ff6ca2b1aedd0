"""The block-term contraction ``y = x W`` as a chain of plain GEMMs with a hand-written backward.

Why not ``opt_einsum`` + autograd: its pairwise steps contract over many small indices, and autograd
copies the gradients of the transposed/strided views between them. Here every step is one
``mm``/``bmm`` whose large operand is a contiguous reshape (transposed operands are free in BLAS),
and the only permutes of large tensors are two explicit ones (forward and backward).

Order, for ``x`` of shape ``(B, I_0, .., I_{d-1})``, ``N`` blocks and ``d >= 2`` modes:

1. for ``k = d-1 .. 2``: consume the innermost input mode ``I_k`` with factor ``k``; its output modes
   ``(J_k, R_k)`` are prepended, so the next input mode becomes innermost. One GEMM each (the
   first merges the ``N`` blocks into its columns, the others are batched over blocks).
2. one permute to ``(N, B, I_0, J_2..J_{d-1}, R_2..R_{d-1}, I_1)``, then contract
   ``(R_2..R_{d-1}, I_1)`` with the core merged into factor 1 (``C``, small).
3. a small permute and one GEMM with factor 0 that also sums over the blocks.

The small weight reshapes (``C``, the factor matrices) are done by ordinary autograd outside.

Eagerly on CPU the batch is split into pieces whose largest intermediate fits ``max_intermediate_bytes``
(:func:`chain_product`): these contractions are memory-bound, pieces that stay in the last-level cache run faster,
and large fresh allocations page-fault on every call. Traced (compile, export) the whole batch is one piece, as the
piece count depends on the batch size; the arithmetic is the same ``autograd.Function``.
"""
from __future__ import annotations

import math

import torch

from accel.nn.bt._common import matmul_dtype

__all__ = ["chain_backward", "chain_forward", "chain_product", "chunk_rows", "gemm_chain_contract", "gemm_chain_elements", "gemm_chain_flops",
           "gemm_chain_training_flops", "gemm_chain_largest", "mode_matrices", "saved_numels"]


def mode_matrices(core, factors):
    """The weights as the matrices the GEMM chain uses: ``(mode, merged, first)`` (small tensors; differentiable)."""
    num_blocks = core.shape[0]
    # factor k (k >= 2) as (N, J_k R_k, I_k)
    mode = [f.permute(0, 2, 3, 1).reshape(num_blocks, -1, f.shape[1]) for f in factors[:1:-1]]
    # core merged with factor 1: (N, R_2..R_{d-1} I_1, R_0 J_1)
    r0 = core.shape[1]
    core3 = core.reshape(num_blocks, r0, core.shape[2], -1)  # (N, R_0, R_1, Rmid)
    merged = torch.einsum("nabm,nijb->nmiaj", core3, factors[1])
    merged = merged.reshape(num_blocks, -1, r0 * factors[1].shape[2])
    # factor 0 as (N R_0 I_0, J_0)
    first = factors[0].permute(0, 3, 1, 2).reshape(-1, factors[0].shape[2])
    return mode, merged, first


def _matmul(a, b, sink):
    """``a @ b``, written into ``sink`` (a flat buffer of the result's size) when given."""
    if sink is None:
        return torch.matmul(a, b)
    shape = (*torch.broadcast_shapes(a.shape[:-2], b.shape[:-2]), a.shape[-2], b.shape[-1])
    return torch.matmul(a, b, out=sink.view(shape))


def _copied(value, sink, shape):
    """``value`` as a contiguous tensor of ``shape``: a copy into ``sink`` (flat) when given."""
    if sink is None:
        return value.reshape(shape)
    sink.view(value.shape).copy_(value)
    return sink.view(shape)


def chain_forward(x, shapes, merged, first, mode, sinks=None):
    """The forward chain: ``(y, p, zp, inner)``, ``y`` ``(B, prod J)`` and what :func:`chain_backward` needs (``p``
    the core step's input, ``None`` for d = 2; ``zp`` the last GEMM's input; ``inner`` the outputs of the mode steps
    but the last). ``mode``, ``merged`` and ``first`` come from :func:`mode_matrices`, ``shapes`` is ``(in_shape,
    out_shape, ranks, num_blocks)``.

    ``sinks``: optional flat tensors the results are written into instead of fresh ones, ``{"y": .., "p": ..,
    "zp": .., "inner": [..]}`` (the compiled op's pieces of the whole batch's outputs, :func:`saved_numels`).

    The batch stays the outermost dimension of the mode steps: with the new modes prepended per
    sample, each GEMM writes rows of a few hundred or thousand contiguous elements (one
    ``(N J R) x (rest)`` matrix per sample). Prepending to the whole batch at once writes rows of
    millions of elements, which MKL runs several times slower.
    """
    sinks = sinks or {}
    inner_sinks = sinks.get("inner", [None] * len(mode))
    in_shape, out_shape, ranks, num_blocks = shapes
    d = len(in_shape)
    batch = x.shape[0]
    inner = []
    t = x
    for step, matrix in enumerate(mode):  # k = d-1 .. 2
        size = in_shape[d - 1 - step]
        sink = inner_sinks[step] if step < len(mode) - 1 else None  # the last one is copied into p below
        if step == 0:  # (N J R, I) @ (B, I, rest) -> (B, N J R, rest)
            t = _matmul(matrix.reshape(-1, size), x.reshape(batch, -1, size).transpose(1, 2), sink)
        else:  # (N, J R, I) @ (B, N, I, rest) -> (B, N, J R, rest)
            t = _matmul(matrix, t.reshape(batch, num_blocks, -1, size).transpose(2, 3), sink)
        if step < len(mode) - 1:
            inner.append(t)
    jmid, rmid = out_shape[2:], ranks[2:]
    rows = batch * in_shape[0] * math.prod(jmid)
    if d == 2:
        p = None
        z = torch.bmm(x.reshape(1, -1, in_shape[1]).expand(num_blocks, -1, -1), merged)
    else:
        # t is (B, N, J_2, R_2, .., J_{d-1}, R_{d-1}, I_0, I_1)
        m = d - 2
        t = t.reshape(batch, num_blocks, *[s for jr in zip(jmid, rmid) for s in jr], in_shape[0], in_shape[1])
        order = [1, 0, 2 * m + 2, *range(2, 2 * m + 2, 2), *range(3, 2 * m + 2, 2), 2 * m + 3]
        p = _copied(t.permute(order), sinks.get("p"), (num_blocks, rows, -1))
        z = torch.bmm(p, merged)  # (N, B I_0 Jmid, R_0 J_1)
    # -> (B, J_1, Jmid, N, R_0, I_0)
    z6 = z.reshape(num_blocks, batch, in_shape[0], math.prod(jmid), ranks[0], out_shape[1])
    zp = _copied(z6.permute(1, 5, 3, 0, 4, 2), sinks.get("zp"), (batch * out_shape[1] * math.prod(jmid), -1))
    y = torch.mm(zp, first)  # (B J_1 Jmid, J_0)
    y = _copied(y.reshape(batch, -1, out_shape[0]).transpose(1, 2), sinks.get("y"), (batch, -1))
    return y, p, zp, inner


def saved_numels(in_shape, out_shape, ranks, num_blocks) -> list[int]:
    """Elements per batch row of what :func:`chain_forward` keeps for the backward, in the order ``p`` (for d > 2),
    ``zp``, ``inner``: each is proportional to the rows, so the whole batch's pieces fit one flat tensor each."""
    d = len(in_shape)
    outputs, size = [], math.prod(in_shape)  # elements per row of each mode step's output
    for k in range(d - 1, 1, -1):
        size = size // in_shape[k] * out_shape[k] * ranks[k] * (num_blocks if k == d - 1 else 1)
        outputs.append(size)
    zp = math.prod(out_shape[1:]) * num_blocks * ranks[0] * in_shape[0]
    return ([outputs[-1]] if d > 2 else []) + [zp] + outputs[:-1]


def chain_backward(grad_y, x, shapes, merged, first, mode, p, zp, inner, need_x: bool):
    """The gradients ``(x, merged, first, mode)`` of :func:`chain_forward` (``x``'s ``None`` unless ``need_x``)
    from what it returned: ``p`` ``(N, B I_0 Jmid, Rmid I_1)`` (``None`` for d = 2), ``zp`` ``(B J_1 Jmid, N R_0 I_0)``,
    ``inner``."""
    in_shape, out_shape, ranks, num_blocks = shapes
    d = len(in_shape)
    saved_inputs = [x, *inner]
    batch = x.shape[0]
    jmid, rmid = out_shape[2:], ranks[2:]
    g = grad_y.reshape(batch, out_shape[0], -1).transpose(1, 2).reshape(-1, out_shape[0])
    grad_first = torch.mm(zp.t(), g)
    gz = torch.mm(g, first.t())  # (B J_1 Jmid, N R_0 I_0)
    gz = gz.reshape(batch, out_shape[1], math.prod(jmid), num_blocks, ranks[0], in_shape[0])
    gz = gz.permute(3, 0, 5, 2, 4, 1).reshape(num_blocks, batch * in_shape[0] * math.prod(jmid), -1)
    if d == 2:
        p = x.reshape(1, -1, in_shape[1]).expand(num_blocks, -1, -1)
    grad_merged = torch.bmm(p.transpose(1, 2), gz)
    grad_mode = [None] * (d - 2)
    grad_x = None
    if d == 2:
        if need_x:
            grad_x = torch.bmm(gz, merged.transpose(1, 2)).sum(0).reshape(x.shape)
        return grad_x, grad_merged, grad_first, grad_mode
    # the mode steps need the gradient of the big intermediate whether or not x needs one
    m = d - 2
    gp = torch.bmm(gz, merged.transpose(1, 2))  # (N, B I_0 Jmid, Rmid I_1)
    gp = gp.reshape(num_blocks, batch, in_shape[0], *jmid, *rmid, in_shape[1])
    order = [1, 0, *[a for k in range(m) for a in (3 + k, 3 + m + k)], 2, 3 + 2 * m]
    gt = gp.permute(order)  # (B, N, J_2, R_2, .., I_0, I_1)
    for step in range(m - 1, -1, -1):
        size = in_shape[d - 1 - step]
        matrix, t_in = mode[step], saved_inputs[step]
        if step == 0:  # t = F (N J R, I) @ x (B, I, rest)
            gt3 = gt.reshape(batch, -1, x[0].numel() // size)  # (B, N J R, rest)
            x3 = x.reshape(batch, -1, size)
            grad_mode[0] = torch.bmm(gt3, x3).sum(0).reshape(matrix.shape)
            if need_x:
                grad_x = torch.matmul(gt3.transpose(1, 2), matrix.reshape(-1, size)).reshape(x.shape)
        else:  # t = F (N, J R, I) @ t_in (B, N, I, rest)
            q = matrix.shape[1]
            gt4 = gt.reshape(batch * num_blocks, q, -1)
            t3 = t_in.reshape(batch * num_blocks, -1, size)
            grad_mode[step] = torch.bmm(gt4, t3).reshape(batch, *matrix.shape).sum(0)
            gt = torch.matmul(gt4.reshape(batch, num_blocks, q, -1).transpose(2, 3), matrix)
    return grad_x, grad_merged, grad_first, grad_mode


class _GemmChain(torch.autograd.Function):
    """:func:`chain_forward` with :func:`chain_backward` as its backward."""

    @staticmethod
    def forward(ctx, x, shapes, merged, first, *mode):
        y, p, zp, inner = chain_forward(x, shapes, merged, first, mode)
        ctx.shapes = shapes
        ctx.save_for_backward(x, merged, first, x if p is None else p, zp, *mode, *inner)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        shapes = ctx.shapes
        d = len(shapes[0])
        x, merged, first, p, zp, *rest = ctx.saved_tensors
        mode, inner = rest[:d - 2], rest[d - 2:]
        grad_x, grad_merged, grad_first, grad_mode = chain_backward(
            grad_y, x, shapes, merged, first, mode, p if d > 2 else None, zp, inner, ctx.needs_input_grad[0])
        return (grad_x, None, grad_merged, grad_first, *grad_mode)


def gemm_chain_contract(x, core, factors, in_shape, out_shape, ranks):
    """``y[b, j] = sum_i x[b, i] W[i, j]`` for the block-term weight given by ``core`` and ``factors``.

    Args:
        x (Tensor): ``(B, prod(in_shape))``.
        core (Tensor): ``(N, R_0, .., R_{d-1})``.
        factors (sequence of Tensor): ``d`` tensors, the k-th ``(N, I_k, J_k, R_k)``; ``d >= 2``.
        in_shape, out_shape, ranks (tuple of int): the mode sizes.

    Returns:
        Tensor: ``(B, prod(out_shape))``.
    """
    if len(in_shape) < 2:
        raise ValueError(f"the GEMM chain needs d >= 2 modes, got in_shape={tuple(in_shape)}")
    dtype = matmul_dtype(x, core)  # under autocast the weight-side ops come out in mixed dtypes
    core, factors = core.to(dtype), [f.to(dtype) for f in factors]
    mode, merged, first = mode_matrices(core, factors)
    shapes = (tuple(in_shape), tuple(out_shape), tuple(ranks), core.shape[0])
    x = x.reshape(x.shape[0], *in_shape).to(dtype).contiguous()
    return _GemmChain.apply(x, shapes, merged, first, *mode)


def _steps(in_shape, out_shape, ranks, num_blocks, batch):
    """(multiply-adds, output elements) of each GEMM of the forward chain."""
    d = len(in_shape)
    steps = []
    size = batch * math.prod(in_shape)  # elements of the current big tensor
    for k in range(d - 1, 1, -1):
        macs = size * num_blocks * out_shape[k] * ranks[k] if k == d - 1 else size * out_shape[k] * ranks[k]
        size = macs // in_shape[k]
        steps.append((macs, size))
    if d == 2:
        size *= num_blocks
    jmid, rmid = math.prod(out_shape[2:]), math.prod(ranks[2:])
    rows = num_blocks * batch * in_shape[0] * jmid
    macs = rows * rmid * in_shape[1] * ranks[0] * out_shape[1]
    steps.append((macs, rows * ranks[0] * out_shape[1]))
    rows = batch * out_shape[1] * jmid
    steps.append((rows * num_blocks * ranks[0] * in_shape[0] * out_shape[0], rows * out_shape[0]))
    return steps


def gemm_chain_flops(in_shape, out_shape, ranks, num_blocks, batch) -> int:
    """Forward flops (2 per multiply-add) of the GEMM chain: its GEMMs and merging the core into factor 1."""
    merge = 2 * num_blocks * math.prod(ranks) * in_shape[1] * out_shape[1]
    return merge + 2 * sum(m for m, _ in _steps(in_shape, out_shape, ranks, num_blocks, batch))


def gemm_chain_training_flops(in_shape, out_shape, ranks, num_blocks, batch, input_grad: bool = False) -> int:
    """Forward plus backward flops of the GEMM chain: every GEMM has two in the backward (the gradients of
    its two operands), except the first one on the input, whose input gradient is computed only with ``input_grad``."""
    steps = _steps(in_shape, out_shape, ranks, num_blocks, batch)
    total = 3 * sum(m for m, _ in steps)
    if not input_grad:
        total -= steps[0][0]
    return 2 * total


def gemm_chain_largest(in_shape, out_shape, ranks, num_blocks, batch) -> int:
    """The largest intermediate of the forward chain, in elements."""
    return max(s for _, s in _steps(in_shape, out_shape, ranks, num_blocks, batch))


def gemm_chain_elements(in_shape, out_shape, ranks, num_blocks, batch) -> int:
    """Elements the forward chain moves through memory: the input, every GEMM's output and the copies (of the
    last mode step's output for d > 2, of the core step's output, of the result, and the factor matrix that
    ``matmul`` broadcasts over the batch in each mode step after the first)."""
    steps = _steps(in_shape, out_shape, ranks, num_blocks, batch)
    copies = (steps[-3][1] if len(in_shape) > 2 else 0) + steps[-2][1] + steps[-1][1]
    copies += sum(batch * num_blocks * in_shape[k] * out_shape[k] * ranks[k] for k in range(2, len(in_shape) - 1))
    return batch * math.prod(in_shape) + sum(s for _, s in steps) + copies


def chunk_rows(key: tuple, batch: int, element_size: int, max_intermediate_bytes: int,
               device_type: str = "cpu") -> int:
    """Rows per piece of the eager chain over ``batch`` rows (``key``: in_shape, out_shape, ranks, num_blocks):
    equal pieces whose largest intermediate fits ``max_intermediate_bytes``. GPU inputs are not split."""
    if batch <= 1 or device_type != "cpu":
        return max(batch, 1)
    per_row = gemm_chain_largest(*key, batch) * element_size / batch
    rows = max(1, int(max_intermediate_bytes // max(per_row, 1)))
    pieces = math.ceil(batch / rows)
    return math.ceil(batch / pieces)


def chain_product(x: torch.Tensor, core: torch.Tensor, factors, key: tuple,
                  max_intermediate_bytes: int) -> torch.Tensor:
    """``x @ W`` over the whole batch in cache-sized pieces (the eager form), differentiable (each piece's own
    backward)."""
    in_shape, out_shape, ranks, _ = key
    rows = chunk_rows(key, x.shape[0], x.element_size(), max_intermediate_bytes, x.device.type)
    pieces = x.split(rows)
    if len(pieces) == 1:
        return gemm_chain_contract(x, core, factors, in_shape, out_shape, ranks)
    return torch.cat([gemm_chain_contract(piece, core, factors, in_shape, out_shape, ranks) for piece in pieces])
