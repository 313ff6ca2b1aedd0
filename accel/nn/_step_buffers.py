"""Large CPU buffers kept from one training step to the next, as CUDA's caching allocator keeps device memory.

Why: a BTLSTM step (64 -> 256, T=100, batch 32) allocates and frees three 13 MB buffers of the same size
(the projected input, the saved gates, the gates' gradient). glibc hands freed memory at the top of its heap
back to the OS once more than its trim threshold (twice the dynamic mmap threshold, ~26 MB here) is free
there, and the next step then faults every 4 KiB page in again, zero-filled by the kernel. On the 2-core VM
that cost a step 3,200-7,600 page faults, eager or compiled alike, as many as a process's heap layout
happened to give: with this pool the step takes 0.83-0.87x the time (``experiments/step_buffers.py``).
glibc's own knobs (``M_TRIM_THRESHOLD``) are process-wide, so the library leaves them alone and reuses its
own buffers instead.

A buffer is handed out again only when nothing else holds its memory: no tensor, view, autograd saved
tensor, NumPy array or storage object (its storage's reference count, and the Python count of the storage
object). So a buffer that a user keeps, or that ``retain_graph`` keeps saved, is never written over.

Only CPU buffers of at least :data:`MIN_BYTES` are pooled, up to :data:`MAX_BYTES` in all; :func:`clear`
lets the idle ones go (e.g. after training, before a different workload). ``ACCEL_STEP_BUFFERS=0``
turns the pool off (every call allocates afresh).
"""
from __future__ import annotations

import math
import os
import sys
import threading

import torch

__all__ = ["empty", "clear", "pooled_bytes", "MIN_BYTES", "MAX_BYTES"]

MIN_BYTES = 1 << 20  # below this glibc reuses freed memory without returning it to the OS
MAX_BYTES = 1 << 30  # the pool stops growing here; larger demands allocate as usual
enabled = os.environ.get("ACCEL_STEP_BUFFERS", "1") != "0"

_lock = threading.Lock()
_buffers: dict[int, list[torch.Tensor]] = {}  # size class in bytes -> flat uint8 tensors owning the memory
_total = 0


def _size_class(nbytes: int) -> int:
    """``nbytes`` rounded up to one of 8 steps per power of two (at most 12.5% more): sequences of
    neighbouring lengths share buffers."""
    step = 1 << max(0, nbytes.bit_length() - 4)
    return -(-nbytes // step) * step


def _holders(buffer: torch.Tensor) -> tuple[int, int]:
    """The references to ``buffer``'s memory: the storage's own count (tensors, views, saved tensors, arrays,
    storage objects), and the Python count of its storage object (a storage object a user kept is this
    same object: torch keeps one per storage)."""
    storage = buffer.untyped_storage()
    return torch._C._storage_Use_Count(storage._cdata), sys.getrefcount(storage)


# what the counts read when only the pool holds a buffer (torch's own share of them differs between versions)
_ONLY_THE_POOL = _holders(torch.empty(1, device="cpu"))


def _is_free(buffer: torch.Tensor) -> bool:
    return _holders(buffer) == _ONLY_THE_POOL


def empty(shape, like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """An uninitialised contiguous tensor of ``shape`` (dtype and device of ``like`` unless ``dtype``),
    from the pool when it is a large CPU one."""
    global _total
    dtype = like.dtype if dtype is None else dtype
    nbytes = math.prod(shape) * dtype.itemsize
    if not enabled or like.device.type != "cpu" or nbytes < MIN_BYTES:
        return torch.empty(shape, dtype=dtype, device=like.device)
    size = _size_class(nbytes)
    with _lock:
        pool = _buffers.setdefault(size, [])
        buffer = next((b for b in pool if _is_free(b)), None)
        if buffer is None:
            if _total + size > MAX_BYTES:
                _release_idle()
            if _total + size > MAX_BYTES:  # past the cap: an ordinary allocation of the exact size
                return torch.empty(shape, dtype=dtype, device="cpu")
            buffer = torch.empty(size, dtype=torch.uint8, device="cpu")  # not torch's default device
            pool.append(buffer)
            _total += size
        # made while the lock is held: from here the buffer counts as in use for every other thread
        return torch.empty(0, dtype=dtype, device="cpu").set_(buffer.untyped_storage(), 0, tuple(shape))


def _release_idle() -> None:
    global _total
    for size, pool in list(_buffers.items()):
        kept = [b for b in pool if not _is_free(b)]
        _total -= size * (len(pool) - len(kept))
        pool[:] = kept  # in place: a caller may hold this list


def clear() -> None:
    """Let the pool's idle buffers go (those in use stay in it)."""
    with _lock:
        _release_idle()


def pooled_bytes() -> int:
    """Bytes the pool holds, idle or in use."""
    return _total
