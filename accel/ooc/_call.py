"""One GEMM call on an engine: argument checks, the tile-cache scope of each operand, and autograd.

:func:`gemm_call` is what :meth:`Engine.gemm` and :func:`accel.gemm` run. It takes the engine as an
argument and never imports it, so ``engine.py`` and ``gemm.py`` do not import each other.

Autograd: when grad mode is on and a tensor input requires grad, the call is a
:class:`torch.autograd.Function` whose backward is engine GEMMs again (``dA = alpha * dC @ op(B)^T``,
``dB = alpha * op(A)^T @ dC``, ``dC_in = beta * dC``), themselves differentiable, so double backward
works too.
"""
from __future__ import annotations

import math
import numbers
import warnings

import numpy as np
import torch

from accel.ooc.cache import call_scope, source_key
from accel.ooc.plan import MIN_TILE
from accel.ooc.workers.base import Problem

SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def gemm_call(engine, A, B, C=None, *, alpha=1.0, beta=0.0, trans_a: bool = False, trans_b: bool = False,
              block: int | None = None, compute_dtype=None, cache_scope=None):
    """``alpha * op(A) @ op(B) + beta * C`` on ``engine`` (see :func:`accel.gemm` for the arguments).

    ``cache_scope`` (a :class:`~accel.ooc.engine.CacheScope` of this engine): the caller declares A and B
    unchanged until the scope is closed, so their tiles may be reused by later calls in the same scope.
    """
    options = dict(alpha=alpha, beta=beta, trans_a=bool(trans_a), trans_b=bool(trans_b), block=block,
                   compute_dtype=compute_dtype, cache_scope=cache_scope)
    if cache_scope is not None:
        cache_scope.check(engine)
    if torch.is_grad_enabled() and any(isinstance(x, torch.Tensor) and x.requires_grad for x in (A, B, C)):
        return _GemmFunction.apply(engine, options, A, B, C)
    return _compute(engine, A, B, C, **options)


class _GemmFunction(torch.autograd.Function):
    """``gemm_call`` with a backward made of engine GEMMs (differentiable in turn)."""

    @staticmethod
    def forward(ctx, engine, options, A, B, C):
        ctx.engine, ctx.options = engine, options
        # save only what the backward reads (dA reads B, dB reads A, dC neither), as torch.addmm does: an
        # operand made under torch.inference_mode cannot be saved, and torch refuses only where it must be
        needs = {"A": ctx.needs_input_grad[3], "B": ctx.needs_input_grad[2], "C": False}
        ctx.constants = {}
        saved = []
        ctx.names = []
        for name, x in (("A", A), ("B", B), ("C", C)):
            if isinstance(x, torch.Tensor) and needs[name]:
                saved.append(x)
                ctx.names.append(name)
            else:
                ctx.constants[name] = x if not isinstance(x, torch.Tensor) else None
        ctx.c_shape_dtype = (C.shape, C.dtype) if isinstance(C, torch.Tensor) else None
        ctx.a_dtype, ctx.b_dtype = (x.dtype if isinstance(x, torch.Tensor) else None for x in (A, B))
        ctx.save_for_backward(*saved)
        return _compute(engine, A, B, C, **options)

    @staticmethod
    def backward(ctx, grad):
        given = dict(ctx.constants, **dict(zip(ctx.names, ctx.saved_tensors)))
        A, B = given["A"], given["B"]
        o = ctx.options
        scope = o["cache_scope"] if o["cache_scope"] is not None and not o["cache_scope"].closed else None
        common = dict(block=o["block"], compute_dtype=o["compute_dtype"], cache_scope=scope)
        alpha, trans_a, trans_b = o["alpha"], o["trans_a"], o["trans_b"]
        grad_a = grad_b = grad_c = None
        if ctx.needs_input_grad[2]:  # dop(A) = alpha * dC @ op(B)^T; dA is its transpose under trans_a
            if not trans_a:
                grad_a = gemm_call(ctx.engine, grad, B, alpha=alpha, trans_b=not trans_b, **common)
            else:
                grad_a = gemm_call(ctx.engine, B, grad, alpha=alpha, trans_a=trans_b, trans_b=True, **common)
            grad_a = grad_a.to(ctx.a_dtype)
        if ctx.needs_input_grad[3]:  # dop(B) = alpha * op(A)^T @ dC
            if not trans_b:
                grad_b = gemm_call(ctx.engine, A, grad, alpha=alpha, trans_a=not trans_a, **common)
            else:
                grad_b = gemm_call(ctx.engine, grad, A, alpha=alpha, trans_a=True, trans_b=trans_a, **common)
            grad_b = grad_b.to(ctx.b_dtype)
        if ctx.needs_input_grad[4]:
            shape, dtype = ctx.c_shape_dtype
            grad_c = (grad * o["beta"]).sum_to_size(shape).to(dtype)
        return None, None, grad_a, grad_b, grad_c


def _compute(engine, A, B, C, *, alpha, beta, trans_a, trans_b, block, compute_dtype, cache_scope):
    """The call itself, not differentiable; returns a new matrix (NumPy when every input is)."""
    all_numpy = all(isinstance(x, np.ndarray) for x in (A, B, C) if x is not None)
    # tiles are keyed on the caller's objects (A_source, B_source): a detached copy would be new each call
    A_source, A, keyed_a = _as_host_tensor(A, "A")
    B_source, B, keyed_b = _as_host_tensor(B, "B")
    C = _as_host_tensor(C, "C")[1] if C is not None else None
    alpha, beta = _finite(alpha, "alpha"), _finite(beta, "beta")
    op_a, op_b = (A.t() if trans_a else A), (B.t() if trans_b else B)
    (m, k), (k_b, n) = op_a.shape, op_b.shape
    if k != k_b:
        raise ValueError(f"op(A) @ op(B) needs matching inner dimensions: A {tuple(A.shape)} "
                         f"(trans_a={trans_a}) gives {m}x{k}, B {tuple(B.shape)} (trans_b={trans_b}) gives {k_b}x{n}")
    if C is not None:
        try:
            C = C.expand(m, n)
        except RuntimeError:
            raise ValueError(f"C of shape {tuple(C.shape)} does not broadcast to the {m}x{n} result of "
                             f"A {tuple(A.shape)} and B {tuple(B.shape)}") from None
    storage, allow_tf32, out_dtype = resolve_dtypes(A, B, C, compute_dtype)
    accumulator = accumulator_dtype(storage, out_dtype)
    check_block(block)

    if m == 0 or n == 0 or k == 0 or alpha == 0:  # no product to compute: BLAS reads neither A nor B
        engine.stats = None
        out = torch.zeros((m, n), dtype=out_dtype)
        if C is not None and beta != 0:
            out.copy_(C.to(accumulator) * beta)
    else:
        # the engine's threads write it, and torch.inference_mode does not reach them: a tensor made under it
        # could not be written there ("Inplace update to inference tensor outside InferenceMode")
        with torch.inference_mode(False):
            out = torch.empty((m, n), dtype=out_dtype)
        scope = cache_scope.key if cache_scope is not None else ("persistent",) if engine.persist_cache else None
        a_key = source_key(A_source, scope if keyed_a and scope else call_scope())
        b_key = source_key(B_source, scope if keyed_b and scope else call_scope())
        problem = Problem(a=op_a, b=op_b, c=C if beta != 0 else None, out=out, alpha=alpha, beta=beta,
                          storage_dtype=storage, accumulator_dtype=accumulator, allow_tf32=allow_tf32,
                          a_prefix=(a_key, storage, accumulator), b_prefix=(b_key, storage, accumulator), a_transposed=trans_a,
                          b_transposed=trans_b, sources=[(A_source, a_key), (B_source, b_key)])
        engine.run(problem, block)
    return out.numpy() if all_numpy else out


def accumulator_dtype(storage: torch.dtype, out_dtype: torch.dtype) -> torch.dtype:
    """Products accumulate in float64 when float64 is computed or returned, else in float32."""
    return torch.float64 if torch.float64 in (storage, out_dtype) else torch.float32


def check_block(block) -> None:
    """``block`` must be a positive int; below the smallest useful tile it is allowed but slow: warn."""
    if block is None:
        return
    if isinstance(block, bool) or not isinstance(block, int) or block < 1:
        raise ValueError(f"block must be a positive int, got {block!r}")
    if block < MIN_TILE:
        warnings.warn(f"block={block} is below {MIN_TILE}: every tile is a separate small multiply and "
                      f"transfer, which is very slow; leave block unset to let the plan choose",
                      stacklevel=4)


def _as_host_tensor(x, name: str) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """(the tensor tiles are keyed on, ``x`` as a detached 2-D host tensor sharing its memory, whether
    its cache tiles may persist)."""
    persistent = True
    if isinstance(x, np.ndarray):
        if x.dtype.kind != "f" or x.dtype.itemsize not in (2, 4, 8):
            raise TypeError(f"{name} has NumPy dtype {x.dtype}; supported: float16, float32, float64")
        if any(stride < 0 for stride in x.strides) or not x.dtype.isnative:
            x = x.copy()  # torch cannot view negative strides or foreign byte order
        x, persistent = torch.from_numpy(x), False  # no version counter: tiles live for this call only
    elif not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or a NumPy array, got {type(x).__name__}")
    elif x.layout != torch.strided:
        raise TypeError(f"{name} is a {x.layout} tensor; gemm takes dense matrices ({name}.to_dense())")
    if x.device.type != "cpu":
        raise ValueError(f"{name} is on {x.device}; gemm takes host matrices (for device-resident data "
                         f"torch.matmul is the right tool)")
    if x.dim() != 2 and not (name == "C" and x.dim() in (0, 1)):
        raise TypeError(f"{name} must be a matrix, got shape {tuple(x.shape)}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} has dtype {x.dtype}; supported: float32, float64, float16, bfloat16")
    if x.is_inference():  # no version counter either: a write inside inference mode could not be seen
        persistent = False
    return x, x.detach(), persistent


def _finite(value, name: str) -> float:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def resolve_dtypes(A, B, C, compute_dtype):
    """(storage dtype of the products, TF32 allowed, result dtype)."""
    given = {"A": A.dtype, "B": B.dtype, **({"C": C.dtype} if C is not None else {})}
    out_dtype = C.dtype if C is not None else torch.promote_types(A.dtype, B.dtype)
    if compute_dtype is None:
        if len(set(given.values())) > 1:
            names = ", ".join(f"{name} {dtype}" for name, dtype in given.items())
            raise TypeError(f"mixed dtypes ({names}): pass compute_dtype= to say how to multiply them")
        return A.dtype, False, out_dtype
    if compute_dtype == "tf32":
        return torch.float32, True, out_dtype
    if compute_dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"compute_dtype must be one of float64, float32, 'tf32', bfloat16, float16; "
                         f"got {compute_dtype!r}")
    return compute_dtype, False, out_dtype


