"""The Worker base class: one per device entry, each computing whole output blocks of C; the hook contract.

The block algorithm lives in :class:`Worker` (fetch the A and B tiles of a slab through the tile cache,
fetch the next slab's tiles while this one is multiplied, then write the block back); a worker type says
how a tile is loaded, multiplied and written back, and owns everything that knows its device. A new
worker type is one file in ``accel/ooc/workers/``: a subclass registered with
:func:`accel.ooc.register_worker`.

* :class:`~accel.ooc.workers.cpu.CPUWorker` (``cpu.py``) computes tiles with torch on the host, so the whole
  engine (plan, cache, memory limit, scheduling) runs and is tested without a GPU.
* :class:`~accel.ooc.workers.cuda.CUDAWorker` (``cuda.py``) copies in, computes and copies out on three streams.

Hooks a worker type defines (``cls`` hooks are class-level: the engine calls them on the class)
--------------------------------------------------------------------------------------------------
Class level (device knowledge):

* ``kind`` (str): the :class:`torch.device` type served (``"cpu"``, ``"cuda"``); the registry key.
* ``default_priority`` (int): when no devices are given, the highest-priority type that finds any
  devices is used (CUDA 10, CPU 0).
* ``default_devices() -> list[str]``: the devices of this type visible now (may be empty); must not
  raise when the device's runtime is missing.
* ``check_device(device: torch.device) -> torch.device``: the normalised device (``"cuda"`` ->
  ``"cuda:N"``); raises ``ValueError`` naming the device when it does not exist here.
* ``is_out_of_memory(error: BaseException) -> bool``: whether ``error`` means this device ran out of
  memory (the engine then re-plans with half the memory and retries once). The base class recognises
  :class:`MemoryBudgetExceeded`, :class:`MemoryError` and :class:`torch.OutOfMemoryError`; never raises.
* ``release_cached_memory() -> None``: called after an out-of-memory failure, before the retry
  (CUDA empties torch's caching allocator). Default: nothing.
* ``compute_mode(problem: Problem)``: a context manager entered once per call, on the calling thread,
  around all workers of this type (e.g. CUDA's TF32 switch, which is process-wide). It must leave any
  global setting exactly as it found it, also when the call fails. Default: does nothing.

Instance level (the device operations; all run on the worker's own thread):

* ``profile -> DeviceProfile``: peak rates and link bandwidth, for sizing blocks.
* ``default_memory_limit() -> int``: bytes the device can give the engine when the user sets no limit
  (shared by the device's workers).
* ``storage_size(storage_dtype, accumulator_dtype) -> int``: bytes per element of a stored operand tile.
* ``allocate(shape, dtype) -> Tensor``: device memory (already charged to the account by the caller).
* ``load_tile(view, key, nbytes, problem) -> Tile``: queue the copy of the host ``view`` (any strides,
  the op(A)/op(B) orientation) into a new device tile of ``problem.storage_dtype``; ``nbytes`` is
  already charged. May raise an out-of-memory error (the charge is refunded by the cache).
* ``multiply_accumulate(acc, a, b, accumulate, problem)``: ``acc (+)= a.tensor @ b.tensor``; ``a`` and
  ``b`` are :class:`~accel.ooc.cache.Tile` objects (``tensor``, ``ready``, ``last_use``; ``tensor`` may
  be a transposed view when the tile was loaded for the other orientation of its source).
* ``write_block(problem, block, acc)``: ``out[block] = alpha * acc + beta * c[block]`` (may be
  deferred until ``flush``); counts ``bytes_to_device`` / ``bytes_to_host``.
* ``wait_unused(tile)``, ``synchronize()``, ``flush(problem)``: wait for queued work.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import torch

from accel.ooc.cache import MemoryAccount, MemoryBudgetExceeded, Tile, TileCache, TransposedTile
from accel.ooc.plan import Block, DeviceProfile, Plan


class Cancelled(Exception):
    """Raised inside a worker when another worker failed and the call is being abandoned."""


@dataclass
class Problem:
    """One GEMM as the workers see it: host views ``a = op(A)`` (m x k), ``b = op(B)`` (k x n), ``c``
    (m x n, ``None`` when ``beta == 0``) and the preallocated host result ``out``."""

    a: torch.Tensor
    b: torch.Tensor
    c: torch.Tensor | None
    out: torch.Tensor
    alpha: float
    beta: float
    storage_dtype: torch.dtype
    accumulator_dtype: torch.dtype
    allow_tf32: bool
    a_prefix: tuple  # (SourceKey, storage dtype): the start of every A tile key
    b_prefix: tuple
    a_transposed: bool = False  # a is the transpose of its source (tiles are keyed in source coordinates)
    b_transposed: bool = False
    sources: list = field(default_factory=list)  # [(host tensor, SourceKey)] for TileCache.track
    plan: Plan | None = None
    cancelled: Any = None  # threading.Event


class Worker:
    """Computes blocks of C on one device. Subclasses define the four device operations.

    Args:
        device (str or torch.device): where the tiles live.
        memory_limit (int, optional): bytes this worker may hold; ``None`` lets the engine decide.
    """

    kind = "abstract"
    default_priority = 0
    #: whether blocks pass through a separate output tile (C staging, dtype conversion, write-back that
    #: overlaps the next block); the plan charges ``output_size`` per block element only if some worker does
    needs_output_tile = True

    # -- device knowledge (class level; see the module docstring) --------------------------------------
    @classmethod
    def default_devices(cls) -> list[str]:
        return []

    @classmethod
    def check_device(cls, device: torch.device) -> torch.device:
        return device

    @classmethod
    def is_out_of_memory(cls, error: BaseException) -> bool:
        return isinstance(error, (MemoryBudgetExceeded, MemoryError, torch.OutOfMemoryError))

    @classmethod
    def release_cached_memory(cls) -> None:
        pass

    @classmethod
    def compute_mode(cls, problem: "Problem"):
        return contextlib.nullcontext()

    def __init__(self, device, memory_limit: int | None = None):
        self.device = torch.device(device)
        self.memory_limit = memory_limit
        self.name = str(self.device)
        self.account: MemoryAccount | None = None
        self.cache: TileCache | None = None
        self.flops_per_second: float | None = None  # measured by the engine over past calls
        self.reset_counters()

    # -- configuration -------------------------------------------------------------------------------
    @property
    def profile(self) -> DeviceProfile:
        raise NotImplementedError

    def default_memory_limit(self) -> int:
        """Bytes the device can give the engine when the user sets no limit (shared by its workers)."""
        raise NotImplementedError

    def storage_size(self, storage_dtype: torch.dtype, accumulator_dtype: torch.dtype) -> int:
        """Bytes per element of an operand tile as this worker stores it."""
        return torch.empty((), dtype=storage_dtype).element_size()

    def configure(self, limit: int) -> None:
        """Set the byte budget (keeps the cache when the limit is unchanged)."""
        if self.account is None or self.account.limit != limit:
            if self.cache is not None:
                self.cache.clear()
            self.account = MemoryAccount(limit)
            self.cache = TileCache(self.account, before_evict=self.wait_unused)

    def reset_counters(self) -> None:
        self.bytes_to_device = 0
        self.bytes_to_host = 0
        self.blocks_done = 0
        self.tiles_loaded = 0
        self._hits_before = self.cache.hits if self.cache is not None else 0
        self._misses_before = self.cache.misses if self.cache is not None else 0

    @property
    def cache_hits(self) -> int:
        """Operand tiles found in the cache during the current (or last) call."""
        return self.cache.hits - self._hits_before

    @property
    def cache_misses(self) -> int:
        """Operand tiles loaded during the current (or last) call."""
        return self.cache.misses - self._misses_before

    # -- device operations (subclasses) -------------------------------------------------------------
    def allocate(self, shape, dtype) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype, device=self.device)

    def load_tile(self, view: torch.Tensor, key, nbytes: int, problem: Problem) -> Tile:
        raise NotImplementedError

    def multiply_accumulate(self, acc: torch.Tensor, a: Tile, b: Tile, accumulate: bool, problem: Problem):
        raise NotImplementedError

    def write_block(self, problem: Problem, block: Block, acc: torch.Tensor) -> None:
        raise NotImplementedError

    def wait_unused(self, tile: Tile) -> None:
        """Block until no queued work reads ``tile`` (before its memory is given back)."""

    def synchronize(self) -> None:
        """Block until everything queued on the device is done."""

    # -- the block algorithm ----------------------------------------------------------------------------
    def begin(self, problem: Problem) -> None:
        """Allocate this call's accumulator and output tile (charged to the account)."""
        plan = problem.plan
        self.reset_counters()
        self.account.reset_peak()
        for tensor, key in problem.sources:
            self.cache.track(tensor, key)
        area = plan.block_rows * plan.block_cols
        self._buffer_bytes = area * (plan.accumulator_size + plan.output_size)
        self.cache.make_room(self._buffer_bytes)  # tiles kept from earlier calls give way
        self.account.charge(self._buffer_bytes)
        try:
            self._acc_buffer = self.allocate(area, problem.accumulator_dtype)
            self._out_buffer = self.allocate(area, problem.out.dtype) if plan.output_size else None
        except BaseException:
            self.account.refund(self._buffer_bytes)
            self._buffer_bytes = 0
            raise

    def end(self, problem: Problem) -> None:
        """Wait for the device, free the call's buffers, drop call-scoped tiles. Safe after a failure."""
        try:
            self.synchronize()
        finally:
            self._acc_buffer = self._out_buffer = None
            if self.account is not None and getattr(self, "_buffer_bytes", 0):
                self.account.refund(self._buffer_bytes)
                self._buffer_bytes = 0
            if self.cache is not None:
                self.cache.drop_call_scoped()

    def reset(self) -> None:
        """Forget every cached tile (after a failed call)."""
        try:
            self.synchronize()
        finally:
            if self.cache is not None:
                self.cache.clear()

    def tile_key(self, prefix: tuple, rows: tuple, cols: tuple, transposed: bool = False) -> tuple:
        """Key of the op-tile ``[rows, cols]``, in its source's coordinates: the same region of a matrix
        has one key whether a call reads it as ``X`` or as ``X.T`` (forward and backward share tiles)."""
        return (*prefix, cols, rows) if transposed else (*prefix, rows, cols)

    def held_panels(self, problem: Problem, block: Block) -> int:
        """How many of the block's A/B tiles (first and last slab) this worker's cache holds."""
        slabs = problem.plan.slabs
        ends = {slabs[0], slabs[-1]}
        return sum(self.cache.holds(self.tile_key(problem.a_prefix, block.rows, s, problem.a_transposed)) +
                   self.cache.holds(self.tile_key(problem.b_prefix, s, block.cols, problem.b_transposed))
                   for s in ends)

    def _tile(self, problem: Problem, prefix: tuple, host: torch.Tensor, rows: tuple, cols: tuple,
              transposed: bool):
        key = self.tile_key(prefix, rows, cols, transposed)
        view = host[rows[0]:rows[1], cols[0]:cols[1]]
        nbytes = view.numel() * problem.plan.operand_size
        tile = self.cache.acquire(key, nbytes, lambda: self._load_counted(view, key, nbytes, problem, transposed))
        # a tile loaded by a call reading the source the other way round: use its transpose (a view)
        return tile if tile.extra.get("transposed", False) == transposed else TransposedTile(tile)

    def _load_counted(self, view, key, nbytes, problem, transposed) -> Tile:
        tile = self.load_tile(view, key, nbytes, problem)
        tile.extra["transposed"] = transposed
        self.tiles_loaded += 1
        self.bytes_to_device += view.numel() * torch.empty((), dtype=problem.storage_dtype).element_size()
        return tile

    def _fetch(self, problem: Problem, block: Block, slab: tuple) -> tuple[Tile, Tile]:
        a = self._tile(problem, problem.a_prefix, problem.a, block.rows, slab, problem.a_transposed)
        try:
            b = self._tile(problem, problem.b_prefix, problem.b, slab, block.cols, problem.b_transposed)
        except BaseException:
            self.cache.release(a)
            raise
        return a, b

    def accumulator(self, problem: Problem, block: Block) -> torch.Tensor:
        """Where the block's sum is accumulated: a view of the flat buffer (always contiguous)."""
        rows, cols = block.rows[1] - block.rows[0], block.cols[1] - block.cols[0]
        return self._acc_buffer[: rows * cols].view(rows, cols)

    def _release(self, tiles) -> None:
        for tile in tiles or ():  # (a helper, so no loop variable keeps a tile alive in run_block's frame)
            self.cache.release(tile)

    def run_block(self, problem: Problem, block: Block) -> None:
        """Compute ``out[block] = alpha * sum_slabs a_tile @ b_tile + beta * c[block]``."""
        acc = self.accumulator(problem, block)
        slabs = problem.plan.slabs
        current = self._fetch(problem, block, slabs[0])
        following = None
        try:
            for index in range(len(slabs)):
                if problem.cancelled is not None and problem.cancelled.is_set():
                    raise Cancelled()
                if index + 1 < len(slabs):  # queue the next transfer before this multiply
                    following = self._fetch(problem, block, slabs[index + 1])
                try:
                    self.multiply_accumulate(acc, current[0], current[1], index > 0, problem)
                finally:  # drop our references too: an evicted tile's memory must really be freed
                    self._release(current)
                    current = None
                current, following = following, None
        finally:
            self._release(current)
            self._release(following)
        self.write_block(problem, block, acc)
        self.blocks_done += 1

    def flush(self, problem: Problem) -> None:
        """Finish pending write-backs (called once the worker has no more blocks)."""

    def __repr__(self) -> str:
        limit = self.account.limit if self.account is not None else self.memory_limit
        return f"{type(self).__name__}(device={self.name!r}, memory_limit={limit})"


def epilogue(acc: torch.Tensor, c_tile: torch.Tensor | None, alpha: float, beta: float) -> None:
    """``acc = alpha * acc + beta * c_tile`` in place, in the accumulator's precision."""
    if alpha != 1.0:
        acc.mul_(alpha)
    if c_tile is not None:
        acc.add_(c_tile, alpha=beta)
