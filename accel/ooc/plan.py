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

#: The thinnest slab used to buy larger blocks: thinner multiplies lose speed on every device.
DEFAULT_MIN_SLAB = 128

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
        min_slab (int): the thinnest slab worth multiplying; the plan thins slabs down to it to make
            room for larger blocks.
    """

    flops_per_second: dict = field(default_factory=dict)
    bytes_per_second: float = 1e10
    min_block: int = 256
    blocks_per_worker: int = 2
    min_slabs: int = 4
    min_slab: int = 256

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
              blocks_per_worker: int = 2, min_slabs: int = 1, min_slab: int = DEFAULT_MIN_SLAB) -> Plan:
    r"""Choose block and slab sizes for ``C (m x n) = op(A) (m x k) @ op(B) (k x n)``: the plan that moves
    the fewest bytes within ``memory_per_worker``.

    A ``b_r x b_c`` block streamed in slabs of depth ``t`` reads ``m*k*(n/b_c) + k*n*(m/b_r)`` operand
    elements in all, and holds ``b_r*b_c*(accumulator + output) + 2*(b_r + b_c)*t*operand`` bytes. So
    blocks are as large as memory allows once the slabs are thin: every block-row count is tried with
    slabs of ``min_slab`` (thinner slabs buy larger blocks), the widest block that then fits is taken, and
    the slabs get the memory left over (fewer, larger multiplies). The plan moving the fewest bytes wins
    (ties: deeper slabs). Blocks are never fewer than ``workers * blocks_per_worker`` (load balance, and a
    GPU overlaps one block's write-back with the next) and never have fewer than ``min_slabs`` slabs
    (copies overlap multiplies), where the matrix is large enough for that.

    Args:
        m, n, k (int): problem size, each ``>= 1``.
        memory_per_worker (int): bytes one worker may hold.
        operand_size (int): bytes per element of an A/B tile as the worker stores it.
        accumulator_size (int): bytes per element of the accumulator (4 for fp32 accumulation).
        output_size (int): bytes per element of the output tile (0 when the workers need none).
        workers (int): number of workers sharing the blocks.
        target_block (int): block side that hides transfers (:meth:`DeviceProfile.target_block`); kept
            for callers, the traffic-minimal plan takes blocks at least as large whenever memory allows.
        block (int, optional): force this block side (slabs as deep, or thinner to fit the memory).
        blocks_per_worker (int): blocks each worker should get at least.
        min_slabs (int): slabs each block should have at least.
        min_slab (int): the thinnest slab used to make room for larger blocks.

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

    def fits(rows, cols, slab):
        return working_set_bytes(rows, cols, slab, **sizes) <= memory_per_worker

    if block is not None:
        rows, cols = min(m, block), min(n, block)
        slab = min(k, block)
        if not fits(rows, cols, slab):  # keep the block, make slabs thinner
            slab = _largest_side(min(k, block), lambda t: fits(rows, cols, t))
            if not fits(rows, cols, slab):
                need = working_set_bytes(rows, cols, min(k, MIN_TILE), **sizes)
                raise ValueError(f"block={block} needs at least {need} bytes per worker, more than the "
                                 f"memory_limit of {memory_per_worker} bytes")
        parts = (math.ceil(m / rows), math.ceil(n / cols), math.ceil(k / slab))
    else:
        parts = _least_traffic_parts(m, n, k, fits, sizes, memory_per_worker, workers * blocks_per_worker,
                                     min_slabs, min_slab)
    return Plan(m, n, k, split(m, parts[0]), split(n, parts[1]), split(k, parts[2]),
                operand_size, accumulator_size, output_size, memory_per_worker)


def _least_traffic_parts(m, n, k, fits, sizes, memory, wanted_blocks, min_slabs, min_slab) -> tuple[int, int, int]:
    """(row parts, column parts, slab parts) of the feasible plan reading the fewest operand bytes."""
    fixed = sizes["accumulator_size"] + sizes["output_size"]
    operand = sizes["operand_size"]
    deepest = math.ceil(k / max(1, min(min_slabs, k)))  # slabs no deeper than this (several per block)
    best = None
    for thin in dict.fromkeys((min(k, min_slab, deepest), min(k, MIN_TILE))):  # the floor, else the least
        for row_parts in range(1, math.ceil(m / min(m, MIN_TILE)) + 1):
            rows = math.ceil(m / row_parts)
            if row_parts > 1 and math.ceil(m / (row_parts - 1)) == rows:
                continue  # the same block height as a smaller count
            room = memory - 2 * rows * thin * operand
            widest = min(n, room // (rows * fixed + 2 * thin * operand)) if room > 0 else 0
            if widest < min(n, MIN_TILE):
                continue
            col_parts = min(n, max(math.ceil(n / widest), math.ceil(wanted_blocks / row_parts)))
            cols = math.ceil(n / col_parts)
            slab = min(deepest, (memory - rows * cols * fixed) // (2 * (rows + cols) * operand))
            if slab < thin or not fits(rows, cols, slab):
                continue
            slab_parts = math.ceil(k / slab)
            traffic = m * k * col_parts + k * n * row_parts
            candidate = (traffic, slab_parts, row_parts * col_parts, (row_parts, col_parts, slab_parts))
            if best is None or candidate < best:
                best = candidate
        if best is not None:
            break
    if best is None:  # unreachable above minimum_memory; kept as a clear failure rather than a bad plan
        raise ValueError(f"no plan fits {memory} bytes per worker for a {m}x{n}x{k} GEMM")
    return best[3]
