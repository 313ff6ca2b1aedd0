"""What the engine reports: :class:`GemmStats` for one call, :class:`EngineTotals` summed over calls."""
from __future__ import annotations

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
        lower_bound_bytes (float): ``2*m*n*k/sqrt(M)`` elements (Hong-Kung, M = the largest peak in
            elements), in bytes of the operands' storage dtype.
        traffic_ratio (float): ``(bytes_to_device + bytes_to_host) / lower_bound_bytes``.
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
    lower_bound_bytes: float = 0.0
    traffic_ratio: float = 0.0


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
