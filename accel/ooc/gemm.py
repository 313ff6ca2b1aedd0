"""``accel.gemm``: BLAS GEMM on host matrices, computed out of core by an :class:`~accel.ooc.Engine`."""
from __future__ import annotations

import threading

from accel.ooc._call import SUPPORTED_DTYPES, gemm_call
from accel.ooc.engine import Engine, check_memory_limit, device_list
from accel.ooc.workers import check_device

__all__ = ["gemm", "SUPPORTED_DTYPES"]
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
        engine (Engine, optional): a reusable engine; then ``devices`` and ``memory_limit`` must be left
            unset. Its tiles persist across calls only if it was made with ``persist_cache=True`` (the
            caller's promise that operands are not written between calls; see :class:`Engine`).

    Returns:
        A new ``m x n`` matrix, a NumPy array if every given input is one, else a CPU tensor; its dtype
        is C's, else ``torch.promote_types(A.dtype, B.dtype)``. ``engine.stats`` describes the call.
        Differentiable: when grad mode is on and a tensor input requires grad, the result has a
        ``grad_fn`` whose backward is engine GEMMs too (so double backward works as well).

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
    if engine is not None:
        if devices is not None or memory_limit is not None:
            raise ValueError("pass devices and memory_limit to the Engine, not to gemm(..., engine=...)")
    else:
        engine = _default_engine(devices, memory_limit)
    return gemm_call(engine, A, B, C, alpha=alpha, beta=beta, trans_a=trans_a, trans_b=trans_b, block=block,
                     compute_dtype=compute_dtype)


def _default_engine(devices, memory_limit) -> Engine:
    """A shared engine per (devices, memory_limit), so threads and staging buffers are
    allocated once per process (its tiles live for one call, as on any engine without persist_cache)."""
    memory_limit = check_memory_limit(memory_limit)
    if devices is not None:
        devices = tuple(str(check_device(device)) for device in device_list(devices))
    with _default_engines_lock:
        key = (devices, memory_limit)
        if key not in _default_engines:
            _default_engines[key] = Engine(list(devices) if devices is not None else None, memory_limit,
                                           persist_cache=False)
        return _default_engines[key]
