"""The CUDA worker: copy-in / compute / copy-out on three streams ordered by events.

Operand tiles go host -> pinned staging (a packing copy that also narrows the dtype when
``compute_dtype`` asks for it) -> device on the copy-in stream. When the host operand is already pinned
and has a unit stride along rows or columns, the tile goes straight to the device with one
``cudaMemcpy2DAsync`` (through CuPy), with no host-side packing. Multiplies wait on the tiles' "ready"
events. Each block's result is copied out on the third stream into pinned staging; a host thread beside
the worker moves it into the host result and packs the next blocks' C tiles, so the worker thread never
stops queueing tiles at a block boundary. Pinned staging is allocated on first use, sized to the plan
(nothing for a ring a call does not use), and reused across blocks and calls.

Device memory: besides the engine's buffers, torch's cuBLAS keeps a workspace per (handle, stream); each
worker multiplies on its own stream and thread, so :meth:`CUDAWorker.configure` reserves
:func:`cublas_workspace_bytes` out of the worker's share of ``memory_limit``.
"""
from __future__ import annotations

import contextlib
import threading
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from accel.ooc.cache import Tile
from accel.ooc.plan import DeviceProfile
from accel.ooc.workers._cuda_runtime import (
    MAX_PITCH,
    StagingRing,
    StagingSlot,
    addmm_accumulates_into_float32,
    cublas_workspace_bytes,
)
from accel.ooc.workers.base import Problem, Worker, epilogue

# torch >= 2.8 multiplies half operands into a float32 output in one cuBLAS call (mm/addmm ``out_dtype``)
_HAS_OUT_DTYPE = "dtype_out" in torch.ops.aten.mm.overloads() and "dtype_out" in torch.ops.aten.addmm.overloads()
_HALF = (torch.float16, torch.bfloat16)


class CUDAWorker(Worker):
    """Computes tiles on a CUDA device with copy-in / compute / copy-out streams ordered by events.

    Two workers may share a device (each with its own streams, cache, cuBLAS workspace and half the
    device's budget). Pinned staging memory is host memory and is not charged to the device budget (see
    ``staging_bytes``).
    """

    kind = "cuda"

    # ==== device knowledge: the class-level Worker hooks (contract in base.py) ======================
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
        self._operand_ring = StagingRing(4)  # two generations of an A and a B tile
        self._c_ring = StagingRing(2)  # C of this block and the next, packed ahead on the host thread
        self._out_ring = StagingRing(2)  # write-back of one block overlaps the next block
        self._host: ThreadPoolExecutor | None = None  # unstages results and packs C tiles
        self._pending: list[Future] = []
        self._c_jobs: dict[int, tuple[StagingSlot, Future]] = {}
        self._last_write = None
        self._scratch_free = False
        self._fast_accumulate = False
        try:  # optional: strided pinned host tiles go to the device without a packing copy
            import cupy
        except ImportError:
            cupy = None
        self._cupy = cupy

    @property
    def staging_bytes(self) -> int:
        """Pinned host bytes this worker holds (allocated on first use, kept for later calls)."""
        return self._operand_ring.nbytes + self._c_ring.nbytes + self._out_ring.nbytes

    @property
    def workspace_bytes(self) -> int:
        """Device bytes of the cuBLAS workspace of this worker's compute stream (reserved in ``configure``)."""
        return cublas_workspace_bytes(torch.cuda.get_device_capability(self.device))

    def default_memory_limit(self) -> int:
        free, _total = torch.cuda.mem_get_info(self.device)
        return int(free * 0.9)

    def configure(self, limit: int) -> None:
        """Budget ``limit`` bytes: the cuBLAS workspace first, the engine's buffers and tiles the rest."""
        workspace = self.workspace_bytes
        if limit <= workspace:
            raise ValueError(f"memory_limit share of {limit} bytes for {self.name} does not cover the cuBLAS "
                             f"workspace of {workspace} bytes its compute stream holds; give more memory or "
                             f"shrink the workspace (CUBLAS_WORKSPACE_CONFIG, set before torch's first cuBLAS call)")
        super().configure(limit - workspace)

    # -- a call ---------------------------------------------------------------------------------------------
    def begin(self, problem: Problem) -> None:
        plan = problem.plan
        self._operand_bytes = max(plan.block_rows, plan.block_cols) * plan.slab * problem.storage_dtype.itemsize
        self._block_bytes = plan.block_rows * plan.block_cols * plan.output_size
        if self._host is None:
            self._host = ThreadPoolExecutor(1, thread_name_prefix=f"accel-cuda-host-{self.name}")
        with torch.cuda.device(self.device), torch.cuda.stream(self.compute):
            self._fast_accumulate = (_HAS_OUT_DTYPE and problem.accumulator_dtype == torch.float32 and
                                     problem.storage_dtype in _HALF and
                                     addmm_accumulates_into_float32(self.device, problem.storage_dtype))
            super().begin(problem)
        self._last_write = None
        self._scratch_free = False
        for ring in (self._operand_ring, self._c_ring, self._out_ring):
            ring.next = 0  # every call starts on the first slots: a one-block call never pins a second

    def wait_unused(self, tile: Tile) -> None:
        if tile.last_use is not None:
            tile.last_use.synchronize()

    def synchronize(self) -> None:
        for stream in (self.copy_in, self.compute, self.copy_out):
            stream.synchronize()

    # -- copies in --------------------------------------------------------------------------------------------
    @staticmethod
    def is_pinned(view: torch.Tensor) -> bool:
        return view.is_pinned()

    def _direct(self, view: torch.Tensor, dtype: torch.dtype) -> str | None:
        """``"rows"``/``"columns"`` when ``view`` can go to the device with one cudaMemcpy2DAsync
        (pinned, same dtype, unit stride along its rows/columns), else ``None`` (staged copy)."""
        if self._cupy is None or view.dtype != dtype or not self.is_pinned(view):
            return None
        rows, cols = view.shape
        size = view.element_size()
        # the pitch must cover a whole row: not so for broadcast (stride 0) or overlapping views
        if (view.stride(1) == 1 or cols == 1) and (rows == 1 or cols <= view.stride(0) <= MAX_PITCH // size):
            return "rows"
        if (view.stride(0) == 1 or rows == 1) and (cols == 1 or rows <= view.stride(1) <= MAX_PITCH // size):
            return "columns"
        return None

    def _memcpy_2d(self, view: torch.Tensor, target: torch.Tensor, stream) -> None:
        """Row-major strided pinned host tile -> contiguous device tensor of the same shape."""
        size = view.element_size()
        rows, cols = view.shape
        # one row: its stride is meaningless (any value, even below the width), the pitch is the width
        pitch = view.stride(0) if rows > 1 else cols
        runtime = self._cupy.cuda.runtime
        runtime.memcpy2DAsync(target.data_ptr(), cols * size, view.data_ptr(), pitch * size,
                              cols * size, rows, runtime.memcpyHostToDevice, stream.cuda_stream)

    def _copy_in(self, view: torch.Tensor, target: torch.Tensor) -> None:
        """Queue ``target <- view`` (host, any strides) on the copy-in stream; ``target`` is contiguous."""
        if self._direct(view, target.dtype) == "rows":
            self._memcpy_2d(view, target, self.copy_in)
            return
        slot = self._operand_ring.take()
        slot.wait_device()
        slot.reserve(self._operand_bytes)
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
                buffer = self.allocate(view.shape[::-1], problem.storage_dtype)
                self._memcpy_2d(view.t(), buffer, self.copy_in)
                tensor = buffer.t()
            else:
                tensor = self.allocate(view.shape, problem.storage_dtype)
                self._copy_in(view, tensor)
            tensor.record_stream(self.copy_in)
            ready = torch.cuda.Event()
            ready.record(self.copy_in)
        return Tile(key, tensor, nbytes, ready=ready)

    # -- multiply ---------------------------------------------------------------------------------------------
    def multiply_accumulate(self, acc, a, b, accumulate, problem) -> None:
        with torch.cuda.device(self.device), torch.cuda.stream(self.compute):
            self.compute.wait_event(a.ready)
            self.compute.wait_event(b.ready)
            for tile in (a, b):  # the allocator must not reuse a tile's memory before this multiply ran
                tile.tensor.record_stream(self.compute)
            self._multiply(acc, a.tensor, b.tensor, accumulate)
            done = torch.cuda.Event()
            done.record(self.compute)
        a.last_use = b.last_use = done

    def _multiply(self, acc, a, b, accumulate) -> None:
        """``acc (+)= a @ b`` on the current (compute) stream, in calls CUDA's torch accepts."""
        if a.dtype == acc.dtype:
            if accumulate:
                acc.addmm_(a, b)
            else:
                torch.mm(a, b, out=acc)
        elif self._fast_accumulate or (not accumulate and _HAS_OUT_DTYPE and a.dtype in _HALF and
                                       acc.dtype == torch.float32):
            # half operands straight into the fp32 accumulator (out_dtype fp32 is the only wider output
            # CUDA allows; addmm takes the fp32 acc as self where the probe said so)
            if accumulate:
                torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
            else:
                torch.mm(a, b, out_dtype=torch.float32, out=acc)
        else:
            self._multiply_through_scratch(acc, a, b, accumulate)

    def _multiply_through_scratch(self, acc, a, b, accumulate) -> None:
        """Operands narrower than the accumulator, no single call for it (an fp64 accumulator, or an fp32
        one where addmm refuses it): the product goes to the output tile's memory, idle until the
        epilogue, then is added. It is float32 where it fits (always with an fp64 accumulator), else the
        operands' half dtype (each slab's product then rounded to it once)."""
        out_size = self._out_buffer.element_size()
        wide = a.dtype == torch.float32 or (_HAS_OUT_DTYPE and out_size >= 4)
        product_dtype = torch.float32 if wide else a.dtype
        if not self._scratch_free:  # the previous block's copy-out may still read the output tile
            if self._last_write is not None:
                self.compute.wait_event(self._last_write)
            self._scratch_free = True
        count = acc.numel() * product_dtype.itemsize
        product = self._out_buffer.view(torch.uint8)[:count].view(product_dtype).view(acc.shape)
        if product_dtype == a.dtype:
            torch.mm(a, b, out=product)
        else:
            torch.mm(a, b, out_dtype=product_dtype, out=product)
        if accumulate:
            acc.add_(product)
        else:
            acc.copy_(product)

    # -- write-back -------------------------------------------------------------------------------------------
    def run_block(self, problem: Problem, block) -> None:
        if problem.c is not None:  # pack this block's C on the host thread while its slabs are multiplied
            (r0, r1), (c0, c1) = block.rows, block.cols
            view = problem.c[r0:r1, c0:c1]
            if self._direct(view, problem.out.dtype) != "rows":
                slot = self._c_ring.take()
                self._c_jobs[block.index] = (slot, self._submit(self._pack, slot, view, problem.out.dtype))
        super().run_block(problem, block)

    def _submit(self, function, *arguments) -> Future:
        job = self._host.submit(function, *arguments)
        self._pending.append(job)
        return job

    def _pack(self, slot: StagingSlot, view: torch.Tensor, dtype: torch.dtype) -> None:
        """(host thread) ``slot <- view`` once the device copy that last read the slot is done."""
        with torch.cuda.device(self.device):  # this thread's CUDA calls (event wait, pinning) on our device
            slot.wait_device()
            slot.reserve(self._block_bytes)
        slot.view(view.shape, dtype).copy_(view)

    def _unstage(self, slot: StagingSlot, destination: torch.Tensor) -> None:
        """(host thread) pinned staging -> the host result, once the device copy into the slot is done."""
        with torch.cuda.device(self.device):
            slot.wait_device()
        destination.copy_(slot.view(destination.shape, destination.dtype))

    def write_block(self, problem, block, acc) -> None:
        (r0, r1), (c0, c1) = block.rows, block.cols
        out_tile = self._out_buffer[: acc.numel()].view(acc.shape)
        with torch.cuda.device(self.device):
            if self._last_write is not None:  # the previous block's copy-out may still read out_tile
                self.compute.wait_event(self._last_write)
            if problem.c is not None:
                self._load_c(problem, block, out_tile)
            with torch.cuda.stream(self.compute):
                epilogue(acc, out_tile if problem.c is not None else None, problem.alpha, problem.beta)
                out_tile.copy_(acc)
                computed = torch.cuda.Event()
                computed.record(self.compute)
            self.copy_out.wait_event(computed)
            slot = self._out_ring.take()
            if slot.job is not None:  # the host thread must have emptied it (the block before last)
                slot.job.result()
            slot.wait_device()
            slot.reserve(self._block_bytes)
            staged = slot.view(acc.shape, out_tile.dtype)
            with torch.cuda.stream(self.copy_out):
                staged.copy_(out_tile, non_blocking=True)
            slot.event = torch.cuda.Event()
            slot.event.record(self.copy_out)
            self._last_write = slot.event
        slot.job = self._submit(self._unstage, slot, problem.out[r0:r1, c0:c1])
        self._scratch_free = False
        self.bytes_to_host += acc.numel() * out_tile.element_size()

    def _load_c(self, problem, block, out_tile) -> None:
        """Queue ``out_tile <- C[block]`` on the copy-in stream, then make the compute stream wait for it."""
        if self._last_write is not None:
            self.copy_in.wait_event(self._last_write)
        if self._scratch_free:  # this block's multiplies used out_tile as scratch
            multiplied = torch.cuda.Event()
            multiplied.record(self.compute)
            self.copy_in.wait_event(multiplied)
        (r0, r1), (c0, c1) = block.rows, block.cols
        packed = self._c_jobs.pop(block.index, None)
        if packed is None:
            self._memcpy_2d(problem.c[r0:r1, c0:c1], out_tile, self.copy_in)
        else:
            slot, job = packed
            job.result()
            with torch.cuda.stream(self.copy_in):
                out_tile.copy_(slot.view(out_tile.shape, out_tile.dtype), non_blocking=True)
            slot.event = torch.cuda.Event()
            slot.event.record(self.copy_in)
        self.bytes_to_device += out_tile.numel() * out_tile.element_size()
        loaded = torch.cuda.Event()
        loaded.record(self.copy_in)
        self.compute.wait_event(loaded)

    def flush(self, problem: Problem) -> None:
        """Wait until every result is in the host matrix (raises a host-thread job's error)."""
        for job in self._pending:
            job.result()

    def end(self, problem: Problem) -> None:
        try:
            super().end(problem)
        finally:  # no host job may touch a slot or the result after the call (or its failure)
            for job in self._pending:
                try:
                    job.result()
                except BaseException:  # noqa: BLE001 - the call already failed; flush reports the first error
                    pass
            self._pending.clear()
            self._c_jobs.clear()
            for slot in self._out_ring.slots:  # a failed job must not fail the next call
                slot.job = None
            self._last_write = None
