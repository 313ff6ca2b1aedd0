"""What the engine reports: :class:`GemmStats` for one call, :class:`EngineTotals` summed over calls."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from accel.ooc.plan import Plan


@dataclass
class GemmStats:
    """What one call did (``Engine.stats`` after the call).

    Attributes:
        plan (Plan): the plan the call finished with.
        seconds (float): wall time of the engine part of the call.
        bytes_to_device, bytes_to_host (int): bytes copied into workers' memory (operand tiles, C tiles)
            and back (result blocks); for a CPU worker, copies into and out of its tile buffers.
        blocks_per_worker, tiles_loaded_per_worker (dict): C blocks computed / operand tiles loaded, by worker.
        cache_hits, cache_misses (int): operand tile lookups served from / missing in the caches.
        peak_bytes_per_worker, memory_limit_per_worker (dict): the most bytes each worker held, and its limit.
        retries (int): 1 when the call ran out of memory and was re-planned.
        hong_kung_bytes (float): ``2*m*n*k/sqrt(M)`` operand elements in bytes of the storage dtype, ``M``
            the memory per worker (the plan's budget) in stored operand elements: no schedule within that
            memory moves less, asymptotically (Hong & Kung 1981).
        compulsory_bytes (float): A and B read once, C read once if ``beta != 0``, the result written once.
            When the memory is a sizeable share of the problem this exceeds ``hong_kung_bytes`` (the
            asymptotic bound ignores that every element must move at least once).
        lower_bound_bytes (float): ``max(hong_kung_bytes, compulsory_bytes)``.
        traffic_ratio (float): ``(bytes_to_device + bytes_to_host) / lower_bound_bytes``.
        traffic_ratio_hong_kung (float): ``(bytes_to_device + bytes_to_host) / hong_kung_bytes``.
    """

    plan: Plan
    seconds: float = 0.0
    bytes_to_device: int = 0
    bytes_to_host: int = 0
    blocks_per_worker: dict = field(default_factory=dict)
    tiles_loaded_per_worker: dict = field(default_factory=dict)
    cache_hits: int = 0
    cache_misses: int = 0
    peak_bytes_per_worker: dict = field(default_factory=dict)
    memory_limit_per_worker: dict = field(default_factory=dict)
    retries: int = 0
    hong_kung_bytes: float = 0.0
    compulsory_bytes: float = 0.0
    lower_bound_bytes: float = 0.0
    traffic_ratio: float = 0.0
    traffic_ratio_hong_kung: float = 0.0

    @property
    def traffic_bytes(self) -> int:
        """Bytes moved in both directions."""
        return self.bytes_to_device + self.bytes_to_host

    def set_bounds(self, storage_size: int, output_size: int, c_size: int) -> None:
        """Fill in the lower bounds and ratios (element sizes in bytes; ``c_size`` 0 when C is not read)."""
        plan = self.plan
        memory_elements = max(plan.memory_per_worker / plan.operand_size, 1.0)
        self.hong_kung_bytes = 2.0 * plan.m * plan.n * plan.k / math.sqrt(memory_elements) * storage_size
        self.compulsory_bytes = float((plan.m * plan.k + plan.k * plan.n) * storage_size
                                      + plan.m * plan.n * (output_size + c_size))
        self.lower_bound_bytes = max(self.hong_kung_bytes, self.compulsory_bytes)
        self.traffic_ratio = self.traffic_bytes / self.lower_bound_bytes
        self.traffic_ratio_hong_kung = self.traffic_bytes / self.hong_kung_bytes


@dataclass
class EngineTotals:
    """What an engine did over all its calls since it was made or :meth:`Engine.reset_totals` (``Engine.totals``).

    Attributes:
        calls (int): finished GEMM calls.
        seconds (float): engine wall time summed over the calls.
        bytes_to_device, bytes_to_host (int): bytes copied in and back, summed (see :class:`GemmStats`).
        cache_hits, cache_misses (int): operand tile lookups served from / missing in the caches, summed.
    """

    calls: int = 0
    seconds: float = 0.0
    bytes_to_device: int = 0
    bytes_to_host: int = 0
    cache_hits: int = 0
    cache_misses: int = 0

    @property
    def cache_hit_rate(self) -> float:
        """Fraction of operand tile lookups served from a cache (0 before any lookup)."""
        lookups = self.cache_hits + self.cache_misses
        return self.cache_hits / lookups if lookups else 0.0

    def add(self, stats: GemmStats) -> None:
        self.calls += 1
        self.seconds += stats.seconds
        self.bytes_to_device += stats.bytes_to_device
        self.bytes_to_host += stats.bytes_to_host
        self.cache_hits += stats.cache_hits
        self.cache_misses += stats.cache_misses

    def as_dict(self) -> dict:
        return {**asdict(self), "cache_hit_rate": self.cache_hit_rate}
