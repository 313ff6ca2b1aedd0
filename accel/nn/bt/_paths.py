"""How :class:`~accel.nn.BTLinear` picks its strategy per batch size: the cost model and its profile.

Three strategies compute ``x @ W``: ``"gemm"`` (the GEMM chain through the factors, :mod:`accel.nn.bt._contract`),
``"dense"`` (rebuild ``W``, then one GEMM, :mod:`accel.nn.bt._dense`) and ``"lowrank"`` (the weight's two thin
factors in turn, :mod:`accel.nn.bt._lowrank`). Each is weighed in flops of one large dense GEMM: its own flops
(counted exactly, as torch runs them) times a weight per kind of operation, plus a price per element it writes to
memory. The weights live in one :class:`CostProfile`; a layer takes one as ``cost_profile``.
"""
from __future__ import annotations

import dataclasses
import functools
import math

from accel.nn.bt._contract import gemm_chain_elements, gemm_chain_flops
from accel.nn.bt._dense import dense_costs
from accel.nn.bt._lowrank import lowrank_costs

__all__ = ["CostProfile", "METHODS", "auto_method", "contraction_costs", "contraction_method"]

METHODS = ("gemm", "dense", "lowrank")


@dataclasses.dataclass(frozen=True)
class CostProfile:
    """The weights with which ``contraction="auto"`` compares :class:`~accel.nn.BTLinear`'s strategies.

    Every strategy's cost is a sum of terms in flops of the dense product's GEMM (weight 1): small or
    memory-bound operations run at a lower rate per flop than one large GEMM, so their flops count several times,
    and moving data costs flops too. The defaults were fitted on CPU timings (forward + backward) of the settings
    in ``experiments/bt_speed.py``; another machine (a GPU in particular) may want others. Override per layer
    (``BTLinear(..., cost_profile=CostProfile(element_flops=50.0))``, or assign ``layer.cost_profile``), starting
    from the defaults with ``dataclasses.replace(CostProfile(), ...)``.

    Args:
        chain_flop_weight: each flop of the GEMM chain (small GEMMs over one mode at a time) counts this many.
        rebuild_flop_weight: each flop of rebuilding ``W`` (the dense path's weight-side GEMMs, forward and
            backward, on operands much thinner than the product's).
        element_flops: each element a strategy writes to memory (the chain's input, intermediates and copies; the
            rebuilt ``W``; the low-rank path's operand and intermediate) costs this many flops.
        lowrank_gemm_flop_weight: each flop of the low-rank path's one large GEMM (input by the rest of the block
            term), close to the dense product's rate.
        lowrank_small_flop_weight: each flop of its per-row GEMMs and of building its operand.
        lowrank_step_flops: a fixed cost, in flops, for each of the ``d - 1`` small contractions that build the
            low-rank operand (their dispatch and autograd overhead does not shrink with the batch).
    """

    chain_flop_weight: float = 4.0
    rebuild_flop_weight: float = 2.0
    element_flops: float = 100.0
    lowrank_gemm_flop_weight: float = 1.3
    lowrank_small_flop_weight: float = 4.0
    lowrank_step_flops: float = 7.5e6

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
                raise ValueError(f"CostProfile.{field.name} must be a finite number >= 0, got {value!r}")


@functools.lru_cache(maxsize=256)
def contraction_costs(in_shape, out_shape, ranks, num_blocks, batch, profile: CostProfile = CostProfile()) -> dict:
    """The forward pass's costs of each strategy over ``batch`` rows.

    Flops, counted as torch runs them (2 per multiply-add of every GEMM, the weight side included):
    ``"gemm"`` (``None`` for d = 1, where the chain does not apply), ``"rebuild"`` and ``"matmul"`` (the dense
    path is both), ``"lowrank"``; the elements each writes (``"gemm_elements"``, ``"dense_elements"``,
    ``"lowrank_elements"``); and the totals that ``contraction="auto"`` compares, weighed by ``profile``
    (``"auto_gemm"``, ``"auto_dense"``, ``"auto_lowrank"``). The backward pass costs about twice the forward for
    every strategy."""
    key = (in_shape, out_shape, ranks, num_blocks, batch)
    rebuild, matmul, dense_elements = dense_costs(*key)
    lowrank_gemm, lowrank_small, lowrank_elements = lowrank_costs(*key)
    chain = len(in_shape) >= 2
    cost = {"gemm": gemm_chain_flops(*key) if chain else None, "rebuild": rebuild, "matmul": matmul,
            "lowrank": lowrank_gemm + lowrank_small, "gemm_elements": gemm_chain_elements(*key) if chain else None,
            "dense_elements": dense_elements, "lowrank_elements": lowrank_elements}
    p = profile
    cost["auto_gemm"] = (p.chain_flop_weight * cost["gemm"] + p.element_flops * cost["gemm_elements"]
                         if chain else math.inf)
    cost["auto_dense"] = p.rebuild_flop_weight * rebuild + matmul + p.element_flops * dense_elements
    cost["auto_lowrank"] = (p.lowrank_gemm_flop_weight * lowrank_gemm + p.lowrank_small_flop_weight * lowrank_small
                            + p.element_flops * lowrank_elements + p.lowrank_step_flops * (len(in_shape) - 1))
    return cost


def auto_method(in_shape, out_shape, ranks, num_blocks, batch, profile: CostProfile = CostProfile()) -> str:
    """The rule of ``contraction="auto"``: whichever of ``"dense"``, ``"lowrank"``, ``"gemm"`` weighs least in
    :func:`contraction_costs` (ties go in that order: the dense path's GEMMs are the large, efficient ones)."""
    cost = contraction_costs(in_shape, out_shape, ranks, num_blocks, batch, profile)
    return min(("dense", "lowrank", "gemm"), key=lambda method: cost[f"auto_{method}"])


def contraction_method(in_shape, out_shape, ranks, num_blocks, contraction, batch,
                       profile: CostProfile = CostProfile()) -> str:
    """``"dense"``, ``"lowrank"`` or ``"gemm"``: how a layer set to ``contraction`` contracts ``batch`` rows. An
    empty batch takes the low-rank path (the chain reshapes by the batch size; the result is empty either way)."""
    method = auto_method(in_shape, out_shape, ranks, num_blocks, batch, profile) if contraction == "auto" \
        else contraction
    return "lowrank" if method == "gemm" and batch == 0 else method
