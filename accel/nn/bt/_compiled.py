"""BTLinear's factorized paths under ``torch.compile``, where eager splits the batch: one opaque op pair.

Traced into ordinary ops, the GEMM chain and the ``opt_einsum`` path contract the whole batch at once
(the eager code splits it into cache-sized pieces, a count that depends on the batch size) and Inductor
materialises every intermediate afresh: at the UCF11 setting (57600 -> 256, R=4, N=2, batch 96, 1 thread)
compiled steps ran 1.40x (chain) and 1.94x (einsum) slower than eager, and each path added about ten
generated C++ kernels to the first compile (``experiments/bt_compile.py``).

So under ``torch.compile`` (not export: an exported program holds ordinary ops only), wherever the eager
code would split the batch, the product is ``torch.ops.accel.bt_factorized``: at run time it runs
:func:`accel.nn.bt._factorized.factorized_product` with autograd recording on the real tensors and keeps that
graph in a registry under an integer handle, returned as a tensor; the backward op
``accel.bt_factorized_backward`` runs the kept graph once (the chain's hand-written backward included; a
second backward, ``retain_graph=True``, raises). Results equal eager bit for bit. AOTAutograd saves the handle
tensor for the backward; an entry whose backward never runs is dropped when that tensor is freed with the
graph. Compiled over eager at UCF11, 1 thread: 0.96 (chain) and 1.00 (einsum). Where the batch is one piece
the traced ops stay: Inductor fuses them, and the op's own cost (autograd graph, dispatch) made a 1 ms step of
the small setting 1.6-1.8x slower than eager, against 0.68-0.75x traced.
"""
from __future__ import annotations

import itertools
import math
import weakref

import torch
from torch import Tensor

from accel.nn._compile_cache import tag_compile_caches
from accel.nn.bt._dense import matmul_dtype
from accel.nn.bt._factorized import factorized_product

__all__ = ["compiled_factorized_product"]

tag_compile_caches()  # compiled graphs holding these ops are cached under accel's code hash

_handles = itertools.count()
_GRAPHS: dict[int, tuple[Tensor, list[Tensor]]] = {}


def _recording():
    """Autograd records inside an op's kernel only with its dispatch keys re-enabled: below a custom op's
    autograd kernel the dispatcher excludes them (torch 2.13's private guard; tests/test_bt_compile.py fails
    loudly if that changes)."""
    keys = torch._C.DispatchKey
    exclude = torch._C._dispatch_tls_local_exclude_set()
    for key in (keys.AutogradFunctionality, keys.AutogradOther, keys.AutogradNestedTensor):
        exclude = exclude.remove(key)
    return torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), exclude)


def _model_key(core: Tensor, in_shape, out_shape, ranks) -> tuple:
    return tuple(in_shape), tuple(out_shape), tuple(ranks), core.shape[0]


@torch.library.custom_op("accel::bt_factorized", mutates_args=())
def _forward_op(x: Tensor, core: Tensor, factors: list[Tensor], in_shape: list[int], out_shape: list[int],
                ranks: list[int], method: str, max_intermediate_bytes: int, keep_graph: bool,
                x_needs_grad: bool) -> tuple[Tensor, Tensor]:
    key = _model_key(core, in_shape, out_shape, ranks)
    handle = torch.tensor(next(_handles))
    if not keep_graph:
        with torch.no_grad():
            return factorized_product(x, core, factors, key, method, max_intermediate_bytes), handle
    with _recording(), torch.enable_grad():
        leaves = [x.detach().requires_grad_(x_needs_grad)] + [t.detach().requires_grad_() for t in (core, *factors)]
        y = factorized_product(leaves[0], leaves[1], leaves[2:], key, method, max_intermediate_bytes)
    number = int(handle)
    _GRAPHS[number] = (y, leaves)
    weakref.finalize(handle, _GRAPHS.pop, number, None)
    return y.detach().contiguous(), handle


@_forward_op.register_fake
def _(x, core, factors, in_shape, out_shape, ranks, method, max_intermediate_bytes, keep_graph, x_needs_grad):
    return x.new_empty(x.shape[0], math.prod(out_shape)), x.new_empty((), dtype=torch.int64)


@torch.library.custom_op("accel::bt_factorized_backward", mutates_args=())
def _backward_op(grad_y: Tensor, handle: Tensor, x: Tensor, core: Tensor, factors: list[Tensor],
                 x_needs_grad: bool) -> list[Tensor]:
    entry = _GRAPHS.pop(int(handle), None)  # one backward per forward, as autograd's default
    if entry is None:
        raise RuntimeError("a compiled BTLinear on a factorized path (contraction 'gemm' or 'einsum') runs one "
                           "backward per forward: a second backward through the same graph (retain_graph=True) "
                           "is not supported under torch.compile; run that layer eagerly or with "
                           "contraction='dense' for it")
    y, leaves = entry
    wanted = leaves if x_needs_grad else leaves[1:]
    with _recording(), torch.enable_grad():  # frees the kept graph as it goes, as eager's backward does
        grads = [g.contiguous() for g in torch.autograd.grad(y, wanted, grad_y)]
    return grads if x_needs_grad else [x.new_empty(0)] + grads


@_backward_op.register_fake
def _(grad_y, handle, x, core, factors, x_needs_grad):
    return [x.new_empty(x.shape if x_needs_grad else (0,)), core.new_empty(core.shape),
            *[f.new_empty(f.shape) for f in factors]]


def _setup_context(ctx, inputs, output):
    x, core, factors = inputs[:3]
    ctx.x_needs_grad = inputs[-1]
    ctx.num_factors = len(factors)
    ctx.save_for_backward(output[1], x, core, *factors)


def _backward(ctx, grad_y, _grad_handle):
    handle, x, core, *factors = ctx.saved_tensors
    grad_x, grad_core, *grad_factors = _backward_op(grad_y.contiguous(), handle, x, core, factors, ctx.x_needs_grad)
    return (grad_x if ctx.x_needs_grad else None, grad_core, grad_factors) + (None,) * 7


_forward_op.register_autograd(_backward, setup_context=_setup_context)


def compiled_factorized_product(x: Tensor, core: Tensor, factors, key: tuple, method: str,
                                max_intermediate_bytes: int) -> Tensor:
    """The eager factorized product as one op of a ``torch.compile`` graph (forward and backward)."""
    in_shape, out_shape, ranks, _ = key
    dtype = matmul_dtype(x, core)  # autocast's casts stay outside the op, in the graph
    factors = [f.to(dtype) for f in factors]
    keep_graph = torch.is_grad_enabled() and (x.requires_grad or core.requires_grad
                                              or any(f.requires_grad for f in factors))
    y, _ = _forward_op(x.to(dtype).contiguous(), core.to(dtype), factors, list(in_shape), list(out_shape),
                       list(ranks), method, int(max_intermediate_bytes), keep_graph,
                       keep_graph and x.requires_grad)
    return y
