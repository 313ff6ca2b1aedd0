"""A plain re-statement of ISGD, kept beside the fast one to test it against (as schedule_free keeps its reference).

Everything is written out: the SGD update as torch's documentation states it, one parameter at a time; the chart
recomputed from its window on every step with the ``statistics`` module; the chase as a for-loop. Slow on purpose,
and without the fast optimizer's extras (loss scaling, distributed agreement, non-finite policies: a non-finite
loss is skipped, the fast optimizer's default).
"""
from __future__ import annotations

import math
import statistics
from typing import Any, Callable

import torch
from torch.optim import Optimizer

__all__ = ["ReferenceISGD"]


def shewhart_limit(window: list[float], sigma: float) -> float:
    return statistics.fmean(window) + sigma * statistics.stdev(window)


def residual_limit(window: list[float], sigma: float) -> float:
    times = list(range(len(window)))
    slope, intercept = statistics.linear_regression(times, window)
    residuals = [y - (intercept + slope * t) for t, y in zip(times, window)]
    spread = math.sqrt(sum(r * r for r in residuals) / (len(window) - 2))
    return intercept + slope * len(window) + sigma * spread


class ReferenceISGD(Optimizer):
    """ISGD in plain loops; same arguments and same results as :class:`~accel.optim.ISGD` (to rounding).

    Args:
        params, lr, momentum, dampening, weight_decay, nesterov, maximize, sigma, window, warmup, max_chase,
        epsilon, chart, chase_step: as in :class:`~accel.optim.ISGD`.
    """

    def __init__(self, params, lr: float = 1e-3, momentum: float = 0.0, dampening: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False, *, maximize: bool = False, sigma: float = 3.0,
                 window: int = 100, warmup: int | None = None, max_chase: int = 5, epsilon: float = 0.1,
                 chart: str = "shewhart", chase_step: str = "gradient") -> None:
        super().__init__(params, {"lr": lr, "momentum": momentum, "dampening": dampening,
                                  "weight_decay": weight_decay, "nesterov": nesterov, "maximize": maximize})
        self.sigma, self.window, self.max_chase, self.epsilon = sigma, window, max_chase, epsilon
        self.warmup = window if warmup is None else warmup
        self.limit_of = {"shewhart": shewhart_limit, "residual": residual_limit}[chart]
        self.chase_step = chase_step
        self.losses: list[float] = []
        self.chased_steps: list[int] = []
        self.extra_passes = 0

    @torch.no_grad()
    def step(self, closure: Callable[[], Any]) -> Any:  # type: ignore[override]
        sign = -1.0 if self.param_groups[0]["maximize"] else 1.0
        with torch.enable_grad():
            loss = closure()
        value = sign * float(loss.detach() if isinstance(loss, torch.Tensor) else loss)
        if not math.isfinite(value):
            return loss
        recent = self.losses[-self.window:]
        limit = self.limit_of(recent, self.sigma) if len(recent) >= self.warmup else math.inf
        self._sgd_update()
        if value > limit:
            self.chased_steps.append(len(self.losses))
            self._chase(closure, limit, sign)
        self.losses.append(value)
        return loss

    def _sgd_update(self) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = -p.grad if group["maximize"] else p.grad.clone()
                if group["weight_decay"] != 0:
                    g = g + group["weight_decay"] * p
                if group["momentum"] != 0:
                    state = self.state[p]
                    if "momentum_buffer" not in state:
                        state["momentum_buffer"] = g.clone()
                    else:
                        state["momentum_buffer"] = (group["momentum"] * state["momentum_buffer"]
                                                    + (1 - group["dampening"]) * g)
                    buffer = state["momentum_buffer"]
                    g = g + group["momentum"] * buffer if group["nesterov"] else buffer
                p.sub_(group["lr"] * g)

    def _chase(self, closure: Callable[[], Any], limit: float, sign: float) -> None:
        params = [p for group in self.param_groups for p in group["params"]]
        n_weights = sum(p.numel() for p in params)
        anchors = {p: p.clone() for p in params}
        for _ in range(self.max_chase):
            with torch.enable_grad():
                loss = closure()
            current = sign * float(loss.detach() if isinstance(loss, torch.Tensor) else loss)
            self.extra_passes += 1
            if not math.isfinite(current) or current <= limit:
                return
            weighted_square = sum(float(group["lr"]) * float(p.grad.double().pow(2).sum())
                                  for group in self.param_groups for p in group["params"] if p.grad is not None)
            if weighted_square == 0.0:
                continue
            scale = 1.0 / weighted_square if self.chase_step == "polyak" else min(1.0, 1.0 / weighted_square)
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        p.sub_(group["lr"] * scale * (sign * (current - limit) * p.grad
                                                      + self.epsilon / n_weights * (p - anchors[p])))
