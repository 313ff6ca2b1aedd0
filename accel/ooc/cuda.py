"""The CUDA worker: copy-in / compute / copy-out on three streams ordered by events.

Operand tiles go host -> pinned staging (a packing copy that also narrows the dtype when
``compute_dtype`` asks for it) -> device on the copy-in stream. When the host operand is already pinned
and has a unit stride along rows or columns, the tile goes straight to the device with one
``cudaMemcpy2DAsync`` (through CuPy), with no host-side packing. Multiplies wait on the tiles' "ready"
events; each block's result is copied out on the third stream into pinned staging, and moved into the
host result one block later, so write-back overlaps the next block's work. Staging buffers are allocated
once (grown when a bigger plan needs it) and reused across blocks and calls.
"""
from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass
from typing import Any

import torch

from accel.ooc.cache import Tile
from accel.ooc.devices import Problem, Worker, epilogue
from accel.ooc.plan import DeviceProfile

# torch >= 2.9 multiplies half operands into a float32 output in one cuBLAS call
_HAS_OUT_DTYPE = "dtype_out" in torch.ops.aten.mm.overloads() and "dtype_out" in torch.ops.aten.addmm.overloads()


def pinned_bytes(nbytes: int) -> torch.Tensor:
    """A page-locked host buffer (what lets host-device copies run asynchronously)."""
    return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)


@dataclass
class _Slot:
    """A pinned host buffer and the event after which the copy using it has finished."""

    buffer: torch.Tensor
    event: Any = None

    def view(self, shape, dtype) -> torch.Tensor:
        count = 1
        for size in shape:
            count *= size
        return self.buffer[: count * torch.empty((), dtype=dtype).element_size()].view(dtype).view(shape)


class _StagingRing:
    """Round-robin pinned buffers, allocated once and reused across blocks and calls."""

    def __init__(self, slots: int):
        self.slots = [_Slot(torch.empty(0, dtype=torch.uint8)) for _ in range(slots)]
        self.next = 0

    @property
    def nbytes(self) -> int:
        return sum(slot.buffer.numel() for slot in self.slots)

    def ensure(self, nbytes: int) -> None:
        for slot in self.slots:
            if slot.buffer.numel() < nbytes:
                if slot.event is not None:
                    slot.event.synchronize()
                slot.buffer = pinned_bytes(nbytes)
                slot.event = None

    def acquire(self) -> _Slot:
        slot = self.slots[self.next]
        self.next = (self.next + 1) % len(self.slots)
        if slot.event is not None:  # the copy that used it last must be done before we overwrite it
            slot.event.synchronize()
        return slot


class CUDAWorker(Worker):
    """Computes tiles on a CUDA device with copy-in / compute / copy-out streams ordered by events.

    Two workers may share a device (each with its own streams, cache and half the device's budget).
    Pinned staging memory is host memory and is not charged to the device budget (see ``staging_bytes``).
    """

    kind = "cuda"

    # ==== device knowledge: the class-level Worker hooks (contract in devices.py) ======================
    # Everything else in accel.ooc is device-agnostic; what knows CUDA as a device type lives here.
    default_priority = 10  # with no devices given: every visible GPU before the CPU

    #: dense peak rates by compute capability (major, minor); host link as measured pinned
    PROFILES = {
        (9, 0): DeviceProfile({"float64": 6.7e13, "float32": 6.7e13, "tf32": 4.9e14, "half": 9.9e14}, 5e10, 1024),
        (8, 0): DeviceProfile({"float64": 1.95e13, "float32": 1.95e13, "tf32": 1.56e14, "half": 3.12e14}, 2.5e10,
                              1024),
    }
    DEFAULT_PROFILE = DeviceProfile({"float64": 1e12, "float32": 1.5e13, "tf32": 1.5e13, "half": 6e13}, 1.2e10, 1024)
    _OUT_OF_MEMORY_TEXT = ("out of memory", "CUBLAS_STATUS_ALLOC_FAILED", "cudaErrorMemoryAllocation")
    _compute_mode_lock = threading.Lock()  # the fp32 matmul precision switch is process-wide

    @classmethod
    def default_devices(cls) -> list[str]:
        return [f"cuda:{i}" for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []

    @classmethod
    def check_device(cls, device: torch.device) -> torch.device:
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = device.index if device.index is not None else (torch.cuda.current_device() if count else 0)
        if index >= count:
            raise ValueError(f"device {str(device)!r} does not exist: {count} CUDA device(s) visible")
        return torch.device("cuda", index)

    @classmethod
    def is_out_of_memory(cls, error: BaseException) -> bool:
        return (super().is_out_of_memory(error) or isinstance(error, torch.OutOfMemoryError)
                or any(text in str(error) for text in cls._OUT_OF_MEMORY_TEXT))

    @classmethod
    def release_cached_memory(cls) -> None:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    @classmethod
    @contextlib.contextmanager
    def compute_mode(cls, problem: Problem):
        """TF32 on for ``compute_dtype="tf32"``, off otherwise, for the call; the user's setting is put back
        exactly as found. torch >= 2.9 has ``fp32_precision`` (reading or writing the legacy ``allow_tf32``
        beside it raises "mix of the legacy and new APIs"), older torch only ``allow_tf32``."""
        matmul = torch.backends.cuda.matmul
        name = "fp32_precision" if hasattr(matmul, "fp32_precision") else "allow_tf32"
        wanted = problem.allow_tf32 if name == "allow_tf32" else ("tf32" if problem.allow_tf32 else "ieee")
        with cls._compute_mode_lock:
            previous = getattr(matmul, name)
            setattr(matmul, name, wanted)
            try:
                yield
            finally:
                setattr(matmul, name, previous)

    @property
    def profile(self) -> DeviceProfile:
        return self.PROFILES.get(tuple(torch.cuda.get_device_capability(self.device)), self.DEFAULT_PROFILE)
    # ==== end of device knowledge =====================================================================

    def __init__(self, device, memory_limit: int | None = None):
        super().__init__(device, memory_limit)
        with torch.cuda.device(self.device):
            self.copy_in = torch.cuda.Stream(self.device)
            self.compute = torch.cuda.Stream(self.device)
            self.copy_out = torch.cuda.Stream(self.device)
        self._operand_ring = _StagingRing(4)  # two generations of an A and a B tile
        self._c_ring = _StagingRing(1)
        self._out_ring = _StagingRing(2)  # write-back of one block overlaps the next block
        self._pending: list[tuple[_Slot, torch.Tensor, torch.Size, torch.dtype]] = []
        self._last_write = None
        try:  # optional: strided pinned host tiles go to the device without a packing copy
            import cupy
        except ImportError:
            cupy = None
        self._cupy = cupy

    @property
    def staging_bytes(self) -> int:
        return self._operand_ring.nbytes + self._c_ring.nbytes + self._out_ring.nbytes

    def default_memory_limit(self) -> int:
        free, _total = torch.cuda.mem_get_info(self.device)
        return int(free * 0.9)

    def begin(self, problem: Problem) -> None:
        plan = problem.plan
        operand = max(plan.block_rows, plan.block_cols) * plan.slab * plan.operand_size
        self._operand_ring.ensure(operand)
        self._c_ring.ensure(plan.block_rows * plan.block_cols * plan.output_size)
        self._out_ring.ensure(plan.block_rows * plan.block_cols * plan.output_size)
        with torch.cuda.device(self.device):
            super().begin(problem)
        self._last_write = None

    def wait_unused(self, tile: Tile) -> None:
        if tile.last_use is not None:
            tile.last_use.synchronize()

    def synchronize(self) -> None:
        for stream in (self.copy_in, self.compute, self.copy_out):
            stream.synchronize()

    @staticmethod
    def is_pinned(view: torch.Tensor) -> bool:
        return view.is_pinned()

    def _direct(self, view: torch.Tensor, dtype: torch.dtype) -> str | None:
        """``"rows"``/``"columns"`` when ``view`` can go to the device with one cudaMemcpy2DAsync
        (pinned, same dtype, unit stride along its rows/columns), else ``None`` (staged copy)."""
        if self._cupy is None or view.dtype != dtype or not self.is_pinned(view):
            return None
        rows, cols = view.shape
        # the pitch must cover a whole row: not so for broadcast (stride 0) or overlapping views
        if (view.stride(1) == 1 or cols == 1) and (rows == 1 or view.stride(0) >= cols):
            return "rows"
        if (view.stride(0) == 1 or rows == 1) and (cols == 1 or view.stride(1) >= rows):
            return "columns"
        return None

    def _memcpy_2d(self, view: torch.Tensor, target: torch.Tensor) -> None:
        """Row-major strided pinned host tile -> contiguous device tensor of the same shape."""
        size = view.element_size()
        rows, cols = view.shape
        runtime = self._cupy.cuda.runtime
        runtime.memcpy2DAsync(target.data_ptr(), cols * size, view.data_ptr(), view.stride(0) * size,
                              cols * size, rows, runtime.memcpyHostToDevice, self.copy_in.cuda_stream)

    def _copy_in(self, view: torch.Tensor, target: torch.Tensor, ring: _StagingRing) -> None:
        """Queue ``target <- view`` (host, any strides) on the copy-in stream; ``target`` is contiguous."""
        if self._direct(view, target.dtype) == "rows":
            self._memcpy_2d(view, target)
            return
        slot = ring.acquire()
        staged = slot.view(view.shape, target.dtype)
        staged.copy_(view)  # packs a strided tile (and narrows the dtype) on the host
        with torch.cuda.stream(self.copy_in):
            target.copy_(staged, non_blocking=True)
        slot.event = torch.cuda.Event()
        slot.event.record(self.copy_in)

    def load_tile(self, view, key, nbytes, problem) -> Tile:
        with torch.cuda.device(self.device):
            if self._direct(view, problem.storage_dtype) == "columns":
                # a tile of a transposed (column-major) host matrix: copy its transpose, whose rows are
                # contiguous, and keep the transposed view: matmul takes transposed operands as they are
                buffer = torch.empty(view.shape[::-1], dtype=problem.storage_dtype, device=self.device)
                self._memcpy_2d(view.t(), buffer)
                tensor = buffer.t()
            else:
                tensor = torch.empty(view.shape, dtype=problem.storage_dtype, device=self.device)
                self._copy_in(view, tensor, self._operand_ring)
            ready = torch.cuda.Event()
            ready.record(self.copy_in)
        return Tile(key, tensor, nbytes, ready=ready)

    def multiply_accumulate(self, acc, a, b, accumulate, problem) -> None:
        with torch.cuda.device(self.device), torch.cuda.stream(self.compute):
            self.compute.wait_event(a.ready)
            self.compute.wait_event(b.ready)
            for tile in (a, b):  # the allocator must not reuse a tile's memory before this multiply ran
                tile.tensor.record_stream(self.compute)
            if a.tensor.dtype == acc.dtype:
                if accumulate:
                    acc.addmm_(a.tensor, b.tensor)
                else:
                    torch.mm(a.tensor, b.tensor, out=acc)
            elif _HAS_OUT_DTYPE:  # bf16/fp16 operands straight into the fp32 accumulator
                if accumulate:
                    torch.addmm(acc, a.tensor, b.tensor, out_dtype=acc.dtype, out=acc)
                else:
                    torch.mm(a.tensor, b.tensor, out_dtype=acc.dtype, out=acc)
            else:  # older torch: each slab's product is rounded to the half dtype (a transient block)
                product = torch.mm(a.tensor, b.tensor)
                if accumulate:
                    acc.add_(product)
                else:
                    acc.copy_(product)
            done = torch.cuda.Event()
            done.record(self.compute)
        a.last_use = b.last_use = done

    def write_block(self, problem, block, acc) -> None:
        (r0, r1), (c0, c1) = block.rows, block.cols
        out_tile = self._out_buffer[: acc.numel()].view(acc.shape)
        with torch.cuda.device(self.device):
            if self._last_write is not None:  # the previous block's copy-out may still read out_tile
                self.compute.wait_event(self._last_write)
            if problem.c is not None:
                if self._last_write is not None:
                    self.copy_in.wait_event(self._last_write)
                self._copy_in(problem.c[r0:r1, c0:c1], out_tile, self._c_ring)
                self.bytes_to_device += out_tile.numel() * out_tile.element_size()
                loaded = torch.cuda.Event()
                loaded.record(self.copy_in)
                self.compute.wait_event(loaded)
            with torch.cuda.stream(self.compute):
                epilogue(acc, out_tile if problem.c is not None else None, problem.alpha, problem.beta)
                out_tile.copy_(acc)
                computed = torch.cuda.Event()
                computed.record(self.compute)
            self.copy_out.wait_event(computed)
            # the oldest pending write-back uses the slot we are about to reuse: move it to the host first
            self._finish_write(keep=len(self._out_ring.slots) - 1)
            slot = self._out_ring.acquire()
            staged = slot.view(acc.shape, out_tile.dtype)
            with torch.cuda.stream(self.copy_out):
                staged.copy_(out_tile, non_blocking=True)
            slot.event = torch.cuda.Event()
            slot.event.record(self.copy_out)
            self._last_write = slot.event
        self._pending.append((slot, problem.out[r0:r1, c0:c1], acc.shape, out_tile.dtype))
        self.bytes_to_host += acc.numel() * out_tile.element_size()

    def _finish_write(self, keep: int) -> None:
        """Copy finished write-backs from pinned staging into the host result, leaving ``keep`` in flight."""
        while len(self._pending) > keep:
            slot, destination, shape, dtype = self._pending.pop(0)
            slot.event.synchronize()
            destination.copy_(slot.view(shape, dtype))

    def flush(self, problem: Problem) -> None:
        self._finish_write(keep=0)

    def end(self, problem: Problem) -> None:
        try:
            super().end(problem)
        finally:
            self._pending.clear()  # after a failure the result is discarded anyway
            self._last_write = None
