"""ISGD: Inconsistent Stochastic Gradient Descent (Wang, Yang, Min, Chakradhar, arXiv 1603.05544)."""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor
from torch.optim import SGD

from accel.optim._chase import CLOSURE_REQUIRED, ChaseEngine, group_sign, use_foreach

__all__ = ["ISGD"]


class ISGD(SGD):
    r"""Stochastic gradient descent that spends extra passes on the batches it under-trains.

    Every :meth:`step` makes the regular update of :class:`torch.optim.SGD` (it is a subclass taking the same
    arguments, a Tensor ``lr``, ``fused`` and ``differentiable`` included, and its regular update is
    :meth:`torch.optim.SGD.step` itself, run on the same param groups and state). A control chart then judges the batch loss against the recent ones; a
    batch whose loss lies above ``limit = mean + sigma * std`` is *under-trained* and ISGD *chases* it: up to
    ``max_chase`` more closure calls on the same batch, each followed by a step on the gradient of

    .. math::
        \min_w\ \tfrac12\,(\ell(w) - \text{limit})^2 + \tfrac{\epsilon}{2 n_w}\,\lVert w - w_{\text{anchor}}\rVert^2,

    that is ``w -= lr * s * ((loss - limit) * grad + (epsilon / n_w) * (w - w_anchor))``, stopping as soon as
    the batch loss is back under the limit. ``n_w`` is the number of parameters ISGD optimizes.

    Choices the paper leaves open, and why:

    * **Order.** The chart judges the loss *before* it enters the window, then records it. A loss inside its
      own window of ``n`` can reach a z-score of at most ``(n - 1) / sqrt(n)`` (2.85 for ``n = 10``), so
      judging it against a window that holds it would hide the very outliers the chart exists to catch.
      The regular update comes first, so with the chart silent the trajectory is exactly SGD's, and the
      chase starts from the updated weights. The chart records the loss as first seen, not the chased one,
      so chasing never drags the statistics down.
    * **Window and warm-up.** ``window=100`` batch losses by default; the paper keeps one epoch
      (batches per epoch) with every batch recurring once per epoch: pass that when you know it. The
      chart is warm, and may start a chase, once the window is full (``warmup=None``): a limit fitted to
      the first few steps, where the loss falls fastest, would flag ordinary batches.
    * **Anchor.** ``w_anchor`` is the weights at the start of the chase (after the regular update): the
      proximal term keeps one batch from dragging the model far from where consistent training left it.
    * **Stability** (``s``). The factor ``loss - limit`` is unbounded: under a squared loss an outlier batch
      has ``loss - limit ~ e^2`` and ``grad ~ e``, and the plain step grows like ``e^3`` and a few chase
      steps can blow the loss up by orders of magnitude. ISGD caps the step at the Polyak step length,
      ``s = min(1, 1 / sum_groups(lr * ||grad||^2))``: the first-order model of the loss then lands on the
      limit, never beyond it, and the capped step grows like ``e`` (a Gauss-Newton step). ``s = 1``, the
      paper's step, whenever ``lr * ||grad||^2 <= 1``, which is the usual regime.
    * The chase step uses neither momentum nor weight decay and does not touch the momentum buffers: it
      solves the subproblem, it is not a training step. It does not advance LR schedulers either (they
      count :meth:`step` calls, and a chase is part of one).

    Non-finite losses (NaN/inf, on any rank) never enter the chart and never start a chase; they are
    counted in :attr:`stats` and ``nonfinite`` says what happens to the update. A non-finite loss during a
    chase ends the chase without an update.

    Under ``torch.distributed`` (DDP or a manual gradient all-reduce) the loss that feeds the chart and
    every chase decision is the mean over the process group (one scalar all-reduce per closure call), so
    every rank makes the same number of forward/backward passes and the collective calls inside them match.

    Mixed precision: ``torch.autocast(dtype=torch.bfloat16)`` inside the closure works as is. fp16 with dynamic loss
    scaling: ``step(closure, grad_scaler=scaler)`` with the closure calling ``scaler.scale(loss).backward()``, then
    ``scaler.update()``; every pass is unscaled and checked, a pass with inf/NaN grads makes no update (an
    overflowed regular pass skips the whole step, chase included), and the scale is updated between passes.
    :class:`~accel.optim.ClosureGradScaler` offers the same as ``scaler.step(opt, closure)`` (and so serves
    accelerate). Under Lightning's automatic optimization use the plugins of
    :mod:`accel.optim.integrations.lightning` (``ChasePrecision``, ``ChaseMixedPrecision`` for "16-mixed" and
    "bf16-mixed").

    Gradient accumulation: the closure must cover every micro-batch of the step (a chase re-runs them all), see
    :func:`~accel.optim.accumulating_closure`, which also works under accelerate's ``gradient_accumulation_steps > 1``
    when the step is called once per batch outside ``accelerator.accumulate()``. Lightning's
    ``accumulate_grad_batches > 1`` and any other closure under ``gradient_accumulation_steps > 1`` cannot be chased
    correctly and raise at the first step (see :mod:`accel.optim.integrations`).

    ``differentiable=True``: the regular update is differentiable as SGD's is; chase updates are too (same grad
    mode), but the subproblem gradient is built from ``p.grad`` values, not differentiated through.

    Args:
        params (iterable): iterable of parameters or dicts defining parameter groups.
        lr (float or Tensor, optional): learning rate (default: 1e-3).
        momentum (float, optional): momentum factor (default: 0).
        dampening (float, optional): dampening for momentum (default: 0).
        weight_decay (float, optional): weight decay (L2 penalty) (default: 0).
        nesterov (bool, optional): enables Nesterov momentum (default: False).
        maximize (bool, optional): maximize the objective instead of minimizing; the chart then watches the
            negated objective, so a batch far *below* the others is the under-trained one (default: False).
        foreach (bool, optional): use the ``torch._foreach_*`` implementation; ``None`` picks it when all
            params are on CUDA, as :class:`torch.optim.SGD` does (default: None).
        differentiable (bool, optional): whether autograd should occur through the regular update (default: False).
        fused (bool, optional): use SGD's fused kernel for the regular update (default: None).
        sigma (float, optional): width of the control limit in standard deviations, > 0 (default: 3.0).
        window (int, optional): number of recent batch losses in the chart, >= 2 (default: 100).
        warmup (int, optional): losses observed before the chart may start a chase, in ``[2, window]``;
            ``None`` waits for a full window (default: None).
        max_chase (int, optional): most extra closure calls per batch, >= 0; 0 disables chasing (default: 5).
        epsilon (float, optional): weight of the proximal term, >= 0; the paper prefers 0.1 (default: 0.1).
        nonfinite (str, optional): update on a non-finite batch loss: ``"skip"`` (no update; the default),
            ``"step"`` (the regular update anyway, as SGD would) or ``"raise"`` (``FloatingPointError``).
        process_group (ProcessGroup, optional): group whose mean loss drives the chart; ``None`` means the
            default group when ``torch.distributed`` is initialized, else the local loss (default: None).
        history (bool, optional): keep one record per step in :attr:`history` for
            :func:`accel.optim.plot_control_chart` (default: False).
        chart (str, optional): ``"shewhart"``, the paper's limit ``mean + sigma * std`` of the window, or
            ``"residual"``, ``trend + sigma * residual std`` around a line fitted over the window, whose limit follows
            a falling loss (:class:`~accel.optim.ResidualChart`) (default: "shewhart").
        chase_step (str, optional): ``"gradient"``, the paper's gradient step on the subproblem (capped at the
            Polyak length), or ``"polyak"``, always the full Polyak step to the limit (default: "gradient").

    Example:
        >>> opt = ISGD(model.parameters(), lr=0.05, momentum=0.9)  # doctest: +SKIP
        >>> def closure():
        ...     opt.zero_grad()
        ...     loss = loss_fn(model(x), y)
        ...     loss.backward()
        ...     return loss
        >>> loss = opt.step(closure)  # doctest: +SKIP
    """

    _steps_scaled_closures = True  # step(closure, grad_scaler=...): see accel.optim.amp

    def __init__(self, params, lr: float | Tensor = 1e-3, momentum: float = 0, dampening: float = 0,
                 weight_decay: float | Tensor = 0, nesterov: bool = False, *, maximize: bool = False,
                 foreach: bool | None = None, differentiable: bool = False, fused: bool | None = None,
                 sigma: float = 3.0, window: int = 100, warmup: int | None = None, max_chase: int = 5,
                 epsilon: float = 0.1, nonfinite: str = "skip", process_group: Any = None, history: bool = False,
                 chart: str = "shewhart", chase_step: str = "gradient") -> None:
        self._chase = ChaseEngine(sigma=sigma, window=window, warmup=warmup, max_chase=max_chase,
                                  epsilon=epsilon, nonfinite=nonfinite, process_group=process_group,
                                  history=history, chart=chart, chase_step=chase_step)
        super().__init__(params, lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                         nesterov=nesterov, maximize=maximize, foreach=foreach, differentiable=differentiable,
                         fused=fused)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        lr = param_group.get("lr", self.defaults["lr"])
        if lr < 0.0:
            raise ValueError(f"Invalid learning rate in param group: {lr!r}")
        super().add_param_group(param_group)

    @property
    def chart(self):
        """The :class:`~accel.optim.ControlChart` driving the chase decisions."""
        return self._chase.chart

    @property
    def stats(self) -> dict[str, Any]:
        """Batches seen, batches chased (flagged by the chart; with ``max_chase=0`` ISGD only monitors and this
        counts the flags), extra forward/backward passes (and their fraction of batches), non-finite losses, and
        the chart's current mean, std, limit and warm flag."""
        return self._chase.stats

    @property
    def history(self) -> list[dict[str, Any]] | None:
        """Per-step records (``None`` unless built with ``history=True``): loss, mean and limit it was judged
        against, whether it was chased, its extra passes and its loss at the end of the chase."""
        return self._chase.history

    @property
    def last_loss(self) -> Any:
        """What the closure returned on the latest step's first (regular) pass; ``step`` returns it too, but
        wrappers may drop it (accelerate's ``AcceleratedOptimizer.step`` returns None)."""
        return self._chase.last_loss

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None, *, grad_scaler: Any = None) -> Any:  # type: ignore[override]
        """Perform one ISGD step: the regular SGD update, then a chase if the chart fires.

        Args:
            closure (Callable): zeroes the grads, computes the loss, calls ``backward()`` and returns the loss.
                Required: a chase re-evaluates the same batch, which only the closure can do.
            grad_scaler (torch.amp.GradScaler, optional): the scaler the closure scales its loss with
                (``grad_scaler.scale(loss).backward()``); call ``grad_scaler.update()`` after the step.

        Returns:
            The loss the closure returned on its first (regular) call.
        """
        if closure is None:
            raise RuntimeError(CLOSURE_REQUIRED.format(name=type(self).__name__))
        return self._chase.step(closure, self, self._regular_update, self._chase_update, grad_scaler)

    def _regular_update(self) -> None:
        # torch.optim.SGD.step on a companion SGD that shares this optimizer's groups and state: SGD's own update
        # (kernels, differentiable mode, fused grad_scale / found_inf), while the hooks registered on this
        # optimizer run once, around ISGD.step
        companion = self.__dict__.get("_companion")
        if companion is None:
            companion = SGD([{"params": []}], lr=0.0)
            self.__dict__["_companion"] = companion
        companion.param_groups, companion.state, companion.defaults = self.param_groups, self.state, self.defaults
        for name in ("grad_scale", "found_inf"):
            if hasattr(self, name):
                setattr(companion, name, getattr(self, name))
            elif hasattr(companion, name):
                delattr(companion, name)
        companion.step()

    def _chase_update(self) -> None:
        # p.grad holds the subproblem gradient with the group's sign folded in (see ChaseEngine)
        sign = group_sign(self.param_groups)
        with torch.set_grad_enabled(self.defaults["differentiable"]):
            for group in self.param_groups:
                params = [p for p in group["params"] if p.grad is not None]
                if not params:
                    continue
                grads, alpha = [p.grad for p in params], -sign * group["lr"]
                if isinstance(alpha, Tensor):  # a Tensor lr: scale first, add_'s alpha takes numbers only
                    grads, alpha = [grad * alpha for grad in grads], 1.0
                if use_foreach(group, params) and not self.defaults["differentiable"]:
                    torch._foreach_add_(params, grads, alpha=alpha)
                else:
                    for p, grad in zip(params, grads):
                        p.add_(grad, alpha=alpha)

    def state_dict(self) -> dict[str, Any]:
        """The SGD state (momentum buffers, param groups) plus the chart, the counters and the history."""
        state = super().state_dict()
        state["chase"] = self._chase.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a state from :meth:`state_dict`; the run then continues bit-identically.

        A plain :class:`torch.optim.SGD` state dict (no ``"chase"`` entry) is accepted too, to switch optimizers
        mid-run: momentum buffers and param groups are SGD's, and the chart starts empty (as do the counters and the
        history) with this optimizer's chart settings.
        """
        state_dict = dict(state_dict)
        chase = state_dict.pop("chase", None)
        super().load_state_dict(state_dict)
        if chase is None:
            self._chase.reset()
        else:
            self._chase.load_state_dict(chase)

    def __getstate__(self) -> dict[str, Any]:
        # torch.optim.Optimizer pickles only defaults, state and param_groups: keep the chart too
        return {**super().__getstate__(), "_chase": self._chase}

