"""Tiling of ``C = op(A) @ op(B)`` for a memory budget.

C (``m x n``) is split into output-stationary blocks and the inner dimension ``k`` into slabs. A worker
keeps one block's accumulator resident while it streams the block's A and B tiles slab by slab, so the
A/B traffic is ``m*n*k*s*(1/block_rows + 1/block_cols)``: blocks should be as large as memory allows.
They must also be large enough to hide transfers behind arithmetic: a ``b x b`` block does ``2*b*b*t``
flops for every ``2*b*t*s`` bytes it receives, so ``b >= s * flops / bandwidth`` (FACTS.md), which is
why bf16/TF32 on an H100 wants blocks of 16k and more while fp32 is happy with 4k.

Edges are not padded: each dimension is cut into nearly equal parts (sizes differ by at most one), so
there is no sliver block and no element is computed twice.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

#: The smallest useful tile side: below this a block is all overhead (clamped to the matrix size).
MIN_TILE = 16

#: Working copies of operand tiles a worker holds at once: the slab being multiplied and the next one
#: (being transferred), each an A tile and a B tile.
OPERAND_GENERATIONS = 2


@dataclass(frozen=True)
class DeviceProfile:
    """Peak arithmetic rate and host-link bandwidth of a device, used to size blocks.

    Args:
        flops_per_second (dict): peak rate by compute kind (``"float64"``, ``"float32"``, ``"tf32"``,
            ``"half"`` for float16/bfloat16).
        bytes_per_second (float): host-to-device bandwidth (pinned).
        min_block (int): smallest block side that runs its matmul efficiently on this device.
        blocks_per_worker (int): blocks each worker should get at least (a GPU overlaps one block's
            write-back with the next block; a CPU worker gains nothing from more).
        min_slabs (int): k-slabs each block should have at least, so that copies overlap the multiplies
            (a GPU: 4; a synchronous CPU worker: 1).
    """

    flops_per_second: dict = field(default_factory=dict)
    bytes_per_second: float = 1e10
    min_block: int = 256
    blocks_per_worker: int = 2
    min_slabs: int = 4

    def target_block(self, compute_kind: str, element_size: int) -> int:
        """Smallest block side that hides transfers behind arithmetic: ``element_size * F / BW``."""
        flops = self.flops_per_second.get(compute_kind, self.flops_per_second.get("float32", 1e11))
        return max(self.min_block, math.ceil(element_size * flops / self.bytes_per_second))


def compute_kind(storage_dtype: torch.dtype, allow_tf32: bool) -> str:
    """Which entry of :attr:`DeviceProfile.flops_per_second` governs a product of this dtype."""
    if storage_dtype in (torch.float16, torch.bfloat16):
        return "half"
    if storage_dtype == torch.float64:
        return "float64"
    return "tf32" if allow_tf32 else "float32"


@dataclass(frozen=True)
class Block:
    """One output-stationary block of C: rows ``rows[0]:rows[1]``, columns ``cols[0]:cols[1]``.

    ``panel_row`` / ``panel_col`` number the block row and column (the A row panel and B column panel
    the block reads), so blocks sharing a panel can be found without comparing ranges.
    """

    index: int
    panel_row: int
    panel_col: int
    rows: tuple[int, int]
    cols: tuple[int, int]


def split(size: int, parts: int) -> tuple[int, ...]:
    """Boundaries cutting ``range(size)`` into ``parts`` pieces whose sizes differ by at most one."""
    return tuple((i * size) // parts for i in range(parts + 1))


def working_set_bytes(block_rows, block_cols, slab, *, operand_size, accumulator_size, output_size) -> int:
    """Bytes a worker holds for one block: accumulator, output tile, and two generations of A/B tiles."""
    fixed = block_rows * block_cols * (accumulator_size + output_size)
    return fixed + OPERAND_GENERATIONS * (block_rows + block_cols) * slab * operand_size


@dataclass(frozen=True)
class Plan:
    """How one GEMM is cut up. Built by :func:`make_plan`; read by the engine and the workers.

    Attributes:
        m, n, k (int): problem size (``op(A)`` is ``m x k``, ``op(B)`` is ``k x n``).
        row_bounds, col_bounds, slab_bounds (tuple): block and slab boundaries.
        operand_size, accumulator_size, output_size (int): bytes per element of each buffer kind.
        memory_per_worker (int): the byte budget each worker was planned for.
    """

    m: int
    n: int
    k: int
    row_bounds: tuple
    col_bounds: tuple
    slab_bounds: tuple
    operand_size: int
    accumulator_size: int
    output_size: int
    memory_per_worker: int

    @property
    def block_rows(self) -> int:
        """Largest block height."""
        return max(b - a for a, b in zip(self.row_bounds, self.row_bounds[1:]))

    @property
    def block_cols(self) -> int:
        """Largest block width."""
        return max(b - a for a, b in zip(self.col_bounds, self.col_bounds[1:]))

    @property
    def slab(self) -> int:
        """Largest slab depth."""
        return max(b - a for a, b in zip(self.slab_bounds, self.slab_bounds[1:]))

    @property
    def slabs(self) -> list[tuple[int, int]]:
        """The k-ranges, in order."""
        return list(zip(self.slab_bounds, self.slab_bounds[1:]))

    @property
    def blocks(self) -> list[Block]:
        """Blocks of C in row-major order of the block grid."""
        rows = list(zip(self.row_bounds, self.row_bounds[1:]))
        cols = list(zip(self.col_bounds, self.col_bounds[1:]))
        return [Block(i * len(cols) + j, i, j, r, c) for i, r in enumerate(rows) for j, c in enumerate(cols)]

    @property
    def grid(self) -> tuple[int, int, int]:
        """(block rows, block columns, slabs)."""
        return len(self.row_bounds) - 1, len(self.col_bounds) - 1, len(self.slab_bounds) - 1

    @property
    def working_set_bytes(self) -> int:
        """Bytes a worker needs for the largest block (at most :attr:`memory_per_worker`)."""
        return working_set_bytes(self.block_rows, self.block_cols, self.slab, operand_size=self.operand_size,
                                 accumulator_size=self.accumulator_size, output_size=self.output_size)


def minimum_memory(m, n, k, *, operand_size, accumulator_size, output_size) -> int:
    """Bytes per worker of the smallest useful plan (tiles of side ``MIN_TILE``, clamped to the matrix)."""
    return working_set_bytes(min(m, MIN_TILE), min(n, MIN_TILE), min(k, MIN_TILE), operand_size=operand_size,
                             accumulator_size=accumulator_size, output_size=output_size)


def _largest_side(limit, fits) -> int:
    """Largest ``b`` in ``[MIN_TILE, limit]`` with ``fits(b)`` (monotone), or ``MIN_TILE``."""
    low, high = MIN_TILE, max(MIN_TILE, limit)
    while low < high:
        middle = (low + high + 1) // 2
        if fits(middle):
            low = middle
        else:
            high = middle - 1
    return low


def make_plan(m: int, n: int, k: int, *, memory_per_worker: int, operand_size: int, accumulator_size: int,
              output_size: int, workers: int = 1, target_block: int = 256, block: int | None = None,
              blocks_per_worker: int = 2) -> Plan:
    r"""Choose block and slab sizes for ``C (m x n) = op(A) (m x k) @ op(B) (k x n)``.

    The block side ``b`` is the largest that fits ``memory_per_worker`` (with slabs as deep as the
    block, ``t = min(k, b)``), capped at ``max(target_block, b_balance)`` where ``b_balance`` still
    gives every worker ``blocks_per_worker`` blocks: past the transfer-hiding size, more blocks balance
    the load better. Slabs then take the memory left, up to the whole of ``k`` (fewer, larger multiplies).

    Args:
        m, n, k (int): problem size, each ``>= 1``.
        memory_per_worker (int): bytes one worker may hold.
        operand_size (int): bytes per element of an A/B tile as the worker stores it.
        accumulator_size (int): bytes per element of the accumulator (4 for fp32 accumulation).
        output_size (int): bytes per element of the output tile.
        workers (int): number of workers sharing the blocks.
        target_block (int): block side that hides transfers (:meth:`DeviceProfile.target_block`).
        block (int, optional): force this block side (still checked against the memory).
        blocks_per_worker (int): blocks each worker should get at least (load balance).

    Raises:
        ValueError: when ``memory_per_worker`` is below :func:`minimum_memory` or below what a forced
            ``block`` needs; the message names the minimum.
    """
    sizes = dict(operand_size=operand_size, accumulator_size=accumulator_size, output_size=output_size)
    if min(m, n, k) < 1:
        raise ValueError(f"make_plan needs m, n, k >= 1, got m={m}, n={n}, k={k}")
    minimum = minimum_memory(m, n, k, **sizes)
    if memory_per_worker < minimum:
        raise ValueError(f"memory_limit of {memory_per_worker} bytes per worker is too small for a {m}x{n}x{k} "
                         f"GEMM: the smallest plan ({MIN_TILE}-element tiles) needs {minimum} bytes")

    def fits(side, slab=None):
        return working_set_bytes(min(m, side), min(n, side), slab or min(k, side), **sizes) <= memory_per_worker

    if block is not None:
        side = block
        slab = min(k, side)
        if not fits(side, slab):  # keep the block, make slabs thinner
            slab = _largest_side(min(k, side), lambda t: fits(side, t))
            if not fits(side, slab):
                need = working_set_bytes(min(m, side), min(n, side), min(k, MIN_TILE), **sizes)
                raise ValueError(f"block={block} needs at least {need} bytes per worker, more than the "
                                 f"memory_limit of {memory_per_worker} bytes")
    else:
        side_memory = _largest_side(max(m, n), fits)
        wanted = blocks_per_worker * workers
        side_balance = _largest_side(max(m, n), lambda b: math.ceil(m / b) * math.ceil(n / b) >= wanted)
        side = min(side_memory, max(target_block, side_balance))
        slab = min(k, side)
        if slab < k:  # deepen the slabs with the memory the block left over
            slab = max(slab, _largest_side(k, lambda t: fits(side, t)))
    row_parts, col_parts, slab_parts = math.ceil(m / side), math.ceil(n / side), math.ceil(k / slab)
    return Plan(m, n, k, split(m, row_parts), split(n, col_parts), split(k, slab_parts),
                operand_size, accumulator_size, output_size, memory_per_worker)
