"""What the CUDA worker knows of CUDA and of torch's cuBLAS, apart from the worker's own logic: pinned
staging slots, the cuBLAS workspace torch holds per (handle, stream), which ``addmm(out_dtype=)`` this
torch accepts, the largest ``cudaMemcpy2DAsync`` pitch."""
from __future__ import annotations

import os
import re
from concurrent.futures import Future
from typing import Any

import torch

#: cudaMemcpy2DAsync rejects a pitch above cudaDevAttrMaxPitch (2^31 - 1 bytes on current GPUs)
MAX_PITCH = 2**31 - 1
_accepts_float32_self: dict = {}  # (device, operand dtype) -> whether addmm(out_dtype=fp32) takes an fp32 self


def pinned_bytes(nbytes: int) -> torch.Tensor:
    """A page-locked host buffer (what lets host-device copies run asynchronously)."""
    return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)


def cublas_workspace_bytes(capability: tuple[int, int]) -> int:
    """Device bytes torch's cuBLAS holds for one (handle, stream): the cuBLAS workspace
    (``CUBLAS_WORKSPACE_CONFIG``, ``:SIZE:COUNT`` in KiB; default 32 MiB on compute capability 9.0, else
    8 MiB + 128 KiB) plus the separate cuBLASLt workspace (``CUBLASLT_WORKSPACE_SIZE`` KiB, default 1 MiB,
    at most the former; none with ``TORCH_CUBLASLT_UNIFIED_WORKSPACE=1``). Torch reads these variables
    once, at its first cuBLAS call: set them before that."""
    default = 32 << 20 if tuple(capability) == (9, 0) else (8 << 20) + (128 << 10)
    pairs = re.findall(r":([0-9]+):([0-9]+)", os.environ.get("CUBLAS_WORKSPACE_CONFIG", ""))
    cublas = sum(int(size) * 1024 * int(count) for size, count in pairs) if pairs else default
    if os.environ.get("TORCH_CUBLASLT_UNIFIED_WORKSPACE", "").lower() in ("1", "true", "on", "yes"):
        return cublas
    try:
        lt = int(os.environ.get("CUBLASLT_WORKSPACE_SIZE", "1024")) * 1024
    except ValueError:
        lt = 1 << 20
    return cublas + min(lt, cublas)


def addmm_accumulates_into_float32(device: torch.device, operand_dtype: torch.dtype) -> bool:
    """Whether this torch's CUDA ``addmm(acc, a, b, out_dtype=float32, out=acc)`` takes a float32 ``acc``
    with half ``a``/``b`` (torch before the fix of pytorch#167931 asks ``self`` to have the operands'
    dtype). Probed once on empty tensors: no memory, no kernel."""
    key = (device, operand_dtype)
    if key not in _accepts_float32_self:
        acc = torch.empty((0, 0), dtype=torch.float32, device=device)
        a = torch.empty((0, 1), dtype=operand_dtype, device=device)
        b = torch.empty((1, 0), dtype=operand_dtype, device=device)
        try:
            torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
            _accepts_float32_self[key] = True
        except RuntimeError:
            _accepts_float32_self[key] = False
    return _accepts_float32_self[key]


class StagingSlot:
    """A pinned host buffer, the event after which the device copy using it is done, and the host job
    (a :class:`Future`) that reads or fills it."""

    def __init__(self):
        self.buffer = torch.empty(0, dtype=torch.uint8)
        self.event: Any = None
        self.job: Future | None = None

    def wait_device(self) -> None:
        if self.event is not None:  # the copy that used the buffer last must be done before we touch it
            self.event.synchronize()
            self.event = None

    def reserve(self, nbytes: int) -> None:
        """Make the buffer hold ``nbytes`` (allocated on first use; call after :meth:`wait_device`)."""
        if self.buffer.numel() < nbytes:
            self.buffer = torch.empty(0, dtype=torch.uint8)  # free the old one first
            self.buffer = pinned_bytes(nbytes)

    def view(self, shape, dtype) -> torch.Tensor:
        count = 1
        for size in shape:
            count *= size
        return self.buffer[: count * dtype.itemsize].view(dtype).view(shape)


class StagingRing:
    """Round-robin pinned buffers, each allocated when first used and reused across blocks and calls."""

    def __init__(self, slots: int):
        self.slots = [StagingSlot() for _ in range(slots)]
        self.next = 0

    @property
    def nbytes(self) -> int:
        return sum(slot.buffer.numel() for slot in self.slots)

    def take(self) -> StagingSlot:
        """The next slot (not yet free: wait on its job and event before touching its buffer)."""
        slot = self.slots[self.next]
        self.next = (self.next + 1) % len(self.slots)
        return slot
