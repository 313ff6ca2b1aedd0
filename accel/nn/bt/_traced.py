"""How :class:`~accel.nn.BTLinear` runs when it is traced: ``torch.compile``, ``torch.export`` (and
``torch.onnx.export(dynamo=True)`` on top of it), ``torch.jit.trace``, or any call on FakeTensors.

The eager forward pass does three things a tracer cannot take:

- it picks its contraction per batch size through a cost model (``opt_einsum`` path searches behind
  ``lru_cache``): traced by Dynamo this took ~190 s and broke the graph, and a symbolic batch size is
  not hashable;
- the dense path writes ``W`` with ``mm(out=)`` into a workspace kept across calls: ``out=`` refuses
  autograd, and a FakeTensor left in the workspace would be returned by later eager calls;
- the factorized path splits the batch into cache-sized pieces, a count that depends on the batch size.

So a traced call takes a plan made outside the graph (:func:`traced_plan`, a constant for Dynamo),
never touches the workspace while tracing, contracts the whole batch at once, and uses only ordinary
differentiable ops (the GEMM chain, ``torch.einsum`` steps along the ``opt_einsum`` path, or the rebuilt
weight), each the same arithmetic as its eager twin. One exception, under ``torch.compile`` only (not
export): the dense path is a custom op running the eager kernels and workspace on the real tensors at run
time (see ``compiled_rebuild_linear``). The plan of a symbolic (dynamic) batch is made for its example
size where Python can read it (``torch.export``), else for ``SYMBOLIC_BATCH_PLAN_ROWS`` rows (inside
``torch.compile``); any batch size then runs correctly, only the choice of path is fixed.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch._subclasses.fake_tensor import is_fake
from torch.fx.experimental.symbolic_shapes import has_static_value

from accel.nn._compile_cache import tag_compile_caches
from accel.nn.bt._dense import (column_sums, contract_steps, matmul_dtype, rebuild_backward,  # noqa: F401
                               rebuild_forward, rebuild_operands, workspace_by_key)
from accel.nn.bt._factorized import chunk_rows
from accel.nn.bt._paths import chain_plan, contraction_method, factorized_contraction_steps

__all__ = ["SYMBOLIC_BATCH_PLAN_ROWS", "is_tracing", "traced_plan", "plan_rows", "contract_steps",
           "rebuild_matmul", "compiled_rebuild_linear", "eager_splits"]

tag_compile_caches()  # compiled graphs holding these ops are cached under accel's code hash

# Rows the plan is made for when the batch is symbolic and its example size cannot be read (a dynamic
# batch inside torch.compile): a typical training batch.
SYMBOLIC_BATCH_PLAN_ROWS = 64

_FAKE = torch._C._TorchDispatchModeKey.FAKE
_PROXY = torch._C._TorchDispatchModeKey.PROXY
_PLAIN = (torch.Tensor, torch.nn.Parameter)


def is_tracing(*tensors: torch.Tensor) -> bool:
    """Whether this call is being traced (compile, export, jit.trace, make_fx) or runs on FakeTensors."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        return True
    if torch._C._get_dispatch_mode(_FAKE) is not None or torch._C._get_dispatch_mode(_PROXY) is not None:
        return True
    # plain tensors and parameters are never fake: skip is_fake's unwrapping (5 us of a 1 ms forward)
    return any(type(t) not in _PLAIN and is_fake(t) for t in tensors)


def plan_rows(batch) -> int:
    """The batch size a traced call's plan is made for: ``batch`` itself when it is a constant, else its
    example size (torch.export), else ``SYMBOLIC_BATCH_PLAN_ROWS``. Never adds a guard on the batch."""
    if isinstance(batch, torch.Tensor):  # torch.jit.trace records sizes as tensors
        return int(batch)
    if has_static_value(batch):
        return int(batch)
    if not torch.compiler.is_dynamo_compiling():
        hint = getattr(getattr(batch, "node", None), "hint", None)
        if isinstance(hint, int):
            return hint
    return SYMBOLIC_BATCH_PLAN_ROWS


@torch.compiler.assume_constant_result
def eager_splits(in_shape, out_shape, ranks, num_blocks, method, rows, element_size, max_intermediate_bytes,
                 device_type) -> bool:
    """Whether the eager factorized product splits ``rows`` into cache-sized pieces (a constant for Dynamo:
    the cost model's path searches are not traced)."""
    key = (in_shape, out_shape, ranks, num_blocks)
    return chunk_rows(key, method, rows, element_size, max_intermediate_bytes, device_type) < rows


@torch.compiler.assume_constant_result
def traced_plan(in_shape, out_shape, ranks, num_blocks, contraction, rows, gemm_chain=True) -> tuple:
    """``("dense", None)``, ``("lowrank", None)``, ``("gemm", split)`` or ``("einsum", steps)`` for a batch of
    ``rows``.

    Dynamo calls this at trace time and keeps the result as a constant (no cost model in the graph,
    no guard); ``split`` is ``chain_plan``'s grouping of modes for the chain, ``steps`` the pairwise
    ``torch.einsum`` equations of the ``opt_einsum`` path, which also replaces the GEMM chain where
    ``gemm_chain`` is false.
    """
    method = contraction_method(in_shape, out_shape, ranks, num_blocks, contraction, rows)
    method = "einsum" if method == "gemm" and not gemm_chain else method
    if method == "gemm":
        return method, chain_plan(in_shape, out_shape, ranks, num_blocks, rows)[0]
    steps = (factorized_contraction_steps(in_shape, out_shape, ranks, num_blocks, rows) if method == "einsum"
             else None)
    return method, steps


def rebuild_matmul(x: torch.Tensor, core: torch.Tensor, factors) -> torch.Tensor:
    """``x @ W`` through the rebuilt weight with ordinary autograd (``rebuild_linear``'s traced twin:
    no workspace, no ``out=``); ``x`` is ``(B, prod I_k)``, the result ``(B, prod J_k)``."""
    left, right = rebuild_operands(core, list(factors))
    out0, in_features = factors[0].shape[2], x.shape[1]
    dtype = matmul_dtype(x, left, right)
    weight = torch.mm(left.to(dtype), right.to(dtype)).view(out0, in_features, -1)  # (J_0, I, J')
    return torch.mm(x.to(dtype), weight.transpose(0, 1).reshape(in_features, -1))  # W as (I, J), as eager


# Under torch.compile the dense path is one opaque op running the eager kernels with the layer's workspace:
# Inductor's version of rebuild_matmul allocates W and grad W afresh (page faults on every call above
# glibc's mmap threshold) and ran 1.5x slower than eager at the UCF11 setting (experiments/bt_compile.py).
# The bias gradient is taken inside the backward op too, as a GEMV: left in the graph, Inductor fused it with
# the weight-side einsum backward's copies into one column reduction over the whole batch that took 2.0 ms of a
# 75 ms BTLSTM step (64 -> 256, T=100, batch 32, 1 thread), against 0.6-1.0 ms here (README: compile).
# The weight-side ops themselves (rebuild_operands and its backward) stay traced: Inductor's kernels for them
# cost little, while torch.einsum searches its opt_einsum path on every call (0.6 ms forward there, eagerly).
# Not for export: an exported program must hold ordinary ops only (rebuild_matmul).
@torch.library.custom_op("accel::bt_rebuild_linear", mutates_args=())
def _rebuild_linear_op(x: torch.Tensor, left: torch.Tensor, right: torch.Tensor, bias: Optional[torch.Tensor],
                       out0: int, workspace_key: int) -> torch.Tensor:
    return rebuild_forward(x, left, right, out0, workspace_by_key(workspace_key), bias)  # the bias fused


@_rebuild_linear_op.register_fake
def _(x, left, right, bias, out0, workspace_key):
    return x.new_empty(x.shape[0], right.shape[1] * left.shape[0] // x.shape[1])


@torch.library.custom_op("accel::bt_rebuild_linear_backward", mutates_args=())
def _rebuild_linear_backward_op(grad_y: torch.Tensor, x: torch.Tensor, left: torch.Tensor, right: torch.Tensor,
                                out0: int, workspace_key: int, need_x: bool,
                                need_bias: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gradients of ``x``, ``left``, ``right`` and the bias (``x``'s and the bias's empty where not needed)."""
    grad_x, grad_left, grad_right = rebuild_backward(grad_y, x, left, right, out0, workspace_by_key(workspace_key),
                                                     (need_x, True, True))
    grad_bias = column_sums(grad_y) if need_bias else x.new_empty(0)
    return grad_x if need_x else x.new_empty(0), grad_left, grad_right, grad_bias  # outputs never alias


@_rebuild_linear_backward_op.register_fake
def _(grad_y, x, left, right, out0, workspace_key, need_x, need_bias):
    return (x.new_empty(x.shape if need_x else (0,)), torch.empty_like(left), torch.empty_like(right),
            grad_y.new_empty(grad_y.shape[1] if need_bias else 0))


def _setup_context(ctx, inputs, output):
    x, left, right, _, ctx.out0, ctx.workspace_key = inputs
    ctx.save_for_backward(x, left, right)


def _backward(ctx, grad_y):
    x, left, right = ctx.saved_tensors
    need_x, need_bias = ctx.needs_input_grad[0], ctx.needs_input_grad[3]
    grad_x, grad_left, grad_right, grad_bias = _rebuild_linear_backward_op(grad_y, x, left, right, ctx.out0,
                                                                           ctx.workspace_key, need_x, need_bias)
    return grad_x if need_x else None, grad_left, grad_right, grad_bias if need_bias else None, None, None


_rebuild_linear_op.register_autograd(_backward, setup_context=_setup_context)


def compiled_rebuild_linear(x: torch.Tensor, core: torch.Tensor, factors, workspace,
                            bias: torch.Tensor | None = None) -> torch.Tensor:
    """``rebuild_linear`` (bias included) as one op in a torch.compile graph (forward and backward), same
    kernels and workspace."""
    left, right = rebuild_operands(core, list(factors))
    dtype = matmul_dtype(x, left, right)
    return _rebuild_linear_op(x.to(dtype).contiguous(), left.to(dtype), right.to(dtype),
                              None if bias is None else bias.to(dtype), factors[0].shape[2], workspace.key)
