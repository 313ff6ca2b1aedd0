"""Closures for inconsistent training: one closure per optimizer step, covering every micro-batch of it."""
from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any, Callable, ContextManager, Iterable

import torch
from torch import Tensor

from accel.optim.integrations import backward_divisor, check_closure_build

__all__ = ["accumulating_closure", "micro_batch_size"]


def _leading_sizes(micro_batch: Any) -> list[int]:
    if isinstance(micro_batch, Tensor):
        if micro_batch.dim() == 0:
            raise ValueError("a 0-dim tensor has no batch dimension")
        return [int(micro_batch.shape[0])]
    if isinstance(micro_batch, Mapping):
        parts: Iterable[Any] = micro_batch.values()
    elif isinstance(micro_batch, (tuple, list)):
        parts = micro_batch
    else:
        return []
    return [size for part in parts for size in _leading_sizes(part)]


def micro_batch_size(micro_batch: Any) -> int:
    """The number of samples in ``micro_batch``: the first dimension of its tensors.

    A tensor gives its own first dimension; a tuple, list or dict gives the first dimension of the tensors it holds
    (nested containers included), which must all agree. Anything else -- no tensor inside, a 0-dim tensor, tensors
    whose first dimensions differ, another type -- raises ``ValueError``: pass ``size=`` to
    :func:`accumulating_closure` then.
    """
    try:
        sizes = set(_leading_sizes(micro_batch))
    except ValueError as error:
        raise ValueError(f"cannot tell the size of a micro-batch: {error}; pass size=callable") from None
    if len(sizes) != 1:
        what = (f"its tensors' first dimensions differ ({sorted(sizes)})" if sizes
                else f"a {type(micro_batch).__name__} holding no tensor")
        raise ValueError(f"cannot tell the size of a micro-batch: {what}; pass size=callable "
                         f"(micro_batch -> number of samples) to accumulating_closure")
    return sizes.pop()


def accumulating_closure(optimizer: torch.optim.Optimizer, micro_batches: Iterable[Any],
                         compute_loss: Callable[[Any], Tensor], *, backward: Callable[[Tensor], Any] | None = None,
                         no_sync: Callable[[], ContextManager] | None = None,
                         size: Callable[[Any], int] | None = None) -> Callable[[], Tensor]:
    """Gradient accumulation the way a chase needs it: the closure runs all micro-batches of one step.

    The closure zeroes the grads once, and for each micro-batch ``i`` of ``n_i`` samples (``N`` in all) backwards
    ``compute_loss(micro_batch) * n_i / N``, then returns the batch's loss ``sum_i loss_i * n_i / N`` (detached).
    With ``compute_loss`` a mean over its micro-batch (``reduction="mean"``) that is the mean over the whole batch,
    so every pass -- the regular one and each chase pass, which calls the closure again -- sees the gradient one
    large batch would give (up to summation order), whatever the micro-batch sizes.

    The size of a micro-batch is read by :func:`micro_batch_size` (the first dimension of the tensors it holds); where
    it cannot be told (no tensor, disagreeing first dimensions, another type) building the closure raises
    ``ValueError`` and ``size`` says it instead.

    Under accelerate, pass ``backward=accelerator.backward``: it divides every loss by ``gradient_accumulation_steps``,
    and the closure multiplies that back, so the step is the whole batch's whatever the setting; call
    ``optimizer.step(closure)`` once per batch, outside ``accelerator.accumulate()`` (building the closure where
    accelerate would skip the step raises ``RuntimeError``).

    Args:
        optimizer (Optimizer): the optimizer whose ``zero_grad`` starts each pass.
        micro_batches (iterable): the micro-batches of one step (kept as a list: every pass replays them).
        compute_loss (callable): ``micro_batch -> scalar mean loss`` (forward pass, autocast inside if wanted).
        backward (callable, optional): how to backward a loss: ``accelerator.backward`` under accelerate,
            ``self.manual_backward`` in a Lightning module, ``lambda loss: scaler.scale(loss).backward()`` with a
            GradScaler; default ``loss.backward()``.
        no_sync (callable, optional): a context for every micro-batch but the last, where DDP need not all-reduce
            (``model.no_sync`` or ``lambda: accelerator.no_sync(model)``).
        size (callable, optional): ``micro_batch -> number of samples``; default :func:`micro_batch_size`.

    Example:
        >>> closure = accumulating_closure(opt, [(x0, y0), (x1, y1)], lambda b: loss_fn(model(b[0]), b[1]))  # doctest: +SKIP
        >>> loss = opt.step(closure)  # doctest: +SKIP
    """
    micro_batches = list(micro_batches)
    if not micro_batches:
        raise ValueError("accumulating_closure needs at least one micro-batch")
    check_closure_build("accumulating_closure")
    measure = micro_batch_size if size is None else size
    sizes = [measure(micro_batch) for micro_batch in micro_batches]
    for index, count in enumerate(sizes):
        if isinstance(count, bool) or not isinstance(count, int) or count <= 0:
            raise ValueError(f"micro-batch {index} has size {count!r}: sizes must be positive ints")
    total = sum(sizes)
    weights = [count / total for count in sizes]
    undo_division = backward_divisor(backward)
    last = len(micro_batches) - 1

    def closure() -> Tensor:
        optimizer.zero_grad()
        batch_loss = None
        for index, (micro_batch, weight) in enumerate(zip(micro_batches, weights)):
            loss = compute_loss(micro_batch) * weight
            quiet = no_sync() if no_sync is not None and index < last else contextlib.nullcontext()
            with quiet:
                if backward is None:
                    loss.backward()
                else:
                    backward(loss * undo_division if undo_division != 1 else loss)
            batch_loss = loss.detach() if batch_loss is None else batch_loss + loss.detach()
        return batch_loss

    closure.covers_whole_step = True  # read by accel.optim.integrations: this closure runs every micro-batch
    return closure
