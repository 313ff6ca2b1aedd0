"""No silent stall: end a rank whose peer stopped responding, judged by the peer's heartbeat.

A rank waiting in ``all_reduce`` for a peer that was stopped (``SIGSTOP``), hung with its host or lost
with its node would otherwise wait for the process group's timeout, printing nothing.
:class:`CollectiveWatchdog` runs a heartbeat in a background thread of every rank, through the key-value
store the process group already rendezvoused through (``DistInfo.store``): each rank bumps its own
counter and watches the next rank's. When the watched peer's counter stops moving for ``timeout``
seconds -- or the store itself stops answering for that long -- it writes which peer, and which
collective this rank was waiting in, and exits the process with :data:`EXIT_STALLED`, so that the
launcher (torchrun, srun) can stop or restart the group.

How long a rank computes never counts: a healthy peer keeps beating while it computes for as long as it
likes, and so does this rank. Only a process that stops running altogether (or a thread that holds
Python's GIL in native code for ``timeout`` seconds) goes silent. A peer that is alive but never reaches
the collective (a deadlock) is left to the process group's own timeout.

Usage::

    info = accel.distributed.init()
    with CollectiveWatchdog(timeout=60, rank=info.rank, world_size=info.world_size, store=info.store) as watchdog:
        for step in ...:
            with watchdog.waiting(f"step {step}: gradient all-reduce"):   # names the collective in the message
                ...
"""
from __future__ import annotations

import os
import threading
import time
from contextlib import contextmanager
from typing import Callable, Iterator

import torch.distributed as dist

__all__ = ["CollectiveWatchdog", "EXIT_STALLED"]

EXIT_STALLED = 3  # the exit status of a rank ended by the watchdog


def _exit_stalled(message: str) -> None:
    # os.write and os._exit: the main thread is blocked inside the collective and may hold locks
    # (stdout's, the interpreter's import lock) that print() or sys.exit() would wait for.
    os.write(2, message.encode())
    os._exit(EXIT_STALLED)


class CollectiveWatchdog:
    """Heartbeats through ``store``; ends the process when the watched peer's heartbeat stops.

    Every rank beats (bumps the store key ``accel-watchdog/beat/<rank>``) every ``interval`` seconds and
    watches rank ``(rank + 1) % world_size``, so a stalled rank is reported by the rank before it, and each
    rank costs the store two small requests per interval whatever the world size. A peer that left its own
    ``with CollectiveWatchdog`` block (its run is over) is no longer watched.

    Args:
        timeout (float): seconds without a heartbeat from the watched peer (or without an answer from the
            store) after which this rank gives up.
        rank (int): this process's rank.
        world_size (int): the number of ranks; with one there is nobody to watch and no thread starts.
        store (torch.distributed.Store): a store every rank reaches, e.g. ``accel.distributed.init().store``.
        interval (float, optional): seconds between heartbeats (default: ``min(1, timeout / 5)``).
        on_stall (callable, optional): called (in the watchdog's thread) with the one-line message instead
            of the default, which writes it to stderr and exits the process with :data:`EXIT_STALLED`.
    """

    def __init__(self, timeout: float, *, rank: int, world_size: int, store: dist.Store | None,
                 interval: float | None = None, on_stall: Callable[[str], None] | None = None):
        if not timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} of world_size {world_size}: expected 0 <= rank < world_size")
        if world_size > 1 and store is None:
            raise ValueError("a watchdog over more than one rank needs the store every rank reaches "
                             "(accel.distributed.init().store)")
        self.timeout = float(timeout)
        self.interval = float(interval) if interval is not None else min(1.0, self.timeout / 5)
        if not 0 < self.interval < self.timeout:
            raise ValueError(f"interval must be in (0, timeout={self.timeout:g}), got {self.interval}")
        self.rank, self.world_size = rank, world_size
        self.peer = (rank + 1) % world_size
        self._store = dist.PrefixStore("accel-watchdog", store) if store is not None else None
        self._on_stall = on_stall or _exit_stalled
        self._phases: list[str] = []  # the collectives this rank is waiting in, innermost last
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        now = time.monotonic()
        self._answered_at = now  # the store's last answer
        self._peer_moved_at = now  # when the peer's counter last changed (or this watchdog started)
        self._peer_count: int | None = None
        self._peer_done = False
        self._store_error: str | None = None
        self.stalled: str | None = None  # the message, once given

    # ---------------------------------------------------------------------------------- public

    def __enter__(self) -> CollectiveWatchdog:
        if self.world_size > 1:
            self._threads = [threading.Thread(target=self._beat, name="accel-watchdog-heartbeat", daemon=True),
                             threading.Thread(target=self._watch, name="accel-watchdog", daemon=True)]
            for thread in self._threads:
                thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        for thread in self._threads:
            # the heartbeat thread may sit in a store request to a store that stopped answering
            thread.join(timeout=2 * self.interval)
        self._threads = []

    @contextmanager
    def waiting(self, description: str) -> Iterator[None]:
        """Name the block as waiting in a collective (``description``), for the message; it is not timed."""
        self._phases.append(description)
        try:
            yield
        finally:
            self._phases.pop()

    # ------------------------------------------------------------------------------- threads

    def _beat(self) -> None:
        store, mine = self._store, f"beat/{self.rank}"
        theirs, their_end = f"beat/{self.peer}", f"done/{self.peer}"
        while True:
            stopping = self._stop.is_set()
            try:
                if stopping:
                    store.set(f"done/{self.rank}", "1")  # the peer stops watching this rank
                    return
                store.add(mine, 1)
                count = store.add(theirs, 0)  # reads without blocking, even before the peer's first beat
                done = store.check([their_end])
            except Exception as error:  # an unreachable store: the watcher judges by _answered_at
                self._store_error = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
                if stopping:
                    return
            else:
                now = time.monotonic()
                self._answered_at = now
                if count != self._peer_count:
                    self._peer_count, self._peer_moved_at = count, now
                if done:
                    self._peer_done = True
            self._stop.wait(self.interval)

    def _watch(self) -> None:
        while not self._stop.wait(self.interval / 2):
            if self._peer_done:
                return
            now = time.monotonic()
            silent_store, silent_peer = now - self._answered_at, now - self._peer_moved_at
            if silent_store > self.timeout:
                cause = (f"the store the ranks share has not answered for {silent_store:.0f} s"
                         + (f" ({self._store_error})" if self._store_error else "")
                         + "; the process serving it (rank 0, or torchrun's agent) is stopped, hung or gone")
            elif silent_peer > self.timeout:
                cause = f"rank {self.peer} sent no heartbeat for {silent_peer:.0f} s (stopped, hung or gone with its node)"
            else:
                continue
            phases = list(self._phases)
            where = f"while waiting in {phases[-1]}" if phases else "while this rank was outside any collective"
            self.stalled = (f"accel: rank {self.rank} of {self.world_size}: a peer stopped responding: {cause} "
                            f"(timeout {self.timeout:g} s), {where}. Exiting with status {EXIT_STALLED} so the "
                            "launcher can stop or restart the group.\n")
            self._on_stall(self.stalled)
            return
