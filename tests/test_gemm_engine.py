"""The engine's parts: plan, cache, memory limit, scheduling, errors and failure handling (CPU workers)."""
import gc
import re
import threading
import time
import weakref

import gemm_helpers
import numpy as np
import pytest
import torch

import accel
from accel.ooc import BlockQueue, CPUWorker, Engine, MemoryAccount, MemoryBudgetExceeded, TileCache
from accel.ooc.cache import Tile, source_key
from accel.ooc.plan import Block, make_plan, minimum_memory

seeded_global_rng = gemm_helpers.seeded_global_rng  # autouse fixture: torch's global generator seeded per test

SIZES = dict(operand_size=4, accumulator_size=4, output_size=4)


def engine_threads():
    return [t for t in threading.enumerate() if t.name.startswith("accel-ooc-") and t.is_alive()]


# -- plan --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("m,n,k,memory", [(1000, 700, 900, 2_000_000), (97, 1, 61, 9_000), (5, 3, 2, 10**9),
                                          (1025, 1027, 17, 3_000_000)])
def test_plan_partitions_c_and_k_exactly_with_balanced_edges(m, n, k, memory):
    plan = make_plan(m, n, k, memory_per_worker=memory, workers=2, **SIZES)
    covered = np.zeros((m, n), dtype=np.int64)
    for block in plan.blocks:
        covered[block.rows[0]:block.rows[1], block.cols[0]:block.cols[1]] += 1
    assert (covered == 1).all()  # every element in exactly one block: no padding, no overlap
    for bounds, size in [(plan.row_bounds, m), (plan.col_bounds, n), (plan.slab_bounds, k)]:
        widths = np.diff(bounds)
        assert bounds[0] == 0 and bounds[-1] == size and widths.max() - widths.min() <= 1  # no sliver edge
    assert plan.working_set_bytes <= memory


def test_plan_blocks_grow_with_memory_and_respect_target_block():
    small = make_plan(4000, 4000, 4000, memory_per_worker=8 << 20, **SIZES)
    large = make_plan(4000, 4000, 4000, memory_per_worker=256 << 20, **SIZES)
    assert large.block_rows > small.block_rows
    # unlimited memory: still blocks_per_worker blocks for every worker, min_slabs slabs in each block
    # (never one block of one slab: copies, multiplies and write-back must overlap on a GPU)
    for target in (256, 4000):
        plan = make_plan(4000, 4000, 4000, memory_per_worker=1 << 34, workers=4, target_block=target,
                         blocks_per_worker=2, min_slabs=4, **SIZES)
        assert len(plan.blocks) >= 8 and plan.grid[2] >= 4
    plan = make_plan(32768, 32768, 32768, memory_per_worker=1 << 40, workers=1, blocks_per_worker=2, min_slabs=4,
                     operand_size=2, accumulator_size=4, output_size=2)
    assert len(plan.blocks) >= 2 and plan.grid[2] >= 4


def test_plan_minimum_memory_is_exact():
    minimum = minimum_memory(100, 100, 100, **SIZES)
    plan = make_plan(100, 100, 100, memory_per_worker=minimum, **SIZES)
    assert plan.working_set_bytes <= minimum and min(plan.grid) >= 6  # about 16-element tiles
    with pytest.raises(ValueError, match=f"needs {minimum} bytes"):
        make_plan(100, 100, 100, memory_per_worker=minimum - 1, **SIZES)


def test_plan_forced_block_thins_slabs_or_refuses():
    plan = make_plan(512, 512, 512, memory_per_worker=256 * 256 * 8 + 2 * 512 * 64 * 4, block=256, **SIZES)
    assert plan.block_rows == 256 and plan.slab < 256
    with pytest.raises(ValueError, match="block=512 needs at least"):
        make_plan(512, 512, 512, memory_per_worker=300_000, block=512, **SIZES)


# -- cache ---------------------------------------------------------------------------------------------------
def _loader(key, nbytes):
    return lambda: Tile(key, torch.empty(nbytes // 4), nbytes)


def test_cache_lru_eviction_respects_references_and_budget():
    account = MemoryAccount(300)
    cache = TileCache(account)
    a = cache.acquire("a", 100, _loader("a", 100))
    cache.acquire("b", 100, _loader("b", 100))
    cache.release(cache.acquire("c", 100, _loader("c", 100)))
    cache.release(cache.acquire("b", 100, _loader("b", 100)))  # b becomes most recently used
    for tile in list(cache._tiles.values()):
        tile.references = 1 if tile.key == "a" else 0
    cache.acquire("d", 100, _loader("d", 100))  # evicts c (least recent unreferenced), not the held a
    assert cache.holds("a") and cache.holds("b") and cache.holds("d") and not cache.holds("c")
    assert account.held == 300 and account.peak <= 300
    cache.release(a)
    for tile in cache._tiles.values():
        tile.references = 1
    with pytest.raises(MemoryBudgetExceeded):
        cache.acquire("e", 100, _loader("e", 100))
    assert account.held == 300


def test_cache_drops_tiles_of_changed_and_collected_tensors():
    cache = TileCache(MemoryAccount(10_000))
    tensor = torch.randn(4, 4)
    key = source_key(tensor, ("persistent",))
    cache.track(tensor, key)
    cache.release(cache.acquire((key, 0), 64, _loader("t", 64)))
    tensor.mul_(2)  # in place: a new version
    new_key = source_key(tensor, ("persistent",))
    assert new_key != key
    cache.track(tensor, new_key)
    assert len(cache) == 0
    cache.release(cache.acquire((new_key, 0), 64, _loader("t", 64)))
    del tensor
    gc.collect()
    assert len(cache) == 0 and cache.account.held == 0


def test_second_call_moves_fewer_bytes_and_in_place_change_invalidates(seed):
    generator = torch.Generator().manual_seed(seed)
    A = torch.randn(120, 90, generator=generator)
    B = torch.randn(90, 110, generator=generator)
    engine = Engine(["cpu"], memory_limit=400_000, persist_cache=True)  # room for every tile: the second call hits only
    first = engine.gemm(A, B, block=40)
    moved_first = engine.stats.bytes_to_device
    second = engine.gemm(A, B, block=40)
    assert engine.stats.bytes_to_device < moved_first and engine.stats.cache_misses == 0
    torch.testing.assert_close(first, second)
    A[3, 5] += 1.0  # in place: the cached tiles of A are stale
    third = engine.gemm(A, B, block=40)
    torch.testing.assert_close(third, A @ B, rtol=1e-5, atol=1e-5)
    rows, _, slabs = engine.stats.plan.grid
    assert engine.stats.tiles_loaded_per_worker["cpu"] == rows * slabs  # A reloaded once, B all hits
    assert engine.stats.bytes_to_device == A.numel() * 4


def test_numpy_tiles_do_not_persist(seed):
    rng = np.random.default_rng(seed)
    A, B = rng.standard_normal((50, 40)), rng.standard_normal((40, 30))
    engine = Engine(["cpu"], memory_limit=200_000)
    engine.gemm(A, B)
    moved = engine.stats.bytes_to_device
    A[0, 0] = 7.0  # NumPy has no version counter: nothing may be reused
    np.testing.assert_allclose(engine.gemm(A, B), A @ B, rtol=1e-12, atol=1e-12)  # atol: entries near 0
    assert engine.stats.bytes_to_device == moved


# -- memory limit --------------------------------------------------------------------------------------------
class MeasuringWorker(CPUWorker):
    """Counts the bytes of every tensor it creates that are still alive (independent of its account)."""

    def __init__(self):
        super().__init__("cpu")
        self.live = 0
        self.peak_live = 0
        self._lock = threading.Lock()

    def _track(self, tensor):
        nbytes = tensor.numel() * tensor.element_size()
        with self._lock:
            self.live += nbytes
            self.peak_live = max(self.peak_live, self.live)
        weakref.finalize(tensor, self._free, nbytes)
        return tensor

    def _free(self, nbytes):
        with self._lock:
            self.live -= nbytes

    def allocate(self, shape, dtype):
        return self._track(super().allocate(shape, dtype))

    def load_tile(self, view, key, nbytes, problem):
        tile = super().load_tile(view, key, nbytes, problem)
        self._track(tile.tensor)
        return tile


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("limit", [14_000, 40_000, 160_000])
def test_memory_limit_is_never_exceeded(limit, dtype, seed):
    generator = torch.Generator().manual_seed(seed)
    A, B = torch.randn(70, 130, generator=generator).to(dtype), torch.randn(130, 50, generator=generator).to(dtype)
    C = torch.randn(70, 50, generator=generator).to(dtype)
    workers = [MeasuringWorker(), MeasuringWorker()]
    engine = Engine(workers, memory_limit=limit)
    for _ in range(2):
        engine.gemm(A, B, C, beta=0.5)
        for worker in workers:
            assert 0 < worker.peak_live <= limit // 2
            assert worker.account.peak <= limit // 2
        assert max(engine.stats.peak_bytes_per_worker.values()) <= limit // 2


# -- scheduling -----------------------------------------------------------------------------------------------
def test_two_cpu_workers_share_blocks(seed):
    A, B = torch.randn(200, 64), torch.randn(64, 200)
    engine = Engine(["cpu", "cpu"], memory_limit=2 * 60_000)
    torch.testing.assert_close(engine.gemm(A, B), A @ B, rtol=1e-5, atol=1e-5)
    blocks = engine.stats.blocks_per_worker
    assert set(blocks) == {"cpu#0", "cpu#1"} and sum(blocks.values()) == len(engine.stats.plan.blocks)


class SlowWorker(CPUWorker):
    """Test hook: holds its first block until the other worker has drained the queue."""

    def __init__(self, other):
        super().__init__("cpu")
        self.other = other

    def run_block(self, problem, block):
        total = len(problem.plan.blocks)
        while self.other.blocks_done < total - 1 and not problem.cancelled.is_set():
            time.sleep(0.001)
        super().run_block(problem, block)


def test_faster_worker_takes_more_blocks(seed):
    fast = CPUWorker("cpu")
    slow = SlowWorker(fast)
    engine = Engine([slow, fast], memory_limit=50_000)
    A, B = torch.randn(100, 40), torch.randn(40, 100)
    torch.testing.assert_close(engine.gemm(A, B), A @ B, rtol=1e-5, atol=1e-5)
    total = len(engine.stats.plan.blocks)
    assert total >= 4
    assert slow.blocks_done <= 1 and fast.blocks_done >= total - 1
    assert engine.stats.blocks_per_worker == {"cpu#0": slow.blocks_done, "cpu#1": fast.blocks_done}


def test_block_queue_prefers_blocks_whose_panels_the_worker_holds():
    blocks = [Block(i * 3 + j, i, j, (i, i + 1), (j, j + 1)) for i in range(3) for j in range(3)]
    holding = {"w1": {(1, "row")}, "w2": set()}

    def held(worker, block):
        return int((block.panel_row, "row") in holding[worker.name]) + int((block.panel_col, "col") in holding[worker.name])

    class W:
        def __init__(self, name):
            self.name = name

    w1, w2 = W("w1"), W("w2")
    queue = BlockQueue(blocks, held)
    first_w1 = queue.take(w1)
    first_w2 = queue.take(w2)
    assert first_w1.panel_row != first_w2.panel_row  # workers start on different block rows
    holding["w1"] = {(first_w1.panel_row, "row")}
    assert queue.take(w1).panel_row == first_w1.panel_row  # affinity: same A panel next
    taken = 3 + sum(1 for _ in iter(lambda: queue.take(w2), None))
    assert taken == 9 and queue.take(w1) is None


def test_block_queue_end_game_leaves_the_rest_to_faster_workers():
    class W:
        def __init__(self, name, rate):
            self.name, self.flops_per_second = name, rate

    blocks = [Block(i, i, 0, (i, i + 1), (0, 1)) for i in range(10)]
    gpu, cpu = W("gpu", 100.0), W("cpu", 1.0)
    queue = BlockQueue(blocks, lambda worker, block: 0, [gpu, cpu], lambda block: 1.0)
    assert queue.take(cpu) is None  # the GPU does all 10 blocks in 0.1 s; one block takes the CPU 1 s
    assert sum(1 for _ in iter(lambda: queue.take(gpu), None)) == 10  # the fastest never declines
    pair = [W("a", 1.0), W("b", 1.0)]
    even = BlockQueue(blocks, lambda worker, block: 0, pair, lambda block: 1.0)
    assert all(even.take(worker) is not None for worker in pair * 5)  # equals share to the end
    slow, fast = W("slow", 1.0), W("fast", 2.0)
    racing = BlockQueue(blocks[:3], lambda worker, block: 0, [slow, fast], lambda block: 1.0)
    slow.flops_per_second = 100.0  # measured mid-call: the rule keeps the speeds of the call's start
    assert racing.take(fast) is not None and racing.take(fast) is not None and racing.take(fast) is not None
    unknown = BlockQueue(blocks, lambda worker, block: 0, [gpu, W("new", None)], lambda block: 1.0)
    assert unknown.take(cpu) is not None  # unmeasured speeds: nobody declines


def test_engine_measures_worker_speed(seed):
    engine = Engine(["cpu", "cpu"], memory_limit=2 * 60_000)
    assert all(worker.flops_per_second is None for worker in engine.workers)
    engine.gemm(torch.randn(120, 64), torch.randn(64, 120))
    assert all(worker.flops_per_second > 0 for worker in engine.workers if worker.blocks_done)


# -- errors ---------------------------------------------------------------------------------------------------
class CountingWorker(CPUWorker):
    def __init__(self):
        super().__init__("cpu")
        self.begun = 0

    def begin(self, problem):
        self.begun += 1
        super().begin(problem)


@pytest.mark.parametrize("call,error,pattern", [
    (lambda e: e.gemm(torch.randn(3, 4), torch.randn(5, 6)), ValueError, r"A \(3, 4\).*B \(5, 6\)"),
    (lambda e: e.gemm(torch.randn(3, 4), torch.randn(3, 6), trans_a=False), ValueError, r"\(3, 4\).*\(3, 6\)"),
    (lambda e: e.gemm(torch.randn(3, 4), torch.randn(4, 6), torch.randn(2, 6), beta=1), ValueError, r"C of shape \(2, 6\)"),
    (lambda e: e.gemm(torch.ones(3, 4, dtype=torch.int32), torch.ones(4, 2, dtype=torch.int32)), TypeError, "int32"),
    (lambda e: e.gemm(torch.randn(3, 4), torch.randn(4, 2, dtype=torch.float64)), TypeError, "mixed dtypes"),
    (lambda e: e.gemm(torch.randn(3, 4), torch.randn(4, 2), alpha=float("nan")), ValueError, "alpha must be finite"),
    (lambda e: e.gemm(torch.randn(3, 4), torch.randn(4, 2), beta=float("inf")), ValueError, "beta must be finite"),
    (lambda e: e.gemm(torch.randn(3, 4), torch.randn(4, 2), compute_dtype=torch.int8), ValueError, "compute_dtype"),
    (lambda e: e.gemm(torch.randn(3, 4, 2), torch.randn(4, 2)), TypeError, "matrix"),
    (lambda e: e.gemm([[1.0]], torch.randn(1, 2)), TypeError, "list"),
    (lambda e: e.gemm(torch.randn(300, 400), torch.randn(400, 200), block=250), ValueError, "block=250 needs"),
    (lambda e: e.gemm(torch.randn(3, 4), torch.randn(4, 2), devices=["cpu"]), ValueError, "to the Engine"),
])
def test_errors_are_raised_before_any_work(call, error, pattern):
    worker = CountingWorker()
    engine = Engine([worker], memory_limit=100_000)
    with pytest.raises(error, match=pattern):
        call(engine)
    assert worker.begun == 0


def test_memory_limit_too_small_names_the_minimum():
    minimum = minimum_memory(200, 200, 200, operand_size=4, accumulator_size=4, output_size=0)  # CPU: no output tile
    with pytest.raises(ValueError, match=f"needs {minimum} bytes"):
        accel.gemm(torch.randn(200, 200), torch.randn(200, 200), devices=["cpu"], memory_limit=minimum - 1)


@pytest.mark.parametrize("device,pattern", [("cuda:7", "does not exist"), ("tpu", "unknown device"),
                                            ("meta", "unsupported device")])
def test_device_that_does_not_exist(device, pattern):
    if device.startswith("cuda") and torch.cuda.device_count() > 7:
        pytest.skip("this machine has 8 GPUs")
    with pytest.raises(ValueError, match=pattern):
        accel.gemm(torch.randn(3, 4), torch.randn(4, 2), devices=[device])
    with pytest.raises(ValueError, match=pattern):
        Engine([device])


# -- failures -------------------------------------------------------------------------------------------------
class FailingWorker(CPUWorker):
    """Test hook: raises ``error`` on its ``after``-th multiply (or in ``begin``), ``times`` times in all.
    Its device type reads cuBLAS's allocation failure as out of memory (as the CUDA worker's does)."""

    @classmethod
    def is_out_of_memory(cls, error):
        return super().is_out_of_memory(error) or "CUBLAS_STATUS_ALLOC_FAILED" in str(error)

    def __init__(self, error, after=1, times=1, in_begin=False):
        super().__init__("cpu")
        self.error, self.after, self.times, self.in_begin, self.calls = error, after, times, in_begin, 0
        self.reached = threading.Event()  # set once it is about to fail

    def _maybe_fail(self):
        self.calls += 1
        if self.calls >= self.after and self.times > 0:
            self.times -= 1
            self.reached.set()
            raise self.error
        if self.times == 0:
            self.reached.set()

    def begin(self, problem):
        if self.in_begin:
            self._maybe_fail()
        super().begin(problem)

    def multiply_accumulate(self, acc, a, b, accumulate, problem):
        if not self.in_begin:
            self._maybe_fail()
        super().multiply_accumulate(acc, a, b, accumulate, problem)


class PartnerWorker(CPUWorker):
    """Test hook: starts its blocks only once ``other`` has reached its failure (so the failing worker
    surely gets a block however the threads are scheduled)."""

    def __init__(self, other):
        super().__init__("cpu")
        self.other = other

    def run_block(self, problem, block):
        self.other.reached.wait(timeout=30)
        super().run_block(problem, block)


def test_worker_failure_stops_every_worker_and_returns_nothing(seed):
    A, B = torch.randn(90, 50), torch.randn(50, 90)
    before = set(engine_threads())
    failing = FailingWorker(RuntimeError("device fell off the bus"), after=1)
    engine = Engine([failing, PartnerWorker(failing)], memory_limit=2 * 30_000)
    with pytest.raises(RuntimeError, match="fell off the bus"):
        engine.gemm(A, B)
    assert set(engine_threads()) <= before  # this engine's threads are gone
    assert all(worker.account.held == 0 for worker in engine.workers)  # buffers freed, tiles dropped
    torch.testing.assert_close(engine.gemm(A, B), A @ B, rtol=1e-5, atol=1e-5)  # the engine still works


def test_out_of_memory_shrinks_the_plan_and_retries_once(seed, caplog):
    A, B = torch.randn(90, 50), torch.randn(50, 90)
    failing = FailingWorker(torch.OutOfMemoryError("CUDA out of memory"), after=1, times=1)
    engine = Engine([failing, PartnerWorker(failing)], memory_limit=2 * 60_000)
    with caplog.at_level("WARNING", logger="accel.ooc.engine"):
        result = engine.gemm(A, B)
    assert "out of memory" in caplog.text and "retrying once" in caplog.text  # said, not silent
    torch.testing.assert_close(result, A @ B, rtol=1e-5, atol=1e-5)
    assert engine.stats.retries == 1
    assert engine.stats.plan.working_set_bytes <= 60_000 // 2
    assert engine.workers[0].account.limit == 60_000  # the limit is restored after the call


@pytest.mark.parametrize("error", [torch.OutOfMemoryError("CUDA out of memory"),
                                   RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate")])
def test_out_of_memory_twice_fails_naming_the_limit(error, seed):
    A, B = torch.randn(90, 50), torch.randn(50, 90)
    before = set(engine_threads())
    failing = FailingWorker(error, times=2, in_begin=True)
    engine = Engine([failing, "cpu"], memory_limit=2 * 60_000)
    with pytest.raises(RuntimeError, match=re.escape("memory_limit {'cpu#0': 60000, 'cpu#1': 60000}")):
        engine.gemm(A, B)
    assert failing.times == 0  # it failed on the first try and on the retry
    assert set(engine_threads()) <= before


def test_engine_threads_stop_when_engine_is_collected():
    engine = Engine(["cpu", "cpu"])
    engine.gemm(torch.randn(40, 30), torch.randn(30, 20))
    ours = [worker_thread.thread for worker_thread in engine._threads.values()]
    assert len(ours) == 2 and all(t.is_alive() for t in ours)
    del engine
    gc.collect()
    assert not any(t.is_alive() for t in ours)


def test_stats_report_traffic_against_the_lower_bound(seed):
    A, B = torch.randn(128, 96), torch.randn(96, 112)
    engine = Engine(["cpu"], memory_limit=40_000)
    engine.gemm(A, B)
    stats = engine.stats
    assert stats.seconds > 0 and stats.bytes_to_host == 128 * 112 * 4
    # every A tile is read once per block column and every B tile once per block row
    rows, cols, _ = stats.plan.grid
    without_cache = 4 * (128 * 96 * cols + 96 * 112 * rows)
    assert 4 * (128 * 96 + 96 * 112) <= stats.bytes_to_device <= without_cache
    assert (stats.bytes_to_device == without_cache) == (stats.cache_hits == 0)
    assert stats.traffic_ratio == pytest.approx((stats.bytes_to_device + stats.bytes_to_host) / stats.lower_bound_bytes)
    assert stats.traffic_ratio > 1.0


def test_totals_sum_the_calls_and_count_cache_hits():
    engine = Engine(["cpu"], memory_limit=1 << 20, persist_cache=True)
    A, B = torch.randn(40, 30), torch.randn(30, 20)
    engine.gemm(A, B)
    first = engine.stats
    engine.gemm(A, B)  # the same operands again: served from the tile cache
    second = engine.stats
    totals = engine.totals
    assert totals.calls == 2
    assert totals.bytes_to_device == first.bytes_to_device + second.bytes_to_device
    assert totals.cache_hits == first.cache_hits + second.cache_hits and second.cache_hits > 0
    assert 0.0 < totals.cache_hit_rate < 1.0
    assert totals.as_dict()["cache_hit_rate"] == totals.cache_hit_rate
    engine.reset_totals()
    assert engine.totals.calls == 0 and engine.totals.cache_hit_rate == 0.0


def test_plan_for_is_the_plan_a_call_uses(seed):
    generator = torch.Generator().manual_seed(seed)
    engine = Engine(["cpu", "cpu"], memory_limit=2 * 20_000)
    A, B = torch.randn(97, 61, generator=generator), torch.randn(61, 83, generator=generator)
    engine.gemm(A, B)
    assert engine.plan_for(97, 83, 61, dtype=torch.float32) == engine.stats.plan
    assert engine.memory_per_worker == {"cpu#0": 20_000, "cpu#1": 20_000}
    with pytest.raises(ValueError, match="m must be a positive int"):
        engine.plan_for(0, 3, 3)
    with pytest.raises(TypeError, match="int32"):
        engine.plan_for(3, 3, 3, dtype=torch.int32)


def test_block_for_bounds_and_errors():
    from accel.ooc.plan import MIN_TILE

    roomy = Engine(["cpu"], memory_limit=1 << 30)
    assert roomy.block_for([(40, 300, 200), (300, 200, 40)], torch.float32) == 300  # every call in one block
    tight = Engine(["cpu"], memory_limit=4_000)
    assert tight.block_for([(4000, 4000, 4000)], torch.float64) == MIN_TILE  # never below the smallest tile
    middle = Engine(["cpu"], memory_limit=1 << 20)
    wide, narrow = (middle.block_for([(5000, 5000, 5000)], torch.float32, memory_fraction=f) for f in (1.0, 0.25))
    assert MIN_TILE < narrow < wide < 5000
    for shapes in ([], [(3, 4)], [(3, 4, 0)]):
        with pytest.raises(ValueError, match="shapes"):
            middle.block_for(shapes, torch.float32)
    with pytest.raises(ValueError, match="memory_fraction"):
        middle.block_for([(3, 4, 5)], torch.float32, memory_fraction=0)


def test_a_shared_block_and_scope_load_each_tile_once(seed):
    """Engine.gemm with cache_scope and block_for: x W^T then g W read W's tiles once (the OutOfCoreLinear path)."""
    generator = torch.Generator().manual_seed(seed)
    engine = Engine(["cpu"], memory_limit=200_000)
    x, w, g = (torch.randn(*shape, generator=generator, dtype=torch.float64) for shape in ((30, 50), (40, 50), (30, 40)))
    side = engine.block_for([(30, 40, 50), (30, 50, 40)], torch.float64)
    scope = engine.cache_scope()
    torch.testing.assert_close(engine.gemm(x, w, trans_b=True, block=side, cache_scope=scope), x @ w.t())
    torch.testing.assert_close(engine.gemm(g, w, block=side, cache_scope=scope), g @ w)
    assert engine.stats.bytes_to_device == g.numel() * 8  # W came from the scope's cache
    scope.close()
    torch.testing.assert_close(engine.gemm(g, w, block=side), g @ w)
    assert engine.stats.bytes_to_device == (g.numel() + w.numel()) * 8
