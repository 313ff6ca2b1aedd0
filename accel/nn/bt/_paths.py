"""How :class:`~accel.nn.BTLinear` contracts: the ``opt_einsum`` paths, the rebuild of ``W``, and the
flop-based cost model that picks between them and the GEMM chain per batch size (all cached)."""
from __future__ import annotations

import functools
import math

import opt_einsum

from accel.nn.bt._contract import gemm_chain_elements, gemm_chain_flops, grouped_shapes
from accel.nn.bt._lowrank import lowrank_costs

__all__ = ["FACTORIZED_FLOP_PENALTY", "REBUILD_FLOP_PENALTY", "ELEMENT_FLOPS", "GROUPED_CHAIN_FLOP_PENALTY",
           "GROUPED_CHAIN_MIN_BATCH", "GEMM_CHAIN_MAX_EXTRA_FLOPS", "LOWRANK_GEMM_FLOP_PENALTY", "LOWRANK_STEP_FLOPS",
           "auto_method", "chain_plan", "contraction_costs",
           "contraction_method", "dense_is_cheaper", "factorized_contraction_steps", "factorized_expression",
           "factorized_method", "rebuild_expression"]


def _einsum_indices(d: int):
    """Symbols for batch, block, the d input modes, the d output modes and the d rank modes."""
    if 2 + 3 * d > 52:  # torch.einsum (the traced path) takes only a-z, A-Z
        raise ValueError(f"BTLinear supports at most 16 modes, got {d}")
    s = [opt_einsum.get_symbol(i) for i in range(2 + 3 * d)]
    return s[0], s[1], s[2:2 + d], s[2 + d:2 + 2 * d], s[2 + 2 * d:]


def _operand_terms(d: int) -> tuple[list[str], str, str]:
    batch, block, ins, outs, ranks = _einsum_indices(d)
    core = block + "".join(ranks)
    factors = [block + ins[k] + outs[k] + ranks[k] for k in range(d)]
    return [core, *factors], batch + "".join(ins), batch + "".join(outs)


def _weight_shapes(in_shape, out_shape, ranks, num_blocks):
    return [(num_blocks, *ranks)] + [(num_blocks, i, j, r) for i, j, r in zip(in_shape, out_shape, ranks)]


def _factorized_equation(in_shape, out_shape, ranks, num_blocks, batch):
    terms, x_term, y_term = _operand_terms(len(in_shape))
    shapes = [(batch, *in_shape), *_weight_shapes(in_shape, out_shape, ranks, num_blocks)]
    return ",".join([x_term, *terms]) + "->" + y_term, shapes


@functools.lru_cache(maxsize=64)
def _factorized_path(in_shape, out_shape, ranks, num_blocks, batch_bucket):
    """The flop-optimal contraction order for batches up to ``batch_bucket`` (a power of two)."""
    eq, shapes = _factorized_equation(in_shape, out_shape, ranks, num_blocks, batch_bucket)
    return opt_einsum.contract_path(eq, *shapes, shapes=True, optimize="dp")[0]


@functools.lru_cache(maxsize=256)
def factorized_expression(in_shape, out_shape, ranks, num_blocks, batch):
    """The cached contraction of a ``(batch, *in_shape)`` input with core and factors, its flop cost,
    its largest intermediate and the elements it moves (the input and every intermediate). The order is
    searched once per power-of-two bucket of batch sizes (the search costs 10-30 ms), then compiled for
    the exact batch."""
    path = _factorized_path(in_shape, out_shape, ranks, num_blocks, 1 << max(batch - 1, 0).bit_length())
    eq, shapes = _factorized_equation(in_shape, out_shape, ranks, num_blocks, batch)
    _, info = opt_einsum.contract_path(eq, *shapes, shapes=True, optimize=path)
    expression = opt_einsum.contract_expression(eq, *shapes, optimize=path)
    elements = batch * math.prod(in_shape) + sum(info.size_list)
    return expression, int(info.opt_cost), int(info.largest_intermediate), int(elements)


@functools.lru_cache(maxsize=256)
def factorized_contraction_steps(in_shape, out_shape, ranks, num_blocks, batch) -> tuple:
    """The pairwise steps of ``factorized_expression``'s path: ``((positions, equation), ...)``, where each
    step pops the operands at ``positions`` (of ``[x, core, *factors]`` and the results appended so far)
    and appends ``torch.einsum(equation, *popped)`` (a traced call runs these, see bt_trace.py)."""
    path = _factorized_path(in_shape, out_shape, ranks, num_blocks, 1 << max(batch - 1, 0).bit_length())
    eq, shapes = _factorized_equation(in_shape, out_shape, ranks, num_blocks, batch)
    _, info = opt_einsum.contract_path(eq, *shapes, shapes=True, optimize=path)
    return tuple((tuple(step[0]), step[2]) for step in info.contraction_list)


@functools.lru_cache(maxsize=64)
def rebuild_expression(in_shape, out_shape, ranks, num_blocks):
    """The cached contraction of core and factors into the ``(*in_shape, *out_shape)`` tensor, and its cost."""
    terms, x_term, y_term = _operand_terms(len(in_shape))
    shapes = _weight_shapes(in_shape, out_shape, ranks, num_blocks)
    eq = ",".join(terms) + "->" + x_term[1:] + y_term[1:]
    _, info = opt_einsum.contract_path(eq, *shapes, shapes=True, optimize="dp")
    return opt_einsum.contract_expression(eq, *shapes, optimize=info.path), int(info.opt_cost)


# Pairwise contractions of cores, factors and input are small and memory-bound: per flop they run
# several times slower than one dense GEMM (3.5x-11x measured on the development CPU for the
# opt_einsum path, 2.2-2.3x for the GEMM chain at the UCF11 setting, experiments/bt_speed.py). Their
# flops (the factorized path, and the rebuild of W) count this many times over when compared with the
# GEMM of the dense path; the one penalty for both methods errs towards the dense path for the chain.
FACTORIZED_FLOP_PENALTY = 4.0

# The dense path rebuilds W with one GEMM of inner size N * R_0 into a reused buffer (bt_dense.py), then
# multiplies. Its rebuild flops, forward and backward, cost 2.0x (UCF11) to 5.9x (16x12x8x8, N=4) the
# time per flop of the dense layer's own GEMMs (experiments/bt_speed.py settings, CPU); 2 is the value
# with which all the measured settings pick their fastest path (the dense path at 16x12x8x8: 98 ms
# against 172 ms for opt_einsum and 235 ms for the chain; the chain at UCF11: 58 ms against 332 ms).
REBUILD_FLOP_PENALTY = 2.0

# Flops alone missed where the factorized path's small ops move many elements per flop: at 1,600 ->
# 16x4x2x2 (N=2, R=2, batch 256, the moving-digits BTLSTM of experiments/bt_lstm.py) the chain has 8.6x
# fewer flops than the dense matmul yet took 10.1 ms forward+backward against the dense path's 6.4 (1 thread,
# development CPU). So every element a path writes costs this many flops of the dense GEMM (a GEMM at
# ~100 GFLOP/s against small ops moving ~1 G elements/s): on the factorized side the input and every
# intermediate and permute copy (``gemm_chain_elements``, or opt_einsum's intermediates), on the dense side
# the weight (built, then copied or multiplied in slices). With 100, "auto" takes the measured fastest path (or
# one within 4%: 8 -> 256 at R=1, batch 256, 1.14 against 1.10 ms) at all 16 settings timed for it, from
# 8 -> 256 to 57,600 -> 1,024 and batches 6 to 4,096 (a close estimate: 16x12x8x8 -> 16x4x4x4, N=4, batch 128,
# 1.4x in favour of the rebuilt W, measured 2.3x).
ELEMENT_FLOPS = 100.0

# The GEMM chain on two merged groups of modes (``chain_plan``) runs two GEMMs with inner sizes in the tens to
# hundreds instead of one small GEMM per mode and sample: its flops count half the penalty of the others. At
# 1,600 -> 16x4x2x2, N=2, R=2, batch 256 it has 2.3x the flops of the chain over 4 modes and ran 1.4x faster.
GROUPED_CHAIN_FLOP_PENALTY = 2.0
# ... and its merged factors are rebuilt on every call (Kronecker products, with their backward): a fixed cost
# that small batches do not repay (measured slower than the chain over all modes at 16x16x16 -> 4x4x4, batch 6,
# and at 1,600 -> 16x4x2x2, batch 32; faster at batch 256 and 1,024).
GROUPED_CHAIN_MIN_BATCH = 64

# The GEMM chain consumes the input modes from the last one, which is not always the flop-optimal
# order. It is used when it costs at most this many times the flops of the opt_einsum path: measured
# (experiments/bt_speed.py, CPU) it ran 1.3-1.8x faster than opt_einsum at 1.07x and 1.09x the flops
# (UCF11, Hollywood2 settings), and 1.5-2.5x slower at 1.38x (16x12x8x8, N=4, whose last mode of 8
# grows to N J R = 64 columns).
GEMM_CHAIN_MAX_EXTRA_FLOPS = 1.15


# The low-rank path (bt_lowrank.py): its one large GEMM (input by the rest of the block term) counts this many
# flops of the dense GEMM, its per-row GEMMs and the build of that operand count FACTORIZED_FLOP_PENALTY, and
# each of the d - 1 pairwise contractions building the operand (forward and backward: ~15 small ops, 0.5 ms in
# all at d = 4 whatever the batch) a fixed LOWRANK_STEP_FLOPS. Fitted on 20 settings timed forward+backward on
# 1 thread (1,600 -> 256 at R = 1, 2, 4 and batches 32-1,024; 4,096 -> 64; 12,288 -> 1,024; 57,600 -> 256 and
# -> 1,024; 8 -> 256): "auto" then takes the fastest path, or one at most 1.13x its time (4,096 -> 64, R=2,
# batch 6: 0.69 against 0.61 ms; R=4, batch 64: 2.31 against 2.12). With a penalty of 1 it took the low-rank
# path at 57,600 = 8x20x20x18 -> 1,024, batch 96: 127 ms against the chain's 94.
LOWRANK_GEMM_FLOP_PENALTY = 1.3
LOWRANK_STEP_FLOPS = 7.5e6


@functools.lru_cache(maxsize=256)
def chain_plan(in_shape, out_shape, ranks, num_blocks, batch) -> tuple:
    """``(split, flops, elements)`` of the cheapest GEMM chain (``split`` as ``gemm_chain_contract`` takes it):
    over all ``d`` modes (``None``), or, for ``d > 2``, over two merged groups of modes, weighed as ``"auto"``
    weighs paths (``FACTORIZED_FLOP_PENALTY``, or ``GROUPED_CHAIN_FLOP_PENALTY`` for two merged modes, x flops
    + ``ELEMENT_FLOPS`` x elements, the merged factors' elements included)."""
    key = (in_shape, out_shape, ranks, num_blocks, batch)
    plans = [(None, gemm_chain_flops(*key), gemm_chain_elements(*key), FACTORIZED_FLOP_PENALTY)]
    for split in range(1, len(in_shape)) if len(in_shape) > 2 and batch >= GROUPED_CHAIN_MIN_BATCH else ():
        shapes = grouped_shapes(in_shape, out_shape, ranks, split)
        merged = num_blocks * sum(i * j * r for i, j, r in zip(*shapes))
        plans.append((split, gemm_chain_flops(*shapes, num_blocks, batch),
                      gemm_chain_elements(*shapes, num_blocks, batch) + merged, GROUPED_CHAIN_FLOP_PENALTY))
    return min(plans, key=lambda plan: plan[3] * plan[1] + ELEMENT_FLOPS * plan[2])[:3]


@functools.lru_cache(maxsize=256)
def factorized_method(in_shape, out_shape, ranks, num_blocks, batch) -> str:
    """``"gemm"`` or ``"einsum"``: how ``contraction="factorized"`` contracts a batch of this size. The chain
    over all modes is used within ``GEMM_CHAIN_MAX_EXTRA_FLOPS`` of opt_einsum's flops; where ``chain_plan``
    prefers two merged modes, that chain is used if it passes the same test or weighs no more than the
    opt_einsum path (flops and elements, as ``"auto"`` weighs them)."""
    if len(in_shape) < 2:
        return "einsum"
    key = (in_shape, out_shape, ranks, num_blocks, batch)
    _, einsum_flops, _, einsum_elements = factorized_expression(*key)
    if gemm_chain_flops(*key) <= GEMM_CHAIN_MAX_EXTRA_FLOPS * einsum_flops:
        return "gemm"
    split, flops, elements = chain_plan(*key)
    weigh = GROUPED_CHAIN_FLOP_PENALTY * flops + ELEMENT_FLOPS * elements
    return "gemm" if split is not None and weigh <= (FACTORIZED_FLOP_PENALTY * einsum_flops
                                                     + ELEMENT_FLOPS * einsum_elements) else "einsum"


def contraction_costs(in_shape, out_shape, ranks, num_blocks, batch) -> dict:
    """Flop estimates of the forward pass: the opt_einsum path (``"einsum"``), the GEMM chain
    (``"gemm"``, ``chain_plan``'s, ``None`` for d = 1), the factorized method in use (``"factorized"``, the one of those
    two that ``factorized_method`` picks), the rebuild of W and the dense matmul with W, and the low-rank path
    (``"lowrank"``, bt_lowrank.py). The backward pass costs about twice the forward for any choice. Also the
    elements each side moves (``"factorized_elements"``, ``"dense_elements"``, ``"lowrank_elements"``) and the
    three totals ``contraction="auto"`` compares, in flops of the dense GEMM (``"auto_factorized"``,
    ``"auto_dense"``, ``"auto_lowrank"``; see :func:`auto_method`)."""
    key = (in_shape, out_shape, ranks, num_blocks, batch)
    einsum = factorized_expression(*key)[1]
    _, gemm, gemm_elements = chain_plan(*key) if len(in_shape) >= 2 else (None, None, None)
    chain = factorized_method(*key) == "gemm"
    lowrank_gemm, lowrank_small, lowrank_elements = lowrank_costs(*key)
    cost = {"factorized": gemm if chain else einsum, "einsum": einsum, "gemm": gemm,
            "rebuild": rebuild_expression(in_shape, out_shape, ranks, num_blocks)[1],
            "matmul": 2 * batch * math.prod(in_shape) * math.prod(out_shape),
            "lowrank": lowrank_gemm + lowrank_small,
            "factorized_elements": gemm_elements if chain else factorized_expression(*key)[3],
            "dense_elements": math.prod(in_shape) * math.prod(out_shape), "lowrank_elements": lowrank_elements}
    grouped = chain and chain_plan(*key)[0] is not None
    cost["auto_factorized"] = ((GROUPED_CHAIN_FLOP_PENALTY if grouped else FACTORIZED_FLOP_PENALTY) * cost["factorized"]
                               + ELEMENT_FLOPS * cost["factorized_elements"])
    cost["auto_dense"] = (REBUILD_FLOP_PENALTY * cost["rebuild"] + cost["matmul"]
                          + ELEMENT_FLOPS * cost["dense_elements"])
    cost["auto_lowrank"] = (LOWRANK_GEMM_FLOP_PENALTY * lowrank_gemm + FACTORIZED_FLOP_PENALTY * lowrank_small
                            + ELEMENT_FLOPS * lowrank_elements + LOWRANK_STEP_FLOPS * (len(in_shape) - 1))
    return cost


@functools.lru_cache(maxsize=256)
def auto_method(in_shape, out_shape, ranks, num_blocks, batch) -> str:
    """The rule of ``contraction="auto"``: ``"dense"``, ``"lowrank"`` or ``"factorized"``, whichever weighs least
    in ``contraction_costs`` (penalised flops plus ``ELEMENT_FLOPS`` x elements moved; ties go in that order:
    the dense path's GEMMs are the large, efficient ones)."""
    cost = contraction_costs(in_shape, out_shape, ranks, num_blocks, batch)
    return min(("dense", "lowrank", "factorized"), key=lambda method: cost[f"auto_{method}"])


def dense_is_cheaper(in_shape, out_shape, ranks, num_blocks, batch) -> bool:
    """Whether ``contraction="auto"`` rebuilds W for ``batch`` rows (:func:`auto_method`)."""
    return auto_method(in_shape, out_shape, ranks, num_blocks, batch) == "dense"


def contraction_method(in_shape, out_shape, ranks, num_blocks, contraction, batch) -> str:
    """``"dense"``, ``"lowrank"``, ``"gemm"`` or ``"einsum"``: how a layer set to ``contraction`` contracts
    ``batch`` rows."""
    method = auto_method(in_shape, out_shape, ranks, num_blocks, batch) if contraction == "auto" else contraction
    if method in ("dense", "lowrank"):
        return method
    if batch == 0:  # the chain reshapes by the batch size
        return "einsum"
    if method in ("gemm", "einsum"):
        return method
    return factorized_method(in_shape, out_shape, ranks, num_blocks, batch)
