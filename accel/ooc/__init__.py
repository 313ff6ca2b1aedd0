"""Out-of-core multi-GPU GEMM: ``accel.gemm`` on host matrices larger than a GPU.

* :func:`gemm` -- ``alpha * op(A) @ op(B) + beta * C`` with BLAS semantics, on torch tensors or NumPy arrays;
* :class:`Engine` -- the reusable scheduler (one worker per device, a tile cache per worker,
  :attr:`Engine.stats`); :class:`CacheScope` -- reuse of tiles across calls the caller declares safe;
* :class:`Plan` / :func:`make_plan` -- how C is cut into blocks and K into slabs for a memory budget;
* :class:`TileCache`, :class:`MemoryAccount` -- the per-worker cache and its byte budget;
* :class:`CPUWorker`, :class:`Worker` -- workers (``CUDAWorker`` lives in :mod:`accel.ooc.workers.cuda`), found by
  device type through :func:`register_worker` / :func:`worker_class` (:mod:`accel.ooc.workers`); a new worker
  type is one file in ``accel/ooc/workers/``.
"""
from accel.ooc.cache import CacheScope, MemoryAccount, MemoryBudgetExceeded, TileCache
from accel.ooc.engine import Engine
from accel.ooc.gemm import gemm
from accel.ooc.plan import Block, DeviceProfile, Plan, make_plan, minimum_memory
from accel.ooc.queue import BlockQueue
from accel.ooc.stats import EngineTotals, GemmStats
from accel.ooc.workers import (
           CPUWorker,
           Worker,
           check_device,
           make_worker,
           register_worker,
           unregister_worker,
           worker_class,
)

__all__ = ["gemm", "Engine", "EngineTotals", "GemmStats", "BlockQueue", "Plan", "Block", "make_plan", "minimum_memory",
           "DeviceProfile", "TileCache", "MemoryAccount", "MemoryBudgetExceeded", "Worker", "CPUWorker",
           "make_worker", "register_worker", "unregister_worker", "worker_class", "check_device", "CacheScope"]
