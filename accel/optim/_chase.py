"""Chart-and-chase: the part of inconsistent training shared by :class:`ISGD` and :class:`Inconsistent`.

One step: evaluate the closure, agree on the (all-reduced) batch loss, let the host optimizer take its regular
step, and -- when the control chart says the batch is under-trained -- chase it with extra closure calls, each
followed by a step on the gradient of the conservative subproblem

    min_w  1/2 (loss(w) - limit)^2 + epsilon / (2 n_w) ||w - w_anchor||^2.

The host optimizer only supplies two callables: its regular update and its chase update (which consumes the
subproblem gradient this module writes into ``p.grad``).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterable

import torch
from torch import Tensor

from accel.optim.amp import scaling_enabled, unscale_and_check
from accel.optim.charts import chart_from_state, make_chart
from accel.optim.integrations import refuse_unsupported

__all__ = ["ChaseEngine", "NONFINITE_POLICIES", "CHASE_STEPS", "CLOSURE_REQUIRED", "group_sign", "use_foreach",
           "reduction_device"]

NONFINITE_POLICIES = ("skip", "step", "raise")
CHASE_STEPS = ("gradient", "polyak")
CLOSURE_REQUIRED = (
    "{name}.step() needs the closure: opt.step(closure), where closure() zeroes the grads, computes the loss, calls "
    "loss.backward() and returns the loss (a chase re-evaluates the batch). With fp16 loss scaling use "
    "opt.step(closure, grad_scaler=scaler) or accel.optim.ClosureGradScaler; under Lightning's 16-mixed, "
    "Trainer(plugins=[accel.optim.integrations.lightning.ChaseMixedPrecision('16-mixed', device)])")


def use_foreach(group: dict[str, Any], params: list[Tensor]) -> bool:
    """``group["foreach"]`` if set, else torch.optim's default: foreach when every tensor is on CUDA."""
    foreach = group.get("foreach")
    if foreach is None:
        return bool(params) and all(p.is_cuda for p in params)
    return bool(foreach)


def group_sign(param_groups: Iterable[dict[str, Any]]) -> float:
    """+1 for minimisation, -1 when every group has ``maximize=True``; mixed groups are refused."""
    flags = {bool(group.get("maximize", False)) for group in param_groups}
    if len(flags) > 1:
        raise ValueError("inconsistent training needs one objective: param groups mix maximize=True and False")
    return -1.0 if flags == {True} else 1.0


def squared_norm(tensors: list[Tensor]) -> float:
    """Sum of squares of all ``tensors`` in float64, one host transfer per device."""
    by_device: dict[torch.device, list[Tensor]] = {}
    for tensor in tensors:
        by_device.setdefault(tensor.device, []).append(tensor)
    total = 0.0
    for same_device in by_device.values():
        total += float(torch.stack([t.double().pow(2).sum() for t in same_device]).sum())
    return total


def reduction_device(backend: str, loss: Any) -> torch.device:
    """Where the loss all-reduce runs: nccl reduces only CUDA tensors (the current device), others the loss's own."""
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return loss.device if isinstance(loss, Tensor) else torch.device("cpu")


class ChaseEngine:
    """The control chart, the counters, the optional history, and the chase loop (see the module docstring).

    Arguments are those of :class:`accel.optim.ISGD` of the same names; :class:`ISGD` documents them.
    """

    def __init__(self, *, sigma: float, window: int, warmup: int | None, max_chase: int, epsilon: float,
                 nonfinite: str, process_group: Any, history: bool, chart: str = "shewhart",
                 chase_step: str = "gradient") -> None:
        if isinstance(max_chase, bool) or not isinstance(max_chase, int) or max_chase < 0:
            raise ValueError(f"max_chase must be an int >= 0, got {max_chase!r}")
        if not isinstance(epsilon, (int, float)) or not math.isfinite(epsilon) or epsilon < 0:
            raise ValueError(f"epsilon must be a finite number >= 0, got {epsilon!r}")
        if nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"nonfinite must be one of {NONFINITE_POLICIES}, got {nonfinite!r}")
        if chase_step not in CHASE_STEPS:
            raise ValueError(f"chase_step must be one of {CHASE_STEPS}, got {chase_step!r}")
        self.chart = make_chart(chart, window=window, sigma=sigma, warmup=warmup)
        self.chase_step = chase_step
        self.max_chase = max_chase
        self.epsilon = float(epsilon)
        self.nonfinite = nonfinite
        self.process_group = process_group
        self.counters = {"batches": 0, "chased_batches": 0, "extra_passes": 0, "nonfinite": 0, "overflow_skips": 0}
        self.last_loss: Any = None  # what the closure returned on the latest step's first pass
        self.history: list[dict[str, Any]] | None = [] if history else None

    # -- the agreed loss ---------------------------------------------------------------------------
    def _group(self):
        if self.process_group is not None:
            return self.process_group
        distributed = torch.distributed
        if distributed.is_available() and distributed.is_initialized():
            return distributed.group.WORLD
        return None

    def global_loss(self, loss: Tensor | float) -> float:
        """The batch loss every rank agrees on: the mean over the process group (one scalar all-reduce).

        A NaN or inf on any rank makes the sum, hence the result, non-finite on every rank, so all ranks
        take the same branch and make the same number of closure calls: none is left waiting in an all-reduce.
        """
        group = self._group()
        if isinstance(loss, Tensor) and loss.numel() != 1:
            raise ValueError(f"the closure must return a scalar loss, got shape {tuple(loss.shape)}")
        if group is None:
            return float(loss.detach()) if isinstance(loss, Tensor) else float(loss)
        distributed = torch.distributed
        device = reduction_device(distributed.get_backend(group), loss)
        # float64 keeps the mean exact enough that every rank's chart sees the very same number
        if isinstance(loss, Tensor):
            reduced = loss.detach().reshape(()).to(device=device, dtype=torch.float64, copy=True)
        else:  # a Python float: made on the group's device (nccl cannot reduce a CPU tensor)
            reduced = torch.tensor(float(loss), dtype=torch.float64, device=device)
        distributed.all_reduce(reduced, op=distributed.ReduceOp.SUM, group=group)
        return float(reduced) / distributed.get_world_size(group)

    @staticmethod
    def _evaluate(closure: Callable[[], Any]) -> Any:
        with torch.enable_grad():
            loss = closure()
        if loss is None:
            raise RuntimeError("the closure returned None: it must zero the grads, compute the loss, "
                               "call loss.backward() and return the loss")
        return loss

    def _count_nonfinite(self, value: float, where: str) -> None:
        self.counters["nonfinite"] += 1
        if self.nonfinite == "raise":
            raise FloatingPointError(f"non-finite batch loss {value} at {where} "
                                     f"(batch {self.counters['batches'] - 1}); nonfinite='raise'")

    # -- one optimizer step ------------------------------------------------------------------------
    def step(self, closure: Callable[[], Any], optimizer: torch.optim.Optimizer, regular_update: Callable[[], None],
             chase_update: Callable[[], None], grad_scaler: Any = None) -> Any:
        """Evaluate ``closure``, take the regular update, chase if the chart fires; return the closure's loss.

        With an enabled ``grad_scaler`` every pass's grads are unscaled and checked; a pass with inf/NaN grads
        makes no update, and the scale is updated between passes (the caller's ``update()`` takes the last one).
        """
        if closure is None:
            raise RuntimeError(CLOSURE_REQUIRED.format(name=type(optimizer).__name__))
        param_groups = optimizer.param_groups
        refuse_unsupported(closure, type(optimizer).__name__)
        scaler = grad_scaler if scaling_enabled(grad_scaler) else None
        sign = group_sign(param_groups)
        loss = self._evaluate(closure)
        finite_grads = unscale_and_check(scaler, optimizer) if scaler is not None else True
        self.last_loss = loss.detach() if isinstance(loss, Tensor) else loss  # never keep the graph alive
        value = sign * self.global_loss(loss)  # what the chart watches: always "lower is better"
        self.counters["batches"] += 1
        center, limit, warm = self.chart.center, self.chart.limit, self.chart.warm
        if not math.isfinite(value):
            self._count_nonfinite(value, "the regular pass")
            if self.nonfinite == "step" and finite_grads:
                regular_update()
            self._record(value, center, limit, warm, chased=False, passes=0, final=value)
            return loss
        # compare against the window *before* adding the loss: inside its own window of n a value
        # can reach a z-score of at most (n-1)/sqrt(n) and would partly hide itself
        chased = self.chart.exceeds(value)
        if finite_grads:
            regular_update()
        else:  # GradScaler's contract: an overflowed step is skipped whole; the scale backs off first
            self.counters["overflow_skips"] += 1
            chased = False
        passes, final = 0, value
        if chased:
            self.counters["chased_batches"] += 1
            passes, final = self._chase(closure, optimizer, limit, chase_update, sign, scaler)
        # the chart records the batch's loss as first seen, so chasing never biases the statistics downwards
        self.chart.observe(value)
        self._record(value, center, limit, warm, chased=chased, passes=passes, final=final)
        return loss

    def _chase(self, closure, optimizer, limit, chase_update, sign, scaler) -> tuple[int, float]:
        param_groups = optimizer.param_groups
        params = [p for group in param_groups for p in group["params"]]
        n_weights = sum(p.numel() for p in params)
        anchors = {p: p.detach().clone() for p in params}
        passes, final = 0, math.nan
        for _ in range(self.max_chase):
            if scaler is not None:
                scaler.update()  # close the previous pass: its inf/NaN record sets the scale of this one
            loss = self._evaluate(closure)
            finite_grads = unscale_and_check(scaler, optimizer) if scaler is not None else True
            value = sign * self.global_loss(loss)
            passes += 1
            self.counters["extra_passes"] += 1
            if not math.isfinite(value):
                self._count_nonfinite(value, "a chase pass")
                break
            final = value
            if value <= limit:
                break
            if not finite_grads:  # skipped like an overflowed step; the next pass runs at the backed-off scale
                self.counters["overflow_skips"] += 1
                continue
            if self.write_subproblem_gradient(param_groups, anchors, value - limit, n_weights, sign):
                chase_update()
        return passes, final

    def write_subproblem_gradient(self, param_groups, anchors: dict[Tensor, Tensor], excess: float,
                                  n_weights: int, sign: float) -> bool:
        r"""Overwrite ``p.grad`` with the (capped) gradient of the conservative subproblem; False if all grads are 0.

        ``d = s * (excess * grad + epsilon / n_w * (w - w_anchor))`` with
        ``s = min(1, 1 / sum_groups(lr * ||grad||^2))``. Without ``s`` this is the paper's step; ``s`` caps
        ``lr * d`` at the Polyak step length, where the first-order model of the loss lands exactly on the limit
        instead of beyond it. Under a squared loss an outlier batch has ``excess ~ e^2`` and ``grad ~ e``: the
        plain step grows like ``e^3`` and explodes, the capped one grows like ``e`` (a Gauss-Newton step).
        ``s`` does not depend on the excess, so near the limit the step still shrinks with it.
        With ``chase_step="polyak"``, ``s = 1 / sum_groups(lr * ||grad||^2)`` always: every chase step is the full
        Polyak step, the one whose first-order model lands exactly on the limit (still never beyond it).
        For ``maximize`` groups (``sign = -1``) the sign is folded in so the group's own update descends ``d``.
        """
        weighted_square = 0.0
        for group in param_groups:
            grads = [p.grad.detach() for p in group["params"] if p.grad is not None]
            if any(g.is_sparse for g in grads):
                raise RuntimeError("inconsistent training does not support sparse gradients in a chase")
            weighted_square += float(group["lr"]) * squared_norm(grads)
        if weighted_square == 0.0:
            return False
        if self.chase_step == "polyak":
            scale = 1.0 / weighted_square
        else:
            scale = 1.0 / weighted_square if weighted_square > 1.0 else 1.0
        grad_coefficient = scale * excess
        anchor_coefficient = scale * self.epsilon / n_weights * sign
        for group in param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            if use_foreach(group, params):
                torch._foreach_mul_(grads, grad_coefficient)
                if anchor_coefficient != 0.0:
                    offsets = torch._foreach_sub([p.detach() for p in params], [anchors[p] for p in params])
                    torch._foreach_add_(grads, offsets, alpha=anchor_coefficient)
            else:
                for p, grad in zip(params, grads):
                    grad.mul_(grad_coefficient)
                    if anchor_coefficient != 0.0:
                        grad.add_(p.detach() - anchors[p], alpha=anchor_coefficient)
        return True

    # -- bookkeeping -------------------------------------------------------------------------------
    def _record(self, value: float, center: float, limit: float, warm: bool, *, chased: bool, passes: int,
                final: float) -> None:
        # center line and limit as the batch was judged against them (before it entered the window);
        # "mean" repeats the center line under the key plot_control_chart and saved histories also read
        if self.history is None:
            return
        self.history.append({"step": self.counters["batches"] - 1, "loss": value, "center": center, "mean": center,
                             "limit": limit,
                             "warm": warm, "chased": chased, "extra_passes": passes,
                             "final_loss": final})

    @property
    def stats(self) -> dict[str, Any]:
        counters = dict(self.counters)
        counters["extra_pass_fraction"] = counters["extra_passes"] / counters["batches"] if counters["batches"] else 0.0
        counters.update(mean=self.chart.mean, center=self.chart.center, std=self.chart.std, limit=self.chart.limit,
                        warm=self.chart.warm)
        return counters

    def state_dict(self) -> dict[str, Any]:
        return {"chart": self.chart.state_dict(), "counters": dict(self.counters), "max_chase": self.max_chase,
                "chase_step": self.chase_step,
                "epsilon": self.epsilon, "nonfinite": self.nonfinite,
                "history": None if self.history is None else [dict(h) for h in self.history]}

    def reset(self) -> None:
        """An empty chart of the same kind and settings, zero counters, an empty history (if one is kept)."""
        self.chart = make_chart(self.chart.kind, window=self.chart.window, sigma=self.chart.sigma,
                                warmup=self.chart.warmup)
        self.counters = dict.fromkeys(self.counters, 0)
        self.last_loss = None
        if self.history is not None:
            self.history = []

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.chart = chart_from_state(state_dict["chart"])
        self.counters = {key: int(state_dict["counters"].get(key, 0)) for key in self.counters}
        self.chase_step = state_dict.get("chase_step", "gradient")
        self.max_chase = int(state_dict["max_chase"])
        self.epsilon = float(state_dict["epsilon"])
        self.nonfinite = state_dict["nonfinite"]
        history = state_dict.get("history")  # the checkpoint decides, as it does for the other settings
        self.history = None if history is None else [dict(h) for h in history]
