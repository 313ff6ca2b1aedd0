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

from accel.optim.spc import ControlChart

__all__ = ["ChaseEngine", "NONFINITE_POLICIES"]

NONFINITE_POLICIES = ("skip", "step", "raise")


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


class ChaseEngine:
    """The control chart, the counters, the optional history, and the chase loop (see the module docstring).

    Arguments are those of :class:`accel.optim.ISGD` of the same names; :class:`ISGD` documents them.
    """

    def __init__(self, *, sigma: float, window: int, warmup: int | None, max_chase: int, epsilon: float,
                 nonfinite: str, process_group: Any, history: bool) -> None:
        if isinstance(max_chase, bool) or not isinstance(max_chase, int) or max_chase < 0:
            raise ValueError(f"max_chase must be an int >= 0, got {max_chase!r}")
        if not isinstance(epsilon, (int, float)) or not math.isfinite(epsilon) or epsilon < 0:
            raise ValueError(f"epsilon must be a finite number >= 0, got {epsilon!r}")
        if nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"nonfinite must be one of {NONFINITE_POLICIES}, got {nonfinite!r}")
        self.chart = ControlChart(window=window, sigma=sigma, warmup=warmup)
        self.max_chase = max_chase
        self.epsilon = float(epsilon)
        self.nonfinite = nonfinite
        self.process_group = process_group
        self.counters = {"batches": 0, "chased_batches": 0, "extra_passes": 0, "nonfinite": 0}
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
        if not isinstance(loss, Tensor):
            if group is None:
                return float(loss)
            loss = torch.tensor(float(loss))
        if loss.numel() != 1:
            raise ValueError(f"the closure must return a scalar loss, got shape {tuple(loss.shape)}")
        if group is None:
            return float(loss.detach())
        distributed = torch.distributed
        # float64 keeps the mean exact enough that every rank's chart sees the very same number
        reduced = loss.detach().reshape(()).to(torch.float64, copy=True)
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
    def step(self, closure: Callable[[], Any], param_groups: list[dict[str, Any]],
             regular_update: Callable[[], None], chase_update: Callable[[], None]) -> Any:
        """Evaluate ``closure``, take the regular update, chase if the chart fires; return the closure's loss."""
        if closure is None:
            raise RuntimeError("inconsistent training needs a closure: step(closure) where the closure zeroes the "
                               "grads, computes the loss, calls loss.backward() and returns the loss")
        sign = group_sign(param_groups)
        loss = self._evaluate(closure)
        value = sign * self.global_loss(loss)  # what the chart watches: always "lower is better"
        self.counters["batches"] += 1
        mean, limit, warm = self.chart.mean, self.chart.limit, self.chart.warm
        if not math.isfinite(value):
            self._count_nonfinite(value, "the regular pass")
            if self.nonfinite == "step":
                regular_update()
            self._record(value, mean, limit, warm, chased=False, passes=0, final=value)
            return loss
        # compare against the window *before* adding the loss: inside its own window of n a value
        # can reach a z-score of at most (n-1)/sqrt(n) and would partly hide itself
        chased = self.chart.exceeds(value)
        regular_update()
        passes, final = 0, value
        if chased:
            self.counters["chased_batches"] += 1
            passes, final = self._chase(closure, param_groups, limit, chase_update, sign)
        # the chart records the batch's loss as first seen, so chasing never biases the statistics downwards
        self.chart.observe(value)
        self._record(value, mean, limit, warm, chased=chased, passes=passes, final=final)
        return loss

    def _chase(self, closure, param_groups, limit, chase_update, sign) -> tuple[int, float]:
        params = [p for group in param_groups for p in group["params"]]
        n_weights = sum(p.numel() for p in params)
        anchors = {p: p.detach().clone() for p in params}
        passes, final = 0, math.nan
        for _ in range(self.max_chase):
            loss = self._evaluate(closure)
            value = sign * self.global_loss(loss)
            passes += 1
            self.counters["extra_passes"] += 1
            if not math.isfinite(value):
                self._count_nonfinite(value, "a chase pass")
                break
            final = value
            if value <= limit:
                break
            self.write_subproblem_gradient(param_groups, anchors, value - limit, n_weights, sign)
            chase_update()
        return passes, final

    def write_subproblem_gradient(self, param_groups, anchors: dict[Tensor, Tensor], excess: float,
                                  n_weights: int, sign: float) -> None:
        r"""Overwrite ``p.grad`` with the (capped) gradient of the conservative subproblem.

        ``d = s * (excess * grad + epsilon / n_w * (w - w_anchor))`` with
        ``s = min(1, 1 / sum_groups(lr * ||grad||^2))``. Without ``s`` this is the paper's step; ``s`` caps
        ``lr * d`` at the Polyak step length, where the first-order model of the loss lands exactly on the limit
        instead of beyond it. Under a squared loss an outlier batch has ``excess ~ e^2`` and ``grad ~ e``: the
        plain step grows like ``e^3`` and explodes, the capped one grows like ``e`` (a Gauss-Newton step).
        ``s`` does not depend on the excess, so near the limit the step still shrinks with it.
        For ``maximize`` groups (``sign = -1``) the sign is folded in so the group's own update descends ``d``.
        """
        weighted_square = 0.0
        for group in param_groups:
            grads = [p.grad.detach() for p in group["params"] if p.grad is not None]
            if any(g.is_sparse for g in grads):
                raise RuntimeError("inconsistent training does not support sparse gradients in a chase")
            weighted_square += float(group["lr"]) * squared_norm(grads)
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

    # -- bookkeeping -------------------------------------------------------------------------------
    def _record(self, value: float, mean: float, limit: float, warm: bool, *, chased: bool, passes: int, final: float) -> None:
        # mean and limit as the batch was judged against them (before it entered the window)
        if self.history is None:
            return
        self.history.append({"step": self.counters["batches"] - 1, "loss": value, "mean": mean, "limit": limit,
                             "warm": warm, "chased": chased, "extra_passes": passes,
                             "final_loss": final})

    @property
    def stats(self) -> dict[str, Any]:
        counters = dict(self.counters)
        counters["extra_pass_fraction"] = counters["extra_passes"] / counters["batches"] if counters["batches"] else 0.0
        counters.update(mean=self.chart.mean, std=self.chart.std, limit=self.chart.limit, warm=self.chart.warm)
        return counters

    def state_dict(self) -> dict[str, Any]:
        return {"chart": self.chart.state_dict(), "counters": dict(self.counters), "max_chase": self.max_chase,
                "epsilon": self.epsilon, "nonfinite": self.nonfinite,
                "history": None if self.history is None else [dict(h) for h in self.history]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.chart.load_state_dict(state_dict["chart"])
        self.counters = {key: int(state_dict["counters"][key]) for key in self.counters}
        self.max_chase = int(state_dict["max_chase"])
        self.epsilon = float(state_dict["epsilon"])
        self.nonfinite = state_dict["nonfinite"]
        history = state_dict.get("history")  # the checkpoint decides, as it does for the other settings
        self.history = None if history is None else [dict(h) for h in history]
