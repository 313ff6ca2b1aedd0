"""Per-worker memory accounting and tile cache.

Every byte a worker holds on its device (accumulator, output tile, cached operand tiles) is charged to
its :class:`MemoryAccount`, which refuses to go past the limit and records the peak: that is how the
"memory limit is never exceeded" promise is kept and measured.

:class:`TileCache` keeps operand tiles between blocks of a call and, when the caller allows it, between
calls. Validity rests on *lifetime*, not on detecting writes: torch does not see every write (fused
optimizers and c10d collectives do not bump ``tensor._version``, nor do writes through ``.data``'s own
counter or a NumPy view), so no key can prove a tile current. Each tile key therefore carries a *scope*:

* ``("call", n)`` -- the default: tiles live for one call and are dropped at its end. Within a call the
  operands cannot change (a concurrent write would be a race in any BLAS).
* ``("scope", n)`` -- a :class:`~accel.ooc.cache.CacheScope`: the caller declares the operands unchanged
  until it closes the scope (``OutOfCoreLinear`` opens one per forward and closes it at the end of the
  matching backward); then its tiles are dropped.
* ``("persistent",)`` -- an ``Engine(persist_cache=True)``: the caller declares its operands unchanged
  between calls unless it calls :meth:`~accel.ooc.engine.Engine.clear_cache`.

Keys also hold the source's identity and visible state (object id, data pointer, shape, strides, dtype,
``_version``) so that a tensor replaced or changed through torch is never confused with its old self,
and a source's tiles are dropped when it is garbage collected (a recycled ``id`` cannot hit stale data).
Sources without a version counter (NumPy arrays, tensors made under ``torch.inference_mode``, whose
in-place writes inside inference mode are not counted) never get persistent tiles: theirs live for one
call, even on an ``Engine(persist_cache=True)``.
"""
from __future__ import annotations

import itertools
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable

import torch


class MemoryBudgetExceeded(RuntimeError):
    """A worker tried to hold more bytes than its memory limit (a planning error, never expected)."""


class MemoryAccount:
    """Bytes held by one worker, against a limit. Thread-safe.

    Args:
        limit (int): bytes the worker may hold.
    """

    def __init__(self, limit: int):
        self.limit = int(limit)
        self.held = 0
        self.peak = 0
        self._lock = threading.Lock()

    def charge(self, nbytes: int) -> None:
        """Record ``nbytes`` more held; raises :class:`MemoryBudgetExceeded` past the limit."""
        with self._lock:
            if self.held + nbytes > self.limit:
                raise MemoryBudgetExceeded(f"holding {self.held + nbytes} bytes would exceed the memory limit "
                                           f"of {self.limit} bytes")
            self.held += nbytes
            self.peak = max(self.peak, self.held)

    def refund(self, nbytes: int) -> None:
        """Record ``nbytes`` released."""
        with self._lock:
            self.held -= nbytes

    def reset_peak(self) -> None:
        with self._lock:
            self.peak = self.held


@dataclass(frozen=True)
class SourceKey:
    """Identity and state of a host tensor tiles are cut from (see the module docstring)."""

    object_id: int
    data_ptr: int
    shape: tuple
    stride: tuple
    dtype: torch.dtype
    version: int | None  # None: an inference tensor, which has no version counter
    scope: tuple

    @property
    def persistent(self) -> bool:
        """Whether the tiles may outlive the call (a cache scope or a persistent cache)."""
        return self.scope[0] != "call"


_scope_counter = itertools.count()


def call_scope() -> tuple:
    """A scope no other call shares: its tiles are dropped at the end of the call."""
    return ("call", next(_scope_counter))


def new_scope() -> tuple:
    """A fresh :class:`~accel.ooc.cache.CacheScope` key."""
    return ("scope", next(_scope_counter))


def source_key(tensor: torch.Tensor, scope: tuple | None = None) -> SourceKey:
    """Key for ``tensor``'s tiles in ``scope`` (default: a fresh call scope)."""
    scope = scope if scope is not None else call_scope()
    # a tensor made under torch.inference_mode has no version counter (its in-place writes are not counted)
    version = None if tensor.is_inference() else tensor._version
    return SourceKey(id(tensor), tensor.data_ptr(), tuple(tensor.shape), tuple(tensor.stride()), tensor.dtype,
                     version, scope)


@dataclass(eq=False)
class Tile:
    """A cached operand tile on a worker's device.

    ``ready`` is the event after which ``tensor`` holds its data, ``last_use`` the event after which
    no queued computation reads it (both ``None`` on the CPU, where everything is synchronous).
    """

    key: Hashable
    tensor: torch.Tensor
    nbytes: int
    references: int = 0
    ready: Any = None
    last_use: Any = None
    extra: dict = field(default_factory=dict)


class TransposedTile:
    """A cached :class:`Tile` used in the other orientation: ``tensor`` is its transpose (a view), and
    the events are the cached tile's own (setting ``last_use`` sets it on the cached tile)."""

    def __init__(self, base: Tile):
        self.base = base

    @property
    def tensor(self) -> torch.Tensor:
        return self.base.tensor.t()

    key = property(lambda self: self.base.key)
    nbytes = property(lambda self: self.base.nbytes)
    extra = property(lambda self: self.base.extra)
    ready = property(lambda self: self.base.ready, lambda self, value: setattr(self.base, "ready", value))
    last_use = property(lambda self: self.base.last_use, lambda self, value: setattr(self.base, "last_use", value))


class TileCache:
    """LRU cache of operand tiles with reference counts, within a worker's :class:`MemoryAccount`.

    A referenced tile (in use by the block being computed) is never evicted. Tiles are keyed by
    ``(SourceKey, region...)``; see the module docstring for when they are invalidated.

    Args:
        account (MemoryAccount): where the tiles' bytes are charged.
        before_evict (callable, optional): called with a tile before it is dropped (a CUDA worker
            waits there for the tile's ``last_use`` event).
    """

    def __init__(self, account: MemoryAccount, before_evict: Callable[[Tile], None] | None = None):
        self.account = account
        self.before_evict = before_evict
        self.hits = 0
        self.misses = 0
        self.evictions = 0
        self._tiles: OrderedDict[Hashable, Tile] = OrderedDict()  # least recently used first
        self._lock = threading.RLock()
        self._finalizers: dict[int, weakref.finalize] = {}
        self._current: dict[int, SourceKey] = {}

    def __len__(self) -> int:
        return len(self._tiles)

    @property
    def nbytes(self) -> int:
        """Bytes of all cached tiles."""
        with self._lock:
            return sum(tile.nbytes for tile in self._tiles.values())

    def holds(self, key: Hashable) -> bool:
        """Whether a tile with this key is cached (no LRU update)."""
        return key in self._tiles

    def track(self, tensor: torch.Tensor, key: SourceKey) -> None:
        """Declare that ``key`` is the current state of ``tensor``: drops tiles of its older states,
        and arranges for all its tiles to be dropped when ``tensor`` is garbage collected."""
        with self._lock:
            previous = self._current.get(key.object_id)
            if previous is not None and previous != key:
                self.drop_source(previous.object_id, keep=key)
            self._current[key.object_id] = key
            if key.persistent and key.object_id not in self._finalizers:
                try:
                    self._finalizers[key.object_id] = weakref.finalize(tensor, self.drop_source, key.object_id)
                except TypeError:  # not weak-referenceable: keep it for this call only
                    pass

    def acquire(self, key: Hashable, nbytes: int, load: Callable[[], Tile]) -> Tile:
        """Return the tile for ``key`` with one more reference, loading it with ``load()`` on a miss.

        On a miss, least recently used unreferenced tiles are evicted until ``nbytes`` fit; ``load``
        must return a :class:`Tile` of ``nbytes`` bytes.
        """
        with self._lock:
            tile = self._tiles.get(key)
            if tile is not None:
                self._tiles.move_to_end(key)
                tile.references += 1
                self.hits += 1
                return tile
            self.misses += 1
            self.make_room(nbytes)
            self.account.charge(nbytes)
        try:
            tile = load()  # outside the lock: packing and transfer take time
        except BaseException:
            self.account.refund(nbytes)
            raise
        with self._lock:
            tile.references = 1
            self._tiles[key] = tile
            return tile

    def release(self, tile: Tile) -> None:
        """Drop one reference to ``tile`` (it stays cached until evicted)."""
        with self._lock:
            getattr(tile, "base", tile).references -= 1

    def make_room(self, nbytes: int) -> None:
        """Evict least recently used unreferenced tiles until ``nbytes`` more fit in the account."""
        with self._lock:
            for key in list(self._tiles):
                if self.account.held + nbytes <= self.account.limit:
                    return
                if self._tiles[key].references == 0:
                    self._evict(key)
            if self.account.held + nbytes <= self.account.limit:
                return
            raise MemoryBudgetExceeded(f"tile cache cannot fit {nbytes} more bytes: {self.account.held} of "
                                       f"{self.account.limit} bytes held, all cached tiles in use")

    def _evict(self, key) -> None:
        tile = self._tiles.pop(key)
        if self.before_evict is not None:
            self.before_evict(tile)
        self.account.refund(tile.nbytes)
        self.evictions += 1

    def drop_source(self, object_id: int, keep: SourceKey | None = None) -> None:
        """Drop every unreferenced tile cut from the tensor with this ``id`` (except state ``keep``)."""
        with self._lock:
            for key in [key for key in self._tiles if key[0].object_id == object_id and key[0] != keep]:
                if self._tiles[key].references == 0:
                    self._evict(key)
            if keep is None:
                self._current.pop(object_id, None)
                finalizer = self._finalizers.pop(object_id, None)
                if finalizer is not None:
                    finalizer.detach()

    def drop_call_scoped(self) -> None:
        """Drop tiles of call-scoped sources at the end of a call."""
        with self._lock:
            for key in [key for key in self._tiles if not key[0].persistent]:
                self._evict(key)
            for object_id in [i for i, key in self._current.items() if not key.persistent]:
                del self._current[object_id]

    def drop_scope(self, scope: tuple) -> None:
        """Drop every unreferenced tile of ``scope`` (a closed :class:`~accel.ooc.cache.CacheScope`)."""
        with self._lock:
            for key in [key for key, tile in self._tiles.items() if key[0].scope == scope and not tile.references]:
                self._evict(key)

    def clear(self) -> None:
        """Drop every tile (none may be referenced)."""
        with self._lock:
            for key in list(self._tiles):
                self._evict(key)
            self._current.clear()
            for finalizer in self._finalizers.values():
                finalizer.detach()
            self._finalizers.clear()


class CacheScope:
    """A window in which the caller declares the operands it passes unchanged, so tiles are reused across
    calls: ``scope = engine.cache_scope()``, then ``engine.gemm(..., cache_scope=scope)`` several times,
    then ``scope.close()`` (also done when the scope is garbage collected). Its tiles are dropped on close.

    Writing to an operand while its scope is open, by any path, gives wrong results: that is the contract.
    """

    def __init__(self, engine):
        self.key = new_scope()
        self._engine = weakref.ref(engine)
        self._finalizer = weakref.finalize(self, _drop_scope, self._engine, self.key)

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    def close(self) -> None:
        """Drop the scope's tiles; later calls cannot use it."""
        self._finalizer()

    def check(self, engine) -> None:
        """Raise ValueError when this scope is closed or belongs to another engine."""
        if self.closed:
            raise ValueError("cache_scope is closed; open a new one with engine.cache_scope()")
        if self._engine() is not engine:
            raise ValueError("cache_scope belongs to another Engine")

    def __repr__(self) -> str:
        return f"CacheScope({self.key[1]}, closed={self.closed})"


def _drop_scope(engine_ref, key) -> None:  # (a function: the finalizer must not hold the scope)
    engine = engine_ref()
    if engine is not None:
        for worker in engine.workers:
            if worker.cache is not None:
                worker.cache.drop_scope(key)
