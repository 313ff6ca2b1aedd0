"""The engine: plans a GEMM, runs one thread per worker over a shared block queue, collects statistics.

Workers take blocks from a :class:`~accel.ooc.queue.BlockQueue`. A failing worker cancels the call: every thread is joined before the error is raised,
and a call that ran out of memory is re-planned with half the memory and retried once.
"""
from __future__ import annotations

import contextlib
import logging
import math
import queue
import threading
import time
import weakref

import torch

from accel.ooc._call import SUPPORTED_DTYPES, accumulator_dtype, check_block, gemm_call, resolve_dtypes
from accel.ooc.cache import CacheScope
from accel.ooc.plan import MIN_TILE, Plan, compute_kind, make_plan, minimum_memory, working_set_bytes
from accel.ooc.queue import BlockQueue
from accel.ooc.stats import EngineTotals, GemmStats
from accel.ooc.workers import default_devices, make_worker
from accel.ooc.workers.base import Cancelled, Problem, Worker

logger = logging.getLogger(__name__)


class Engine:
    r"""Out-of-core GEMM engine over a set of devices; reusable (threads, staging buffers, statistics).

    Args:
        devices (sequence, optional): device names (``"cuda:0"``, ``"cpu"``, :class:`torch.device`) or
            :class:`~accel.ooc.workers.base.Worker` objects, one worker each; a device may appear twice
            (two workers share it and its memory). Default: every visible GPU, else ``["cpu"]``.
        memory_limit (int, optional): bytes the engine may hold *per device* (split among the device's
            workers). Default: 90% of a GPU's free memory; a quarter of the available host memory for
            the CPU (each worker type's ``default_memory_limit``). A worker given with its own
            ``memory_limit`` keeps it. ``1e6`` is read as 1000000.
        persist_cache (bool): keep operand tiles between calls (default ``False``: tiles live for one
            call, or for a :meth:`cache_scope`). ``True`` is the caller's promise that **no operand passed
            to this engine is written between calls** unless :meth:`clear_cache` is called after the
            write. torch cannot see every write (fused optimizers, collectives, ``.data``, NumPy views do
            not bump ``tensor._version``), so only the caller can make this promise; a tensor changed
            through a version-bumping op or replaced by another is still detected.
        default_memory_fraction (float): with no ``memory_limit``, take this share of each device's
            default (``accel.nn.OutOfCoreLinear``'s shared engine takes 0.25).

    Public methods: :meth:`gemm` (one product, optionally in a :meth:`cache_scope`), :meth:`plan_for` and
    :meth:`block_for` (how a call would be cut; one tile grid for several calls), :attr:`memory_per_worker`,
    :meth:`clear_cache`, :meth:`reset_totals`, :meth:`close`; :attr:`stats` (the last call) and
    :attr:`totals` (all calls). Inputs made under :func:`torch.inference_mode` work as with ``torch.mm``;
    like NumPy arrays they carry no version counter, so their tiles never outlive a call.

    Copies (``pickle``, ``copy.deepcopy``, ``torch.save``) of an Engine are new Engines made from the same
    constructor arguments, with empty caches and no statistics; objects sharing one Engine share one
    copy (pickle's and deepcopy's memo). A copy of a Worker object given in ``devices`` is rebuilt as
    ``type(worker)(worker.device, worker.memory_limit)``.

    Example::

        >>> engine = accel.ooc.Engine(["cuda:0", "cuda:1"], memory_limit=8 << 30)
        >>> C = engine.gemm(A, B)            # same as accel.gemm(A, B, engine=engine)
        >>> engine.stats.traffic_ratio       # the last call; engine.totals sums all calls
    """

    def __init__(self, devices=None, memory_limit: int | None = None, *, persist_cache: bool = False,
                 default_memory_fraction: float = 1.0):
        given = devices
        devices = device_list(devices)
        memory_limit = check_memory_limit(memory_limit)
        if not (isinstance(default_memory_fraction, (int, float)) and 0 < default_memory_fraction <= 1):
            raise ValueError(f"default_memory_fraction must be in (0, 1], got {default_memory_fraction!r}")
        self._arguments = dict(devices=None if given is None else [_copy_spec(entry) for entry in devices],
                               memory_limit=memory_limit, persist_cache=bool(persist_cache),
                               default_memory_fraction=default_memory_fraction)
        self.workers: list[Worker] = [entry if isinstance(entry, Worker) else make_worker(entry) for entry in devices]
        if len({id(worker) for worker in self.workers}) != len(self.workers):
            raise ValueError("the same Worker object is listed twice; list the device twice instead")
        sharing: dict[str, int] = {}
        for worker in self.workers:
            sharing[worker.name] = sharing.get(worker.name, 0) + 1
        seen: dict[str, int] = {}
        for worker in self.workers:
            count = sharing[worker.name]
            if count > 1:  # distinct names for two workers on one device
                seen[worker.name] = seen.get(worker.name, 0) + 1
                worker.name = f"{worker.device}#{seen[worker.name] - 1}"
            limit = worker.memory_limit
            if limit is None:
                if memory_limit is None:
                    limit = int(worker.default_memory_limit() * default_memory_fraction) // count
                else:
                    limit = memory_limit // count
            worker.configure(int(limit))
        self.memory_limit = memory_limit
        self.persist_cache = persist_cache
        self.stats: GemmStats | None = None
        self.totals = EngineTotals()
        self._lock = threading.Lock()
        # one long-lived thread per worker: torch pays a per-thread setup cost on a new thread's first op
        self._threads: dict[int, _WorkerThread] = {}
        weakref.finalize(self, _stop_threads, self._threads)

    def __repr__(self) -> str:
        return f"Engine(workers={self.workers!r}, persist_cache={self.persist_cache})"

    def __reduce__(self):
        return _rebuild_engine, (self._arguments,)

    def cache_scope(self) -> CacheScope:
        """A new :class:`CacheScope`: pass it as ``cache_scope=`` to calls whose operands stay unchanged
        until you :meth:`CacheScope.close` it."""
        return CacheScope(self)

    @property
    def devices(self) -> list[str]:
        return [worker.name for worker in self.workers]

    def gemm(self, A, B, C=None, *, alpha=1.0, beta=0.0, trans_a: bool = False, trans_b: bool = False,
             block: int | None = None, compute_dtype=None, cache_scope: CacheScope | None = None, **misplaced):
        r"""``alpha * op(A) @ op(B) + beta * C`` on this engine: :func:`accel.gemm` with ``engine=self``.

        Args:
            A, B, C, alpha, beta, trans_a, trans_b, block, compute_dtype: as in :func:`accel.gemm`.
            cache_scope (CacheScope, optional): a scope of this engine from :meth:`cache_scope`. Passing it
                is the caller's promise that A and B are not written until the scope is closed; their tiles
                are then kept and reused by later calls in the same scope (e.g. a layer's forward and its
                backward, which read the weight as ``W^T`` and as ``W``: with the same ``block`` on every
                call, see :meth:`block_for`, they cut the same tiles).

        Returns:
            A new ``m x n`` matrix (see :func:`accel.gemm`); :attr:`stats` describes the call.

        Raises:
            ValueError, TypeError, RuntimeError: as :func:`accel.gemm`; ``ValueError`` also for a closed
                ``cache_scope`` or one of another engine.
        """
        if "devices" in misplaced or "memory_limit" in misplaced:
            raise ValueError("pass devices and memory_limit to the Engine, not to gemm(..., engine=...)")
        if misplaced:
            raise TypeError(f"Engine.gemm() got unexpected keyword arguments {sorted(misplaced)}")
        return gemm_call(self, A, B, C, alpha=alpha, beta=beta, trans_a=trans_a, trans_b=trans_b, block=block,
                         compute_dtype=compute_dtype, cache_scope=cache_scope)

    @property
    def memory_per_worker(self) -> dict[str, int]:
        """Bytes each worker may hold, by worker name (a device listed twice shares its budget)."""
        return {worker.name: worker.account.limit for worker in self.workers}

    def plan_for(self, m: int, n: int, k: int, *, dtype: torch.dtype = torch.float32, compute_dtype=None,
                 block: int | None = None) -> Plan:
        """The plan this engine would use for ``op(A) (m x k) @ op(B) (k x n)`` of ``dtype`` operands.

        Args:
            m, n, k (int): the product's shape.
            dtype (torch.dtype): the operands' (and the result's) dtype.
            compute_dtype: as in :func:`accel.gemm` (default ``dtype``).
            block (int, optional): force the block side, as in :func:`accel.gemm`.

        Raises:
            ValueError: a shape that is not a non-negative int, or a memory limit too small for the call.
            TypeError: an unsupported dtype.
        """
        for name, value in (("m", m), ("n", n), ("k", k)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        storage, allow_tf32, accumulator = _call_dtypes(dtype, compute_dtype)
        check_block(block)
        return self._plan(m, n, k, storage, accumulator, dtype, allow_tf32,
                          min(self.memory_per_worker.values()), block)

    def block_for(self, shapes, dtype: torch.dtype, *, memory_fraction: float = 0.5) -> int:
        """The side of one square tile grid shared by several GEMMs over the same operands.

        Passed as ``block=`` to each of the calls, it cuts every operand on the same grid in all of them, so
        within one :meth:`cache_scope` a tile loaded by one call is found by the next, whichever orientation
        each call reads it in. The side is the largest (and at least the plan's smallest tile) for which the
        working set of every call in ``shapes`` fits in ``memory_fraction`` of the smallest worker budget;
        the rest of the budget is left to the tiles the calls share.

        Args:
            shapes (iterable of (m, n, k)): the calls' shapes (``op(A)`` is ``m x k``, ``op(B)`` ``k x n``).
            dtype (torch.dtype): the operands' dtype.
            memory_fraction (float): share of the budget one call's working set may take, in (0, 1].

        Example::

            >>> # y = x W^T, then dx = g W and dW = g^T x, for x of shape (rows, n_in), W (n_out, n_in)
            >>> side = engine.block_for([(rows, n_out, n_in), (rows, n_in, n_out), (n_out, n_in, rows)],
            ...                         torch.float32)
        """
        shapes = [tuple(shape) for shape in shapes]
        if not shapes or any(len(shape) != 3 or any(isinstance(v, bool) or not isinstance(v, int) or v < 1
                                                   for v in shape) for shape in shapes):
            raise ValueError(f"shapes must be a non-empty list of (m, n, k) positive ints, got {shapes!r}")
        if not (isinstance(memory_fraction, (int, float)) and 0 < memory_fraction <= 1):
            raise ValueError(f"memory_fraction must be in (0, 1], got {memory_fraction!r}")
        storage, _, accumulator = _call_dtypes(dtype, None)
        sizes = dict(operand_size=max(worker.storage_size(storage, accumulator) for worker in self.workers),
                     accumulator_size=torch.empty((), dtype=accumulator).element_size(),
                     output_size=torch.empty((), dtype=dtype).element_size())
        budget = int(min(self.memory_per_worker.values()) * memory_fraction)

        def fits(side):
            return all(working_set_bytes(min(m, side), min(n, side), min(k, side), **sizes) <= budget
                       for m, n, k in shapes)

        low, high = MIN_TILE, max(MIN_TILE, *(max(shape) for shape in shapes))
        while low < high:
            middle = (low + high + 1) // 2
            low, high = (middle, high) if fits(middle) else (low, middle - 1)
        return low

    def reset_totals(self) -> None:
        """Start :attr:`totals` again from zero."""
        self.totals = EngineTotals()

    def clear_cache(self) -> None:
        """Drop every cached tile on every worker."""
        for worker in self.workers:
            worker.reset()

    # -- running a call -----------------------------------------------------------------------------------
    def plan(self, problem: Problem, memory_per_worker: int, block: int | None = None) -> Plan:
        """The plan for ``problem`` when each worker may hold ``memory_per_worker`` bytes."""
        m, k = problem.a.shape
        return self._plan(m, problem.b.shape[1], k, problem.storage_dtype, problem.accumulator_dtype,
                          problem.out.dtype, problem.allow_tf32, memory_per_worker, block)

    def _plan(self, m, n, k, storage_dtype, accumulator_dtype, out_dtype, allow_tf32, memory_per_worker,
              block) -> Plan:
        accumulator = torch.empty((), dtype=accumulator_dtype).element_size()
        operand = max(w.storage_size(storage_dtype, accumulator_dtype) for w in self.workers)
        output = torch.empty((), dtype=out_dtype).element_size() if any(w.needs_output_tile for w in self.workers) \
            else 0
        kind = compute_kind(storage_dtype, allow_tf32)
        storage = torch.empty((), dtype=storage_dtype).element_size()
        profiles = [worker.profile for worker in self.workers]
        return make_plan(m, n, k, memory_per_worker=memory_per_worker, operand_size=operand,
                         accumulator_size=accumulator, output_size=output, workers=len(self.workers),
                         target_block=max(profile.target_block(kind, storage) for profile in profiles),
                         block=block, blocks_per_worker=max(profile.blocks_per_worker for profile in profiles),
                         min_slabs=max(profile.min_slabs for profile in profiles),
                         min_slab=max(profile.min_slab for profile in profiles))

    def run(self, problem: Problem, block: int | None = None) -> GemmStats:
        """Compute ``problem.out``; on an out-of-memory failure re-plan with half the memory and retry once.

        Raises:
            ValueError: the memory limit is too small for this problem (before any work starts).
            RuntimeError: out of memory twice, naming the limits; or a worker's error, after all
                threads have stopped. ``problem.out`` is then incomplete and must be discarded.
        """
        with self._lock:
            budget = min(worker.account.limit for worker in self.workers)
            limits = {worker.name: worker.account.limit for worker in self.workers}
            try:
                plan = self.plan(problem, budget, block)  # before any work starts
            except ValueError as error:
                raise ValueError(f"{error} (bytes per worker: {limits}; a device's memory_limit is shared "
                                 f"by its workers)") from None
            start = time.perf_counter()
            retries = 0
            try:
                while True:
                    problem.plan = plan
                    try:
                        self._execute(problem)
                        break
                    except Exception as error:
                        if not self.is_out_of_memory(error):
                            raise
                        self.clear_cache()
                        for worker_type in self._worker_types():
                            worker_type.release_cached_memory()
                        smaller = plan.working_set_bytes // 2
                        if retries or smaller < minimum_memory(plan.m, plan.n, plan.k, operand_size=plan.operand_size,
                                                               accumulator_size=plan.accumulator_size,
                                                               output_size=plan.output_size):
                            raise RuntimeError(f"out of memory with memory_limit {limits} bytes per worker "
                                               f"(plan needing {plan.working_set_bytes} bytes, retries: {retries}); "
                                               f"pass a smaller memory_limit or free device memory") from error
                        retries += 1
                        logger.warning("out of memory on %s (%s); planning again with %d bytes per worker and "
                                       "retrying once", self.devices, error, smaller)
                        for worker in self.workers:  # this call's workers may hold only the smaller budget
                            worker.account.limit = min(worker.account.limit, smaller)
                        plan = self.plan(problem, smaller, None)
            finally:
                for worker in self.workers:
                    worker.account.limit = limits[worker.name]
            self.stats = self._collect(problem, plan, time.perf_counter() - start, retries)
            self.totals.add(self.stats)
            return self.stats

    def _execute(self, problem: Problem) -> None:
        problem.cancelled = threading.Event()
        k = problem.plan.k
        queue = BlockQueue(problem.plan.blocks, lambda worker, block: worker.held_panels(problem, block),
                           self.workers, lambda block: 2.0 * k * (block.rows[1] - block.rows[0]) *
                           (block.cols[1] - block.cols[0]))
        errors: list[BaseException] = []
        with contextlib.ExitStack() as modes:  # e.g. CUDA's TF32 switch, put back as found even on failure
            for worker_type in self._worker_types(distinct_hook="compute_mode"):
                modes.enter_context(worker_type.compute_mode(problem))
            finished = [self._thread(worker).submit(self._work, worker, queue, problem, errors)
                        for worker in self.workers]
            _wait_all(finished, problem.cancelled)  # every worker stops (done or cancelled) before we go on
        real = [error for error in errors if not isinstance(error, Cancelled)]
        if errors:  # after a failure: no tile of uncertain content, no engine thread, not even an idle one
            self.clear_cache()
            self.close()
        if real:
            raise real[0]

    def _worker_types(self, distinct_hook: str | None = None) -> list:
        """The classes of this engine's workers; with ``distinct_hook``, one per distinct implementation
        of that class-level hook (a subclass inheriting it is not asked twice)."""
        types, seen = [], set()
        for worker in self.workers:
            cls = type(worker)
            marker = getattr(cls, distinct_hook).__func__ if distinct_hook else cls
            if marker not in seen:
                seen.add(marker)
                types.append(cls)
        return types

    def is_out_of_memory(self, error: BaseException) -> bool:
        """Whether one of this engine's worker types reads ``error`` as running out of device memory."""
        return any(cls.is_out_of_memory(error) for cls in self._worker_types())

    def _thread(self, worker: Worker) -> "_WorkerThread":
        thread = self._threads.get(id(worker))
        if thread is None:
            thread = self._threads[id(worker)] = _WorkerThread(f"accel-ooc-{worker.name}")
        return thread

    def close(self) -> None:
        """Stop the engine's worker threads (they restart on the next call). Caches are kept."""
        _stop_threads(self._threads)

    @staticmethod
    def _work(worker: Worker, queue: BlockQueue, problem: Problem, errors: list) -> None:
        start = time.perf_counter()
        flops = 0.0
        try:
            worker.begin(problem)
            try:
                while not problem.cancelled.is_set():
                    block = queue.take(worker)
                    if block is None:
                        break
                    worker.run_block(problem, block)
                    flops += 2.0 * problem.plan.k * (block.rows[1] - block.rows[0]) * (block.cols[1] - block.cols[0])
                worker.flush(problem)
            finally:
                worker.end(problem)  # waits for the device: the time below is real work, not queueing
            if flops:  # measured speed, for the end-game rule of later calls (smoothed over calls)
                rate = flops / (time.perf_counter() - start)
                worker.flops_per_second = rate if worker.flops_per_second is None else \
                    0.5 * (worker.flops_per_second + rate)
        except BaseException as error:  # noqa: BLE001 - reported by the main thread
            errors.append(error)
            problem.cancelled.set()

    def _collect(self, problem: Problem, plan: Plan, seconds: float, retries: int) -> GemmStats:
        stats = GemmStats(plan=plan, seconds=seconds, retries=retries)
        for worker in self.workers:
            stats.bytes_to_device += worker.bytes_to_device
            stats.bytes_to_host += worker.bytes_to_host
            stats.blocks_per_worker[worker.name] = worker.blocks_done
            stats.tiles_loaded_per_worker[worker.name] = worker.tiles_loaded
            stats.peak_bytes_per_worker[worker.name] = worker.account.peak
            stats.memory_limit_per_worker[worker.name] = worker.account.limit
            stats.cache_hits += worker.cache_hits
            stats.cache_misses += worker.cache_misses
        stats.set_bounds(storage_size=torch.empty((), dtype=problem.storage_dtype).element_size(),
                         output_size=problem.out.element_size(),
                         c_size=problem.c.element_size() if problem.c is not None else 0)
        return stats


class _WorkerThread:
    """A daemon thread running submitted jobs one after another until stopped."""

    def __init__(self, name: str):
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while (job := self._jobs.get()) is not None:
            function, arguments, done = job
            try:
                function(*arguments)
            finally:
                done.set()

    def submit(self, function, *arguments) -> threading.Event:
        done = threading.Event()
        self._jobs.put((function, arguments, done))
        return done

    def stop(self) -> None:
        self._jobs.put(None)
        self.thread.join()


def _stop_threads(threads: dict) -> None:
    for thread in threads.values():
        thread.stop()
    threads.clear()


def _wait_all(events, cancelled: threading.Event) -> None:
    """Wait for every event; on Ctrl-C cancel the call, still wait, then re-raise."""
    try:
        for event in events:
            event.wait()
    except BaseException:
        cancelled.set()
        for event in events:
            event.wait()
        raise


def _call_dtypes(dtype, compute_dtype):
    """(storage dtype, TF32 allowed, accumulator dtype) of a call on ``dtype`` operands."""
    if dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"dtype {dtype!r} is not supported: float32, float64, float16, bfloat16")
    probe = torch.empty((0, 0), dtype=dtype)
    storage, allow_tf32, out_dtype = resolve_dtypes(probe, probe, None, compute_dtype)
    return storage, allow_tf32, accumulator_dtype(storage, out_dtype)


def device_list(devices) -> list:
    """``devices`` as a non-empty list of device names, torch.devices or Workers (clear errors otherwise)."""
    if devices is None:
        return default_devices()
    if isinstance(devices, (str, torch.device, Worker)):
        return [devices]
    if isinstance(devices, int) and not isinstance(devices, bool):
        raise TypeError(f"devices={devices!r}: pass device names, e.g. devices=['cuda:0', 'cuda:1'] "
                        f"(or a single 'cuda:{devices}'), not a count")
    try:
        devices = list(devices)
    except TypeError:
        raise TypeError(f"devices must be a device name, a torch.device, a Worker or a sequence of them, "
                        f"got {devices!r}") from None
    if not devices:
        raise ValueError("devices must name at least one device")
    return devices


def check_memory_limit(memory_limit):
    """``memory_limit`` as an int number of bytes (``1e6`` is accepted as 1000000), or ``None``."""
    if memory_limit is None:
        return None
    if isinstance(memory_limit, bool) or not isinstance(memory_limit, (int, float)) or \
            (isinstance(memory_limit, float) and not (math.isfinite(memory_limit) and memory_limit.is_integer())) \
            or memory_limit <= 0:
        raise ValueError(f"memory_limit must be a positive whole number of bytes, got {memory_limit!r}")
    return int(memory_limit)


def _copy_spec(entry):
    """What a copied Engine rebuilds a worker from: the device name, or the Worker's class and arguments."""
    if isinstance(entry, Worker):
        return (type(entry), str(entry.device), entry.memory_limit)
    return str(entry)


def _rebuild_engine(arguments: dict) -> "Engine":
    devices = arguments["devices"]
    if devices is not None:
        devices = [entry[0](entry[1], entry[2]) if isinstance(entry, tuple) else entry for entry in devices]
    return Engine(devices, arguments["memory_limit"], persist_cache=arguments["persist_cache"],
                  default_memory_fraction=arguments["default_memory_fraction"])
