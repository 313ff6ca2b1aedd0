"""How :class:`~accel.nn.BTLinear` runs when it is traced: ``torch.compile``, ``torch.export`` (and
``torch.onnx.export(dynamo=True)`` on top of it), ``torch.jit.trace``, or a call on tensor subclasses such as
FakeTensors.

The eager forward pass does three things a tracer cannot take:

- it picks its strategy per batch size through a cost model (cached path searches; a symbolic batch size is
  not hashable, and tracing the search would put it in the graph);
- the dense path writes ``W`` with ``mm(out=)`` into a workspace kept across calls: ``out=`` refuses autograd,
  and a traced tensor left in the workspace would be returned by later eager calls;
- the GEMM chain splits the batch into cache-sized pieces, a count that depends on the batch size.

So a traced call takes a plan made outside the graph (:func:`traced_plan`, a constant for Dynamo). Under
``torch.compile`` the dense path and the GEMM chain then run as custom ops that execute the eager kernels (the
workspace, the pieces: :mod:`accel.nn.bt._compiled`). An exported program (``torch.export``, ONNX, ``jit.trace``;
``torch.compiler.is_exporting()`` tells export from compile) holds ordinary ops only: it never touches the
workspace, contracts the whole batch at once, and uses differentiable ops: the GEMM chain's ``autograd.Function``,
the dense path's exported form (:func:`~accel.nn.bt._dense.rebuild_matmul`) or the low-rank path (ordinary ops
everywhere). ``torch.jit.trace`` cannot record an ``autograd.Function``: there the chain is replaced by the cheaper
of the other two. The plan of a symbolic (dynamic) batch is made for its example size under ``torch.export``, else
(inside ``torch.compile``) for ``SYMBOLIC_BATCH_PLAN_ROWS`` rows; any batch size then runs correctly, only the choice
of strategy is fixed.
"""
from __future__ import annotations

import torch
from torch.fx.experimental.symbolic_shapes import has_static_value, optimization_hint

from accel.nn.bt._paths import CostProfile, contraction_costs, contraction_method

__all__ = ["SYMBOLIC_BATCH_PLAN_ROWS", "is_tracing", "plan_rows", "traced_plan"]

# Rows the plan is made for when the batch is symbolic inside torch.compile (a dynamic batch): a typical
# training batch.
SYMBOLIC_BATCH_PLAN_ROWS = 64

_PLAIN = (torch.Tensor, torch.nn.Parameter)


def is_tracing(*tensors: torch.Tensor) -> bool:
    """Whether this call is traced (compile, export, jit.trace) or runs on tensor subclasses (FakeTensors,
    functional or proxy tensors, a user's subclass): those take the traced forms, which use ordinary ops only."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        return True
    return any(type(t) not in _PLAIN for t in tensors)


def plan_rows(batch) -> int:
    """The batch size a traced call's plan is made for: ``batch`` itself when it is a constant, else its
    example size (torch.export), else ``SYMBOLIC_BATCH_PLAN_ROWS``. Never adds a guard on the batch."""
    if isinstance(batch, torch.Tensor):  # torch.jit.trace records sizes as tensors
        return int(batch)
    if has_static_value(batch):
        return int(batch)
    if torch.compiler.is_exporting():
        return optimization_hint(batch, fallback=SYMBOLIC_BATCH_PLAN_ROWS)
    return SYMBOLIC_BATCH_PLAN_ROWS


@torch.compiler.assume_constant_result
def traced_plan(in_shape, out_shape, ranks, num_blocks, contraction, rows, profile_values: tuple,
                gemm_chain: bool = True) -> str:
    """``"dense"``, ``"lowrank"`` or ``"gemm"`` for a batch of ``rows`` (``profile_values``: the layer's
    :class:`CostProfile` as a tuple, so that Dynamo sees plain constants). Where ``gemm_chain`` is false (jit.trace)
    the chain is replaced by whichever of the other two the cost model weighs less.

    Dynamo calls this at trace time and keeps the result as a constant (no cost model in the graph, no guard).
    """
    profile = CostProfile(*profile_values)
    method = contraction_method(in_shape, out_shape, ranks, num_blocks, contraction, rows, profile)
    if method == "gemm" and not gemm_chain:
        cost = contraction_costs(in_shape, out_shape, ranks, num_blocks, rows, profile)
        method = min(("dense", "lowrank"), key=lambda m: cost[f"auto_{m}"])
    return method
