"""Traffic near the I/O lower bound, asserted on the plan and on the engine's byte counts (no timing).

Bounds (see GemmStats): ``hong_kung`` = 2mnk/sqrt(M) operand elements for a memory of M elements, and
``compulsory`` = A and B read once and the result written once. With the memory a quarter of the problem
the compulsory traffic exceeds Hong-Kung's asymptotic bound (for 256 x 1024 x 1024, by 1.8x), so there
the goal is stated against the larger of the two.
"""
import math

import gemm_helpers
import pytest
import torch

from accel.ooc import Engine
from accel.ooc.plan import make_plan

seeded_global_rng = gemm_helpers.seeded_global_rng  # autouse fixture: torch's global generator seeded per test

SHAPES = [(1024, 1024, 1024), (768, 768, 768), (1024, 256, 768), (256, 1024, 1024), (3000, 1000, 500),
          (600, 300, 900)]


def problem_bytes(m, n, k, size=4):
    return (m * k + k * n + m * n) * size


@pytest.mark.parametrize("m,n,k", SHAPES)
def test_quarter_memory_traffic_within_1_5x_of_the_lower_bound(m, n, k, seed):
    generator = torch.Generator().manual_seed(seed)
    A, B = torch.randn(m, k, generator=generator), torch.randn(k, n, generator=generator)
    limit = problem_bytes(m, n, k) // 4
    engine = Engine(["cpu"], memory_limit=limit)
    result = engine.gemm(A, B)
    stats = engine.stats
    torch.testing.assert_close(result, A @ B, rtol=1e-4, atol=1e-4)
    assert max(stats.peak_bytes_per_worker.values()) <= limit
    assert stats.traffic_ratio <= 1.5, (stats.plan.grid, stats.traffic_ratio)
    # the byte counts are what the plan implies: each A row panel once per block column, and so on
    rows, cols, _ = stats.plan.grid
    assert stats.bytes_to_device == 4 * (m * k * cols + k * n * rows)
    assert stats.bytes_to_host == 4 * m * n
    hong_kung = 2 * m * n * k / math.sqrt(limit / 4) * 4
    assert stats.hong_kung_bytes == pytest.approx(hong_kung)


def test_square_quarter_memory_takes_several_thin_slabs_for_a_larger_block():
    m = n = k = 4096
    limit = problem_bytes(m, n, k) // 4
    plan = make_plan(m, n, k, memory_per_worker=limit, operand_size=4, accumulator_size=4, output_size=0,
                     blocks_per_worker=1, min_slabs=1, min_slab=32)
    assert plan.grid[:2] in ((1, 2), (2, 1)) and plan.grid[2] >= 8  # half of C resident, thin slabs
    traffic = 4 * (m * k * plan.grid[1] + k * n * plan.grid[0] + m * n)
    assert traffic / (4 * (m * k + k * n + m * n)) <= 1.34


@pytest.mark.parametrize("m,n,k", [(4096, 4096, 4096), (8192, 2048, 4096), (2048, 8192, 8192)])
def test_small_memory_traffic_near_hong_kung(m, n, k):
    """Where memory is small against the problem the asymptotic bound governs: the plan stays within
    1.5x of it (planned bytes: the same formula the byte counts above confirm)."""
    limit = problem_bytes(m, n, k) // 16
    plan = make_plan(m, n, k, memory_per_worker=limit, operand_size=4, accumulator_size=4, output_size=0,
                     blocks_per_worker=1, min_slabs=1, min_slab=32)
    assert plan.working_set_bytes <= limit
    traffic = 4 * (m * k * plan.grid[1] + k * n * plan.grid[0] + m * n)
    assert traffic / (2 * m * n * k / math.sqrt(limit / 4) * 4) <= 1.5, plan.grid


def test_gpu_plan_keeps_slabs_and_blocks_for_overlap():
    """A GPU-like profile with no memory pressure: blocks for every worker and at least 4 slabs each."""
    plan = make_plan(32768, 32768, 32768, memory_per_worker=120 << 30, operand_size=2, accumulator_size=4,
                     output_size=2, workers=1, blocks_per_worker=2, min_slabs=4, min_slab=256)
    assert len(plan.blocks) >= 2 and plan.grid[2] >= 4
