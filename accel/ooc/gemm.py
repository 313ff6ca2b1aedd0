"""``accel.gemm``: BLAS GEMM on host matrices, computed out of core by an :class:`~accel.ooc.Engine`."""
from __future__ import annotations

import math
import numbers
import threading

import numpy as np
import torch

from accel.ooc.cache import source_key
from accel.ooc.devices import Problem
from accel.ooc.engine import Engine, check_device

SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_default_engines: dict = {}
_default_engines_lock = threading.Lock()


def gemm(A, B, C=None, *, alpha=1.0, beta=0.0, trans_a: bool = False, trans_b: bool = False, devices=None,
         memory_limit: int | None = None, block: int | None = None, compute_dtype=None, engine: Engine | None = None):
    r"""General matrix multiply on host matrices: ``alpha * op(A) @ op(B) + beta * C``.

    ``op(X)`` is ``X.T`` when the matching ``trans_*`` flag is set. The matrices stay in host memory; C
    is cut into blocks that the devices' workers compute, streaming tiles of A and B within
    ``memory_limit`` bytes per device. C is only read: the result is a new matrix, so a failed call
    never leaves a half-written C behind.

    Args:
        A (Tensor or ndarray): ``m x k`` (``k x m`` with ``trans_a``), on the host, any strides.
        B (Tensor or ndarray): ``k x n`` (``n x k`` with ``trans_b``).
        C (Tensor or ndarray, optional): anything broadcastable to ``m x n``; not read when ``beta == 0``
            (a NaN in C then does not propagate, as in BLAS).
        alpha (float): scale of the product; with ``alpha == 0`` A and B are not read.
        beta (float): scale of C.
        trans_a, trans_b (bool): use ``A.T`` / ``B.T``.
        devices (sequence, optional): devices to run on (see :class:`Engine`); default every visible GPU,
            else the CPU. ``"cpu"`` is a device too, and a device may be listed twice.
        memory_limit (int, optional): bytes the engine may hold per device (see :class:`Engine`).
        block (int, optional): force the block side (default: chosen from the device and the memory).
        compute_dtype (torch.dtype or str, optional): the precision of the products: ``torch.float64``,
            ``torch.float32`` (exact fp32: TF32 off), ``"tf32"`` (fp32 inputs, TF32 tensor cores on a
            GPU), ``torch.bfloat16`` or ``torch.float16`` (operands rounded to it, fp32 accumulation).
            Default: the inputs' dtype (half inputs accumulate in fp32). Required when dtypes differ.
        engine (Engine, optional): a reusable engine (its tile cache persists across calls); then
            ``devices`` and ``memory_limit`` must be left unset.

    Returns:
        A new ``m x n`` matrix, a NumPy array if every given input is one, else a CPU tensor; its dtype
        is C's, else ``torch.promote_types(A.dtype, B.dtype)``. Not differentiable (see
        :class:`accel.nn.OutOfCoreLinear`). ``engine.stats`` describes the call.

    Raises:
        ValueError: mismatched shapes (naming both), non-finite ``alpha``/``beta``, a device that does not
            exist, a memory limit too small (naming the minimum), conflicting arguments.
        TypeError: unsupported or mixed dtypes without ``compute_dtype``, inputs that are not matrices.
        RuntimeError: the devices ran out of memory even after one retry with a smaller plan.

    Example::

        >>> A, B = torch.randn(3000, 2000), torch.randn(2000, 1000)
        >>> C = accel.gemm(A, B, devices=["cpu", "cpu"], memory_limit=16 << 20)
        >>> torch.allclose(C, A @ B, rtol=1e-4, atol=1e-4)
        True
    """
    all_numpy = all(isinstance(x, np.ndarray) for x in (A, B, C) if x is not None)
    # tiles are keyed on the caller's objects (A_source, B_source): a detached copy would be new each call
    A_source, A, persist_a = _as_host_tensor(A, "A")
    B_source, B, persist_b = _as_host_tensor(B, "B")
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
    storage, allow_tf32, out_dtype = _resolve_dtypes(A, B, C, compute_dtype)
    accumulator = torch.float64 if torch.float64 in (storage, out_dtype) else torch.float32
    if engine is not None:
        if devices is not None or memory_limit is not None:
            raise ValueError("pass devices and memory_limit to the Engine, not to gemm(..., engine=...)")
    else:
        engine = _default_engine(devices, memory_limit)
    if block is not None and (not isinstance(block, int) or block < 1):
        raise ValueError(f"block must be a positive int, got {block!r}")

    if m == 0 or n == 0 or k == 0 or alpha == 0:  # no product to compute: BLAS reads neither A nor B
        engine.stats = None
        out = torch.zeros((m, n), dtype=out_dtype)
        if C is not None and beta != 0:
            out.copy_(C.to(accumulator) * beta)
    else:
        out = torch.empty((m, n), dtype=out_dtype)
        a_key, b_key = source_key(A_source, persist_a), source_key(B_source, persist_b)
        problem = Problem(a=op_a, b=op_b, c=C if beta != 0 else None, out=out, alpha=alpha, beta=beta,
                          storage_dtype=storage, accumulator_dtype=accumulator, allow_tf32=allow_tf32,
                          a_prefix=(a_key, trans_a, storage), b_prefix=(b_key, trans_b, storage),
                          sources=[(A_source, a_key), (B_source, b_key)])
        engine.run(problem, block)
    return out.numpy() if all_numpy else out


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
    if x.device.type != "cpu":
        raise ValueError(f"{name} is on {x.device}; gemm takes host matrices (for device-resident data "
                         f"torch.matmul is the right tool)")
    if x.dim() != 2 and not (name == "C" and x.dim() in (0, 1)):
        raise TypeError(f"{name} must be a matrix, got shape {tuple(x.shape)}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} has dtype {x.dtype}; supported: float32, float64, float16, bfloat16")
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


def _resolve_dtypes(A, B, C, compute_dtype):
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


def _default_engine(devices, memory_limit) -> Engine:
    """A shared engine per (devices, memory_limit), so staging buffers are allocated once; its cache does
    not persist between calls (an explicit Engine's does)."""
    if devices is not None:
        if isinstance(devices, (str, torch.device)):
            devices = [devices]
        devices = tuple(str(check_device(device)) for device in devices)
    with _default_engines_lock:
        key = (devices, memory_limit)
        if key not in _default_engines:
            _default_engines[key] = Engine(list(devices) if devices is not None else None, memory_limit,
                                           persist_cache=False)
        return _default_engines[key]
