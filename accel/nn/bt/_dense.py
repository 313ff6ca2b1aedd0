"""The dense path of :class:`~accel.nn.BTLinear`: rebuild ``W`` with one GEMM, then multiply the input with it.

Used where the batch is large enough that ``x W`` through the rebuilt weight costs less than contracting the
input through the factors. The plain version (``F.linear(x, layer.to_dense())``) is slow on CPU for two reasons:
the rebuild runs as many small pairwise contractions with their autograd copies, and the full-size ``W`` and its
gradient are fresh allocations large enough to page-fault on every call.

Here the weight is built in the layout ``(J_0, I_0, I_1.., J_1..)``, where it is the product of two thin
matrices (factor 0 as ``(J_0 I_0, N R_0)`` and the rest of the block-term contracted into
``(N R_0, I_1.. J_1..)``). Then either ``y[:, j_0, :] = x @ W[j_0]`` is one batched GEMM over ``j_0``
(``J' = J_1 .. J_{d-1}`` columns each), or, where those GEMMs are narrow or the batch at least the input width
(:func:`weight_rows_first`), ``W`` is copied once into the ``(I, J)`` layout and ``y = x @ W + bias`` and
``grad W = x^T @ grad y`` are each one plain GEMM. ``W`` and its gradient share two buffers of a workspace kept by
the layer: the backward needs neither the forward's ``W`` (the input gradient rebuilds it), so a second forward
before the first backward is safe. The output and every gradient are fresh tensors: nothing a caller receives
lives in the workspace.

:func:`rebuild_matmul` is the exported form (export, ONNX, jit.trace): the same arithmetic with ordinary
differentiable ops, no workspace and no ``out=``. Under ``torch.compile`` the eager kernels run as a custom op
(:mod:`accel.nn.bt._compiled`).
"""
from __future__ import annotations

import itertools
import math
import weakref

import torch
from torch.autograd.function import once_differentiable

from accel.nn.bt._common import einsum_cached, einsum_flops, matmul_dtype, rest_equation, rest_shapes

__all__ = ["RebuildWorkspace", "column_sums", "dense_backward", "dense_costs", "dense_forward", "rebuild_linear",
           "rebuild_matmul", "rebuild_operands", "weight_rows_first", "workspace_by_key"]


# A compiled graph names a workspace by an integer (a custom op takes no Python object): every workspace registers
# under a key of its own, held weakly so that the registry keeps no layer's buffers alive.
_keys = itertools.count()
_WORKSPACES: "weakref.WeakValueDictionary[int, RebuildWorkspace]" = weakref.WeakValueDictionary()


def workspace_by_key(key) -> "RebuildWorkspace":
    """The live workspace registered under ``key`` (:attr:`RebuildWorkspace.key`, or its ``key_tensor``)."""
    key = int(key)
    try:
        return _WORKSPACES[key]
    except KeyError:
        raise LookupError(f"no live RebuildWorkspace has key {key}: the layer it belonged to was deleted") from None


class RebuildWorkspace:
    """Reusable full-size buffers for the dense path (and the compiled GEMM chain's intermediates,
    :mod:`accel.nn.bt._compiled`), one per (role, shape, dtype, device). Only the layer's own kernels read or write
    them; nothing returned to a caller aliases them. ``key``: the integer a compiled
    graph names it by (:func:`workspace_by_key`; passed as ``key_tensor``, a 0-d CPU tensor); copies and
    unpickled workspaces get a key of their own.

    Not shared between threads: a module used from several threads at once on one device needs one each.
    """

    def __init__(self):
        self._buffers = {}
        self.key = next(_keys)
        # the key as a tensor for the compiled op: Dynamo specialises on an int attribute (one graph per layer,
        # recompiling past its limit where many same-shape layers are compiled), not on a tensor's value
        self.key_tensor = torch.tensor(self.key)
        self.chain_saved = None  # (operands' identity, tensors): the compiled GEMM chain's intermediates for its backward
        _WORKSPACES[self.key] = self

    def get(self, role: str, shape, like: torch.Tensor) -> torch.Tensor:
        key = (role, tuple(shape), like.dtype, like.device)
        buffer = self._buffers.get(key)
        # one made under torch.inference_mode cannot be written outside it: made afresh then
        if buffer is None or (buffer.is_inference() and not torch.is_inference_mode_enabled()):
            # only the latest shape per role is kept: a layer sees few batch-independent shapes
            self._buffers = {k: v for k, v in self._buffers.items() if k[0] != role}
            buffer = self._buffers[key] = torch.empty(shape, dtype=like.dtype, device=like.device)
        return buffer

    def clear(self) -> None:
        self._buffers.clear()
        self.chain_saved = None

    def __getstate__(self):  # copies and pickles start empty
        return {}

    def __setstate__(self, state):
        self.__init__()

    def __repr__(self) -> str:
        mib = sum(b.numel() * b.element_size() for b in self._buffers.values()) / 2 ** 20
        return f"RebuildWorkspace({len(self._buffers)} buffers, {mib:.1f} MiB)"


def rebuild_operands(core: torch.Tensor, factors) -> tuple[torch.Tensor, torch.Tensor]:
    """``(left, right)`` with ``left @ right`` the weight in the ``(J_0, I_0, I_1.., J_1..)`` layout.

    ``left`` is factor 0 as ``(J_0 I_0, N R_0)``; ``right`` is ``(N R_0, I_1.. J_1..)``, the core
    contracted with factors 1..d-1 (small: ``N R_0`` times the weight over ``I_0 J_0``). Differentiable.
    """
    num_blocks, in0, out0, rank0 = factors[0].shape
    right = einsum_cached(rest_equation(len(factors)), core, *factors[1:]).reshape(num_blocks * rank0, -1)
    left = factors[0].permute(2, 1, 0, 3).reshape(out0 * in0, num_blocks * rank0)
    return left, right


def dense_costs(in_shape, out_shape, ranks, num_blocks, batch) -> tuple[int, int, int]:
    """``(rebuild_flops, matmul_flops, elements)`` of a forward pass: building ``W`` (the rest of the block term,
    then ``left @ right``), multiplying the input with it, and the weight's elements written."""
    key = (in_shape, out_shape, ranks, num_blocks)
    weight = math.prod(in_shape) * math.prod(out_shape)
    rest = einsum_flops(rest_equation(len(in_shape)), rest_shapes(*key))
    return rest + 2 * weight * num_blocks * ranks[0], 2 * batch * weight, weight


def weight_rows_first(batch: int, in_features: int, out_features: int, out0: int) -> bool:
    """Whether the dense path multiplies with ``W`` copied into the ``(I, J)`` layout (one GEMM, the bias
    fused) rather than in its built layout (one batched GEMM over ``j_0``, ``J' = out_features / J_0`` columns
    each, whose output and output gradient need a copy each).

    The copy pays on a wide input with a batch large enough to amortise copying ``W`` and its gradient, where
    the batched GEMMs are narrow (``J' < 32``), or where the batch is at least the input width (then the output
    copies outweigh ``W``'s); not for a narrow input or a small batch.
    """
    return in_features >= 64 and batch >= 64 and (out_features // out0 < 32 or batch >= in_features)


def _buffers(left: torch.Tensor, right: torch.Tensor, workspace: RebuildWorkspace):
    """The workspace's two buffers of ``W``'s size (one layout each, or ``W`` and its gradient)."""
    numel = left.shape[0] * right.shape[1]
    return workspace.get("weight", (numel,), left), workspace.get("other", (numel,), left)


def _built_weight(left, right, workspace) -> torch.Tensor:
    """``left @ right``: ``W`` in the ``(J_0, I, J')`` layout, in the first buffer."""
    return torch.mm(left, right, out=_buffers(left, right, workspace)[0].view(left.shape[0], right.shape[1]))


def _weight_rows_first(left, right, out0: int, in_features: int, workspace: RebuildWorkspace) -> torch.Tensor:
    """``W`` as the ``(I, J)`` matrix of ``nn.Linear.weight.t()``, copied from the built layout into the second
    buffer (``J_0`` moves inside)."""
    built = _built_weight(left, right, workspace)
    rest = built.numel() // (out0 * in_features)  # J' = J_1 * .. * J_{d-1}
    weight = _buffers(left, right, workspace)[1].view(in_features, out0 * rest)
    weight.view(in_features, out0, rest).copy_(built.view(out0, in_features, rest).transpose(0, 1))
    return weight


def dense_forward(x, left, right, out0: int, workspace: RebuildWorkspace, bias=None) -> torch.Tensor:
    """``y = x @ (left @ right) (+ bias)`` with the weight written into ``workspace`` (see the module
    docstring); ``y`` is a fresh tensor."""
    batch, in_features = x.shape
    if weight_rows_first(batch, in_features, left.shape[0] * right.shape[1] // in_features, out0):
        weight = _weight_rows_first(left, right, out0, in_features, workspace)
        return torch.mm(x, weight) if bias is None else torch.addmm(bias, x, weight)
    weight = _built_weight(left, right, workspace)
    rest = weight.numel() // (out0 * in_features)  # J_1 * .. * J_{d-1}
    y = torch.bmm(x.expand(out0, -1, -1), weight.view(out0, in_features, rest))  # (J_0, B, J')
    y = y.permute(1, 0, 2).reshape(batch, out0 * rest)
    return y if bias is None else y.add_(bias)  # y is a fresh tensor (the copy or the bmm's output)


def dense_backward(grad_y, x, left, right, out0: int, workspace: RebuildWorkspace, needs=(True, True, True)):
    """The gradients ``(x, left, right)`` of :func:`dense_forward` (``None`` where ``needs`` says so)."""
    batch, in_features = x.shape
    if weight_rows_first(batch, in_features, grad_y.shape[1], out0):
        return _rows_first_backward(grad_y, x, left, right, out0, workspace, needs)
    # contiguous: grad_y may be an expanded view (e.g. of a sum), which BLAS cannot take as an operand
    g = grad_y.reshape(batch, out0, -1).transpose(0, 1).contiguous()  # (J_0, B, J')
    rest = g.shape[2]
    grad_weight = _buffers(left, right, workspace)[1].view(left.shape[0], right.shape[1])
    torch.bmm(x.t().expand(out0, -1, -1), g, out=grad_weight.view(out0, in_features, rest))
    grad_left = torch.mm(grad_weight, right.t()) if needs[1] else None
    grad_right = torch.mm(left.t(), grad_weight) if needs[2] else None
    grad_x = None
    if needs[0]:
        weight = _built_weight(left, right, workspace).view(out0, in_features, rest)
        grad_x = torch.zeros_like(x)
        for j in range(out0):  # one GEMM per output slice, accumulated in place
            grad_x.addmm_(g[j], weight[j].t())
    return grad_x, grad_left, grad_right


def _rows_first_backward(grad_y, x, left, right, out0: int, workspace: RebuildWorkspace, needs):
    in_features = x.shape[1]
    grad_x = None
    if needs[0]:  # first: the weight's buffers hold its gradient below
        grad_x = torch.mm(grad_y, _weight_rows_first(left, right, out0, in_features, workspace).t())
    if not (needs[1] or needs[2]):
        return grad_x, None, None
    built, other = _buffers(left, right, workspace)
    # grad_y may be an expanded view (e.g. of a sum): mm copies what BLAS cannot take
    grad_weight = torch.mm(x.t(), grad_y, out=other.view(in_features, grad_y.shape[1]))
    rest = grad_y.shape[1] // out0
    grad_built = built.view(left.shape[0], right.shape[1])
    grad_built.view(out0, in_features, rest).copy_(grad_weight.view(in_features, out0, rest).transpose(0, 1))
    grad_left = torch.mm(grad_built, right.t()) if needs[1] else None
    grad_right = torch.mm(left.t(), grad_built) if needs[2] else None
    return grad_x, grad_left, grad_right


def column_sums(grad_y: torch.Tensor) -> torch.Tensor:
    """The bias gradient ``grad_y.sum(0)`` as a GEMV against ones (a BLAS call, faster than the reduction on a
    tall gradient)."""
    return torch.mv(grad_y.t(), grad_y.new_ones(grad_y.shape[0]))


class _RebuildLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, left, right, bias, out0, workspace):
        ctx.save_for_backward(x, left, right)
        ctx.out0, ctx.workspace = out0, workspace
        return dense_forward(x, left, right, out0, workspace, bias)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):
        x, left, right = ctx.saved_tensors
        grads = dense_backward(grad_y, x, left, right, ctx.out0, ctx.workspace, ctx.needs_input_grad[:3])
        grad_bias = column_sums(grad_y) if ctx.needs_input_grad[3] else None
        return (*grads, grad_bias, None, None)


def rebuild_linear(x: torch.Tensor, core: torch.Tensor, factors, workspace: RebuildWorkspace,
                   bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W (+ bias)`` for the block-term weight given by ``core`` ``(N, R_0..)`` and ``factors`` (the k-th
    ``(N, I_k, J_k, R_k)``); ``x`` is ``(B, prod I_k)``, the result ``(B, prod J_k)``. The eager form."""
    left, right = rebuild_operands(core, list(factors))
    dtype = matmul_dtype(x, left, right)
    bias = None if bias is None else bias.to(dtype)  # autocast: the product's dtype
    return _RebuildLinear.apply(x.to(dtype).contiguous(), left.to(dtype), right.to(dtype), bias,
                                factors[0].shape[2], workspace)


def rebuild_matmul(x: torch.Tensor, core: torch.Tensor, factors, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The exported form of :func:`rebuild_linear`: the same product with ordinary differentiable ops."""
    left, right = rebuild_operands(core, list(factors))
    out0, in_features = factors[0].shape[2], x.shape[1]
    dtype = matmul_dtype(x, left, right)
    weight = torch.mm(left.to(dtype), right.to(dtype)).view(out0, in_features, -1)  # (J_0, I, J')
    y = torch.mm(x.to(dtype), weight.transpose(0, 1).reshape(in_features, -1))  # W as (I, J), as eager
    return y if bias is None else y + bias.to(dtype)
