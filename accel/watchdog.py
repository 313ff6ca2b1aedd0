"""No silent stall: end a rank whose collective waits on a peer that stopped answering.

A rank waiting in ``all_reduce`` for a peer that was stopped (``SIGSTOP``), hung or lost with its node
would otherwise wait for the process group's timeout, printing nothing. :class:`CollectiveWatchdog`
watches the phases of work that wait on peers (a training step with its gradient all-reduce, the
evaluation's all-reduce, a checkpoint); when one makes no progress for ``timeout`` seconds it writes
which collective was waiting and exits the process with :data:`EXIT_STALLED`, so the launcher
(torchrun, srun) can stop or restart the group. Set the process group's own timeout longer than the
watchdog's, as a backstop (:func:`accel.distributed.init` takes one).

Usage::

    with CollectiveWatchdog(timeout=60, rank=info.rank) as watchdog:
        for step in ...:
            with watchdog.waiting(f"step {step}: gradient all-reduce"):
                ...
"""
from __future__ import annotations

import os
import threading
import time
from contextlib import contextmanager
from typing import Iterator

__all__ = ["CollectiveWatchdog", "EXIT_STALLED"]

EXIT_STALLED = 3  # the exit status of a rank ended by the watchdog


class CollectiveWatchdog:
    """A daemon thread that ends the process when a watched phase outlasts ``timeout`` seconds.

    Args:
        timeout (float): seconds a phase may run; the innermost open phase counts, from when it opened
            or when the phase inside it closed (progress restarts the clock).
        rank (int): this process's rank, for the message.
        world_size (int): the number of ranks, for the message.
        poll (float, optional): how often the thread looks (default: ``min(0.5, timeout / 10)``).
    """

    def __init__(self, timeout: float, *, rank: int, world_size: int, poll: float | None = None):
        if not timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
        self.timeout = float(timeout)
        self.rank, self.world_size = rank, world_size
        self._poll = poll if poll is not None else min(0.5, self.timeout / 10)
        self._phases: list[list] = []  # [description, started]; the last one is the one waiting
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> CollectiveWatchdog:
        self._thread = threading.Thread(target=self._watch, name="accel-collective-watchdog", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    @contextmanager
    def waiting(self, description: str) -> Iterator[None]:
        """Watch the block as a phase that waits on the other ranks (``description`` names the collective)."""
        phase = [description, time.monotonic()]
        self._phases.append(phase)
        try:
            yield
        finally:
            self._phases.pop()
            if self._phases:
                self._phases[-1][1] = time.monotonic()  # the enclosing phase made progress

    def _watch(self) -> None:
        while not self._stop.wait(self._poll):
            phases = list(self._phases)
            if not phases:
                continue
            description, started = phases[-1]
            waited = time.monotonic() - started
            if waited > self.timeout:
                self._fail(description, waited)

    def _fail(self, description: str, waited: float) -> None:
        message = (f"accel: rank {self.rank} of {self.world_size}: a peer stopped responding: no progress for "
                   f"{waited:.0f} s (--timeout {self.timeout:g} s) while waiting in {description}. A peer "
                   f"process is stopped, hung or gone with its node; exiting with status {EXIT_STALLED} so the "
                   "launcher can stop or restart the group.\n")
        # os.write and os._exit: the main thread is blocked inside the collective and may hold locks
        # (stdout's, the interpreter's import lock) that print() or sys.exit() would wait for.
        os.write(2, message.encode())
        os._exit(EXIT_STALLED)
