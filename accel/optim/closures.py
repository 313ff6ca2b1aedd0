"""Closures for inconsistent training: one closure per optimizer step, covering every micro-batch of it."""
from __future__ import annotations

import contextlib
from typing import Any, Callable, ContextManager, Iterable

import torch
from torch import Tensor

__all__ = ["accumulating_closure"]


def accumulating_closure(optimizer: torch.optim.Optimizer, micro_batches: Iterable[Any],
                         compute_loss: Callable[[Any], Tensor], *, backward: Callable[[Tensor], Any] | None = None,
                         no_sync: Callable[[], ContextManager] | None = None) -> Callable[[], Tensor]:
    """Gradient accumulation the way a chase needs it: the closure runs all micro-batches of one step.

    The closure zeroes the grads once, backwards ``compute_loss(micro_batch) / len(micro_batches)`` for each
    micro-batch and returns the batch's mean loss (detached). A chase calls it again, so it re-runs them all and
    every pass sees the gradient of the whole batch, exactly as one large batch would (up to summation order).

    Args:
        optimizer (Optimizer): the optimizer whose ``zero_grad`` starts each pass.
        micro_batches (iterable): the micro-batches of one step (kept as a list: every pass replays them).
        compute_loss (callable): ``micro_batch -> scalar loss`` (forward pass, autocast inside if wanted).
        backward (callable, optional): how to backward a loss: ``accelerator.backward`` under accelerate,
            ``lambda loss: scaler.scale(loss).backward()`` with a GradScaler; default ``loss.backward()``.
        no_sync (callable, optional): a context for every micro-batch but the last, where DDP need not all-reduce
            (``model.no_sync`` or ``lambda: accelerator.no_sync(model)``).

    Example:
        >>> closure = accumulating_closure(opt, [(x0, y0), (x1, y1)], lambda b: loss_fn(model(b[0]), b[1]))  # doctest: +SKIP
        >>> loss = opt.step(closure)  # doctest: +SKIP
    """
    micro_batches = list(micro_batches)
    if not micro_batches:
        raise ValueError("accumulating_closure needs at least one micro-batch")
    count = len(micro_batches)

    def closure() -> Tensor:
        optimizer.zero_grad()
        total = None
        for index, micro_batch in enumerate(micro_batches):
            loss = compute_loss(micro_batch) / count
            quiet = no_sync() if no_sync is not None and index < count - 1 else contextlib.nullcontext()
            with quiet:
                if backward is None:
                    loss.backward()
                else:
                    backward(loss)
            total = loss.detach() if total is None else total + loss.detach()
        return total

    return closure
