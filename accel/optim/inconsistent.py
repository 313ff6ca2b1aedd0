"""Inconsistent training around any torch optimizer: ISGD's chart-and-chase, the base optimizer's own steps."""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch.optim import Optimizer

from accel.optim._chase import CLOSURE_REQUIRED, ChaseEngine

__all__ = ["Inconsistent"]


class Inconsistent(Optimizer):
    r"""Wrap ``optimizer`` so that batches the control chart flags as under-trained are chased.

    The regular update is ``optimizer.step()``. On a batch whose (all-reduced) loss lies above
    ``mean + sigma * std`` of the recent losses, up to ``max_chase`` extra closure calls follow, and after
    each one the wrapper writes the gradient of ISGD's conservative subproblem into ``p.grad``,

    ``s * ((loss - limit) * grad + (epsilon / n_w) * (w - w_anchor))``

    and lets ``optimizer.step()`` consume it, so the chase moves as the base optimizer moves (Adam's
    normalisation, its moment estimates, decoupled weight decay and all). ``s`` is the cap
    :class:`~accel.optim.ISGD` documents (``min(1, 1 / sum_groups(lr * ||grad||^2))``): for SGD-like bases
    it bounds the step at the Polyak length; an adaptive base bounds its step by itself, and ``s`` then
    limits how much a far-off batch inflates its second-moment estimate. Every other choice (order,
    window, warm-up, anchor, non-finite losses, distributed agreement) is ISGD's; see its docstring.

    The wrapper shares ``param_groups`` and ``state`` with the base optimizer, so LR schedulers may be
    attached to either; they count the wrapper's :meth:`step` calls (or the user's ``scheduler.step()``),
    never the chase's inner base steps. Base optimizers that need a closure themselves (LBFGS) are refused.

    Args:
        optimizer (Optimizer): the base optimizer (e.g. ``torch.optim.AdamW``).
        sigma, window, warmup, max_chase, epsilon, nonfinite, process_group, history, chart, chase_step: as in
            :class:`~accel.optim.ISGD` (defaults 3.0, 100, None, 5, 0.1, ``"skip"``, None, False, ``"shewhart"``,
            ``"gradient"``).

    fp16 loss scaling, gradient accumulation and the training stacks: as for :class:`~accel.optim.ISGD`. A fused
    base optimizer (``AdamW(fused=True)``) works: the wrapper unscales the grads itself before the base steps.

    Example:
        >>> opt = Inconsistent(torch.optim.AdamW(model.parameters(), lr=1e-3))  # doctest: +SKIP
        >>> loss = opt.step(closure)  # doctest: +SKIP
    """

    _steps_scaled_closures = True  # step(closure, grad_scaler=...): see accel.optim.amp

    def __init__(self, optimizer: Optimizer, *, sigma: float = 3.0, window: int = 100, warmup: int | None = None,
                 max_chase: int = 5, epsilon: float = 0.1, nonfinite: str = "skip", process_group: Any = None,
                 history: bool = False, chart: str = "shewhart", chase_step: str = "gradient") -> None:
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"Inconsistent wraps a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if isinstance(optimizer, torch.optim.LBFGS):
            raise TypeError("Inconsistent cannot wrap LBFGS: it needs its own closure for every step")
        self._chase = ChaseEngine(sigma=sigma, window=window, warmup=warmup, max_chase=max_chase,
                                  epsilon=epsilon, nonfinite=nonfinite, process_group=process_group,
                                  history=history, chart=chart, chase_step=chase_step)
        self.optimizer = optimizer
        super().__init__(optimizer.param_groups, optimizer.defaults)
        # share, do not copy: scheduler changes to lr and add_param_group reach the base optimizer
        self.param_groups = optimizer.param_groups
        self.state = optimizer.state

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if hasattr(self, "optimizer") and self.param_groups is self.optimizer.param_groups:
            self.optimizer.add_param_group(param_group)
        else:  # during Optimizer.__init__, which re-registers the base groups on a scratch list
            super().add_param_group(param_group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    @property
    def chart(self):
        """The :class:`~accel.optim.ControlChart` driving the chase decisions."""
        return self._chase.chart

    @property
    def stats(self) -> dict[str, Any]:
        """As :attr:`ISGD.stats <accel.optim.ISGD.stats>`."""
        return self._chase.stats

    @property
    def history(self) -> list[dict[str, Any]] | None:
        """As :attr:`ISGD.history <accel.optim.ISGD.history>`."""
        return self._chase.history

    @property
    def last_loss(self) -> Any:
        """As :attr:`ISGD.last_loss <accel.optim.ISGD.last_loss>`."""
        return self._chase.last_loss

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None, *, grad_scaler: Any = None) -> Any:  # type: ignore[override]
        """Regular ``optimizer.step()``, then a chase if the chart fires.

        Args:
            closure (Callable): zeroes the grads, computes the loss, calls ``backward()`` and returns the loss.
                Required: a chase re-evaluates the same batch.
            grad_scaler (torch.amp.GradScaler, optional): as in :meth:`ISGD.step <accel.optim.ISGD.step>`.
        """
        if closure is None:
            raise RuntimeError(CLOSURE_REQUIRED.format(name=type(self).__name__))
        return self._chase.step(closure, self, self.optimizer.step, self.optimizer.step, grad_scaler)

    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state dict plus the chart, the counters and the history under ``"chase"``."""
        state = self.optimizer.state_dict()
        state["chase"] = self._chase.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a state from :meth:`state_dict`.

        The base optimizer's own state dict (no ``"chase"`` entry) is accepted too, to switch from the plain optimizer
        mid-run: the base optimizer's state is restored, and the chart starts empty (as do the counters and the
        history) with this wrapper's chart settings.
        """
        state_dict = dict(state_dict)
        chase = state_dict.pop("chase", None)
        self.optimizer.load_state_dict(state_dict)
        self.param_groups = self.optimizer.param_groups
        self.state = self.optimizer.state
        if chase is None:
            self._chase.reset()
        else:
            self._chase.load_state_dict(chase)

    def __getstate__(self) -> dict[str, Any]:
        # torch.optim.Optimizer pickles only defaults, state and param_groups: keep the base and the chart too
        return {**super().__getstate__(), "_chase": self._chase, "optimizer": self.optimizer}

    def __repr__(self) -> str:
        return f"Inconsistent({self.optimizer!r}, chart={self.chart!r})"
