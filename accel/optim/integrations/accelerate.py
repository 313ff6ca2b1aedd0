"""accelerate: what a chase needs from its gradient accumulation, read through the public ``GradientState``.

Under ``Accelerator(gradient_accumulation_steps=N)`` two things touch inconsistent training:

* inside ``accelerator.accumulate(model)``, ``AcceleratedOptimizer.step`` calls the optimizer only on the micro-batch
  where ``GradientState().sync_gradients`` is True; on the others the closure never runs and its data is dropped,
  and the one closure that runs covers one micro-batch, so a chase would re-run a fraction of the step;
* ``accelerator.backward(loss)`` always divides the loss by ``N`` (accelerate's mean over the micro-batches).

So a step that covers the whole batch -- a closure from :func:`accel.optim.accumulating_closure`, called once per
batch outside ``accumulate()`` -- is supported whatever ``N`` is, and such a closure is refused when it is built
where the wrapped step would skip it (``sync_gradients`` False). A plain closure under ``N > 1`` is refused at the
first step: ``GradientState`` does not say whether the step runs inside ``accumulate()``, and inside it the closure
holds one micro-batch.

This module imports accelerate; :mod:`accel.optim.integrations` loads it only once accelerate is imported.
"""
from __future__ import annotations

from typing import Any, Callable

from accelerate import Accelerator
from accelerate.state import GradientState

__all__ = ["ACCUMULATION_ADVICE", "refuse_partial_step", "refuse_skipped_closure", "backward_divisor"]

ACCUMULATION_ADVICE = (
    "A chase re-evaluates the whole batch of the step, so the closure passed to step() must run every micro-batch "
    "of it: build the closure with accel.optim.accumulating_closure(optimizer, micro_batches, loss_fn, "
    "backward=accelerator.backward) and call optimizer.step(closure) once per batch, outside accelerator.accumulate()")


def _accumulation_steps() -> int:
    return int(GradientState().num_steps)


def refuse_partial_step(closure: Callable[[], Any], optimizer_name: str) -> None:
    """Raise when ``gradient_accumulation_steps > 1`` and ``closure`` is not known to cover the whole step."""
    steps = _accumulation_steps()
    if steps > 1 and not getattr(closure, "covers_whole_step", False):
        raise RuntimeError(
            f"{optimizer_name} cannot chase a closure that may hold one micro-batch under accelerate's "
            f"gradient_accumulation_steps={steps}: inside accelerator.accumulate() the wrapped step() does nothing on "
            f"{steps - 1} of every {steps} micro-batches, so their closures never run and a chase would re-run only "
            f"the last one. " + ACCUMULATION_ADVICE)


def refuse_skipped_closure(builder: str) -> None:
    """Raise when a closure built now would be dropped by ``AcceleratedOptimizer.step`` (``sync_gradients`` False)."""
    state = GradientState()
    if not state.sync_gradients:
        raise RuntimeError(
            f"{builder} was built while accelerate's GradientState().sync_gradients is False (inside "
            f"accelerator.accumulate() on a micro-batch that does not step, gradient_accumulation_steps="
            f"{state.num_steps}): AcceleratedOptimizer.step would skip the closure and drop its micro-batches. "
            + ACCUMULATION_ADVICE)


def backward_divisor(backward: Callable[..., Any] | None) -> int:
    """What ``backward`` divides each loss by: ``gradient_accumulation_steps`` for ``Accelerator.backward``, else 1."""
    owner = getattr(backward, "__self__", None)
    if isinstance(owner, Accelerator) and getattr(backward, "__name__", None) == "backward":
        return int(owner.gradient_accumulation_steps)
    return 1
