"""The block queue: which block of C a worker computes next.

A faster worker simply comes back to the queue more often and takes more blocks. When a worker asks for
a block, it gets one that shares a panel with its previous block if its cache still holds that panel
(BLASX's affinity rule), else one on a block row no other worker is on (so workers do not fetch the same
A panel twice).
"""
from __future__ import annotations

import threading
from collections import OrderedDict

from accel.ooc.plan import Block


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
