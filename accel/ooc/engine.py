"""The engine: plans a GEMM, runs one thread per worker over a shared block queue, collects statistics.

A faster worker simply comes back to the queue more often and takes more blocks. When a worker asks for
a block, it gets one that shares a panel with its previous block if its cache still holds that panel
(BLASX's affinity rule), else one on a block row no other worker is on (so workers do not fetch the same
A panel twice). A failing worker cancels the call: every thread is joined before the error is raised,
and a call that ran out of memory is re-planned with half the memory and retried once.
"""
from __future__ import annotations

import contextlib
import math
import queue
import threading
import time
import weakref
from collections import OrderedDict

import torch

from accel.ooc.cache import MemoryBudgetExceeded
from accel.ooc.devices import Cancelled, Problem, Worker, make_worker
from accel.ooc.plan import Block, Plan, compute_kind, make_plan, minimum_memory
from accel.ooc.stats import EngineTotals, GemmStats

_OUT_OF_MEMORY_TYPES = (torch.OutOfMemoryError, MemoryError, MemoryBudgetExceeded)
_OUT_OF_MEMORY_TEXT = ("out of memory", "CUBLAS_STATUS_ALLOC_FAILED", "cudaErrorMemoryAllocation")


def is_out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` means a device ran out of memory (torch's, cuBLAS's or CuPy's way of saying it)."""
    return isinstance(error, _OUT_OF_MEMORY_TYPES) or any(text in str(error) for text in _OUT_OF_MEMORY_TEXT)
_tf32_lock = threading.Lock()  # torch's TF32 switch is process-wide: one call at a time may set it


class BlockQueue:
    """Blocks not yet taken, handed out to workers with panel affinity. Thread-safe.

    End game: a worker gets no more blocks once the other workers, at their measured speeds, would
    finish everything left before it finished one block (so a CPU worker beside GPUs does not hold the
    call up with a last GPU-sized block). The fastest worker never declines; speeds come from earlier
    calls (``worker.flops_per_second``), so a first call shares blocks by arrival alone.

    Args:
        blocks (list[Block]): the plan's blocks.
        held (callable): ``held(worker, block) -> int``, how many of the block's tiles ``worker`` holds.
        workers (list, optional): every worker taking from the queue (each with ``flops_per_second``,
            ``None`` while unknown); needed for the end-game rule.
        block_flops (callable, optional): ``block_flops(block) -> float``.
    """

    def __init__(self, blocks: list[Block], held, workers=(), block_flops=None):
        self._pending: OrderedDict[int, Block] = OrderedDict((block.index, block) for block in blocks)
        self._by_row: dict[int, dict[int, Block]] = {}
        self._by_col: dict[int, dict[int, Block]] = {}
        for block in blocks:
            self._by_row.setdefault(block.panel_row, {})[block.index] = block
            self._by_col.setdefault(block.panel_col, {})[block.index] = block
        self._held = held
        # speeds as of the call's start: they must not change under the rule while workers still decide
        self._rates = {id(worker): getattr(worker, "flops_per_second", None) for worker in workers}
        self._block_flops = block_flops
        self._remaining_flops = sum(block_flops(block) for block in blocks) if block_flops else 0.0
        self._previous: dict[int, Block] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._pending)

    def take(self, worker) -> Block | None:
        """The next block for ``worker``, or ``None`` when all are taken."""
        with self._lock:
            if not self._pending or self._others_finish_first(worker):
                return None
            block = self._affine(worker) or self._unclaimed_row(worker) or next(iter(self._pending.values()))
            if self._block_flops:
                self._remaining_flops -= self._block_flops(block)
            del self._pending[block.index]
            del self._by_row[block.panel_row][block.index]
            del self._by_col[block.panel_col][block.index]
            self._previous[id(worker)] = block
            return block

    def _others_finish_first(self, worker) -> bool:
        rate = self._rates.get(id(worker))
        others = [other for owner, other in self._rates.items() if owner != id(worker)]
        if not rate or not self._block_flops or not others or any(not other for other in others):
            return False
        if rate >= max(others):  # the fastest always takes: somebody must
            return False
        one_block = self._remaining_flops / len(self._pending) / rate
        return self._remaining_flops / sum(others) < one_block

    def _affine(self, worker) -> Block | None:
        previous = self._previous.get(id(worker))
        if previous is None:
            return None
        candidates = [*self._by_row[previous.panel_row].values(), *self._by_col[previous.panel_col].values()]
        scored = [(self._held(worker, block), -index, block) for index, block in enumerate(candidates)]
        best = max(scored, default=None, key=lambda item: item[:2])
        return best[2] if best is not None and best[0] > 0 else None

    def _unclaimed_row(self, worker) -> Block | None:
        busy = {block.panel_row for owner, block in self._previous.items() if owner != id(worker)}
        for row, blocks in self._by_row.items():
            if blocks and row not in busy:
                return next(iter(blocks.values()))
        return None


class Engine:
    r"""Out-of-core GEMM engine over a set of devices; reusable, and its tile caches persist across calls.

    Args:
        devices (sequence, optional): device names (``"cuda:0"``, ``"cpu"``, :class:`torch.device`) or
            :class:`~accel.ooc.devices.Worker` objects, one worker each; a device may appear twice
            (two workers share it and its memory). Default: every visible GPU, else ``["cpu"]``.
        memory_limit (int, optional): bytes the engine may hold *per device* (split among the device's
            workers). Default: 90% of a GPU's free memory; a quarter of the available host memory for
            the CPU. A worker given with its own ``memory_limit`` keeps it.
        persist_cache (bool): keep operand tiles between calls (default ``True``). Tiles of a tensor
            changed in place are invalidated (see :mod:`accel.ooc.cache`).

    Example::

        >>> engine = accel.ooc.Engine(["cuda:0", "cuda:1"], memory_limit=8 << 30)
        >>> C = engine.gemm(A, B)            # same as accel.gemm(A, B, engine=engine)
        >>> engine.stats.traffic_ratio       # the last call; engine.totals sums all calls
    """

    def __init__(self, devices=None, memory_limit: int | None = None, *, persist_cache: bool = True):
        if devices is None:
            devices = [f"cuda:{i}" for i in range(torch.cuda.device_count())] or ["cpu"]
        if isinstance(devices, (str, torch.device, Worker)):
            devices = [devices]
        devices = list(devices)
        if not devices:
            raise ValueError("devices must name at least one device")
        if memory_limit is not None and (not isinstance(memory_limit, int) or memory_limit <= 0):
            raise ValueError(f"memory_limit must be a positive number of bytes, got {memory_limit!r}")
        self.workers: list[Worker] = [entry if isinstance(entry, Worker) else make_worker(check_device(entry))
                                      for entry in devices]
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
                limit = (memory_limit if memory_limit is not None else worker.default_memory_limit()) // count
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

    @property
    def devices(self) -> list[str]:
        return [worker.name for worker in self.workers]

    def gemm(self, A, B, C=None, **kwargs):
        """``accel.gemm(A, B, C, engine=self, **kwargs)``."""
        from accel.ooc.gemm import gemm

        return gemm(A, B, C, engine=self, **kwargs)

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
        n = problem.b.shape[1]
        accumulator = torch.empty((), dtype=problem.accumulator_dtype).element_size()
        operand = max(w.storage_size(problem.storage_dtype, problem.accumulator_dtype) for w in self.workers)
        kind = compute_kind(problem.storage_dtype, problem.allow_tf32)
        storage = torch.empty((), dtype=problem.storage_dtype).element_size()
        target = max(worker.profile.target_block(kind, storage) for worker in self.workers)
        return make_plan(m, n, k, memory_per_worker=memory_per_worker, operand_size=operand,
                         accumulator_size=accumulator, output_size=problem.out.element_size(),
                         workers=len(self.workers), target_block=target, block=block,
                         blocks_per_worker=max(worker.profile.blocks_per_worker for worker in self.workers))

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
                        if not is_out_of_memory(error):
                            raise
                        self.clear_cache()
                        if torch.cuda.is_available():
                            torch.cuda.empty_cache()
                        smaller = plan.working_set_bytes // 2
                        if retries or smaller < minimum_memory(plan.m, plan.n, plan.k, operand_size=plan.operand_size,
                                                               accumulator_size=plan.accumulator_size,
                                                               output_size=plan.output_size):
                            raise RuntimeError(f"out of memory with memory_limit {limits} bytes per worker "
                                               f"(plan needing {plan.working_set_bytes} bytes, retries: {retries}); "
                                               f"pass a smaller memory_limit or free device memory") from error
                        retries += 1
                        for worker in self.workers:  # this call's workers may hold only the smaller budget
                            worker.account.limit = min(worker.account.limit, smaller)
                        plan = self.plan(problem, smaller, None)
            finally:
                for worker in self.workers:
                    worker.account.limit = limits[worker.name]
                if not self.persist_cache:
                    self.clear_cache()
            self.stats = self._collect(plan, time.perf_counter() - start, retries)
            self.totals.add(self.stats)
            return self.stats

    def _execute(self, problem: Problem) -> None:
        problem.cancelled = threading.Event()
        k = problem.plan.k
        queue = BlockQueue(problem.plan.blocks, lambda worker, block: worker.held_panels(problem, block),
                           self.workers, lambda block: 2.0 * k * (block.rows[1] - block.rows[0]) *
                           (block.cols[1] - block.cols[0]))
        errors: list[BaseException] = []
        set_tf32 = any(worker.kind == "cuda" for worker in self.workers)
        with _tf32_lock if set_tf32 else contextlib.nullcontext():
            previous = torch.backends.cuda.matmul.allow_tf32
            if set_tf32:
                torch.backends.cuda.matmul.allow_tf32 = problem.allow_tf32
            try:
                finished = [self._thread(worker).submit(self._work, worker, queue, problem, errors)
                            for worker in self.workers]
                _wait_all(finished, problem.cancelled)  # every worker stops (done or cancelled) before we go on
            finally:
                if set_tf32:
                    torch.backends.cuda.matmul.allow_tf32 = previous
        real = [error for error in errors if not isinstance(error, Cancelled)]
        if errors:  # after a failure: no tile of uncertain content, no engine thread, not even an idle one
            self.clear_cache()
            self.close()
        if real:
            raise real[0]

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

    def _collect(self, plan: Plan, seconds: float, retries: int) -> GemmStats:
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
        memory_elements = max(stats.peak_bytes_per_worker.values()) / plan.operand_size
        stats.lower_bound_bytes = 2 * plan.m * plan.n * plan.k / math.sqrt(max(memory_elements, 1)) * plan.operand_size
        stats.traffic_ratio = (stats.bytes_to_device + stats.bytes_to_host) / max(stats.lower_bound_bytes, 1)
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


def check_device(device) -> torch.device:
    """``device`` as a :class:`torch.device`, or ValueError when it does not exist here."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"unknown device {device!r}") from error
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise ValueError(f"unsupported device {str(device)!r}: expected 'cpu' or 'cuda:N'")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    index = device.index if device.index is not None else (torch.cuda.current_device() if count else 0)
    if index >= count:
        raise ValueError(f"device {str(device)!r} does not exist: {count} CUDA device(s) visible")
    return torch.device("cuda", index)
