"""What the training stacks do around ``optimizer.step(closure)``, and what a chase must do about it.

Inconsistent training calls the closure more than once per step. Two stacks users run wrap that call:

* **Lightning** (automatic optimization) hands ``step`` a ``functools.partial`` of its precision plugin around
  its own ``Closure``, which keeps the *last* call's output for the loop (progress bar, ``on_train_batch_end``),
  and runs ``training_step`` on every call, so ``self.log`` would also log every chase pass. Under
  ``accumulate_grad_batches > 1`` the closure of the window's last micro-batch skips ``zero_grad`` and the earlier
  micro-batches ran outside ``step``: a chase cannot re-run them. (lightning/pytorch/loops/optimization/automatic.py)
* **accelerate**: inside ``accelerator.accumulate(model)`` the ``AcceleratedOptimizer.step`` of a non-sync
  micro-batch returns without calling the optimizer, so a closure there never runs. (accelerate/optimizer.py)

:class:`TrainingStack` recognises both from the closure and the call stack (only when the stack is already
imported: nothing here imports Lightning or accelerate), refuses accumulation with an error that says what to
do instead, keeps the first pass's result for Lightning, and mutes ``self.log`` during chase passes.
"""
from __future__ import annotations

import contextlib
import functools
import sys
from typing import Any, Callable, Iterator

__all__ = ["TrainingStack", "ACCUMULATION_ADVICE"]

ACCUMULATION_ADVICE = (
    "A chase re-evaluates the whole batch of the step, so the closure passed to step() must run every micro-batch "
    "of it: build the closure with accel.optim.accumulating_closure(optimizer, micro_batches, loss_fn) (or a loop "
    "of your own that zeroes the grads once, then backwards each micro-batch's loss / len(micro_batches)) and "
    "let the stack take one step per batch")


def _lightning_parts(closure: Callable[[], Any]) -> tuple[Any, Any]:
    """(LightningModule, Lightning ``Closure``) found in the partial Lightning hands to ``step``, else Nones."""
    if "lightning.pytorch" not in sys.modules:
        return None, None
    from lightning.pytorch import LightningModule
    from lightning.pytorch.loops.optimization.automatic import Closure
    module = lightning_closure = None
    pending = [closure]
    while pending:
        candidate = pending.pop()
        if isinstance(candidate, Closure):
            lightning_closure = candidate
        elif isinstance(candidate, LightningModule):
            module = candidate
        elif isinstance(candidate, functools.partial):
            pending.extend(candidate.args)
    return module, lightning_closure


def _accelerate_accumulation_steps(max_depth: int = 12) -> int:
    """accelerate's ``gradient_accumulation_steps`` when ``step`` was called from an ``AcceleratedOptimizer``, else 1."""
    module = sys.modules.get("accelerate.optimizer")
    if module is None:
        return 1
    code = module.AcceleratedOptimizer.step.__code__
    frame = sys._getframe(1)
    for _ in range(max_depth):
        if frame is None:
            return 1
        if frame.f_code is code:
            return int(frame.f_locals["self"].gradient_state.num_steps)
        frame = frame.f_back
    return 1


class TrainingStack:
    """The stack around one ``step(closure)`` call: plain PyTorch, Lightning, or accelerate."""

    def __init__(self, closure: Callable[[], Any], optimizer_name: str) -> None:
        self.module, self.lightning_closure = _lightning_parts(closure)
        self.optimizer_name = optimizer_name
        self._first_result = None

    @classmethod
    def around(cls, closure: Callable[[], Any], optimizer_name: str) -> "TrainingStack":
        """The stack of this call; a shared do-nothing one when neither Lightning nor accelerate is loaded."""
        if "lightning.pytorch" in sys.modules or "accelerate.optimizer" in sys.modules:
            return cls(closure, optimizer_name)
        return _PLAIN

    def refuse_unsupported(self) -> None:
        """Raise at once where the stack would make a chase silently wrong (gradient accumulation)."""
        trainer = getattr(self.module, "_trainer", None)
        if trainer is not None and trainer.accumulate_grad_batches > 1:
            raise RuntimeError(
                f"{self.optimizer_name} cannot run under Lightning's accumulate_grad_batches="
                f"{trainer.accumulate_grad_batches}: Lightning runs the earlier micro-batches outside step() and "
                f"never zeroes the grads before the last one, so a chase would add to stale gradients of half a "
                f"batch. Use accumulate_grad_batches=1 with a larger batch, or manual optimization. "
                + ACCUMULATION_ADVICE)
        steps = _accelerate_accumulation_steps()
        if steps > 1:
            raise RuntimeError(
                f"{self.optimizer_name} cannot run under accelerate's gradient_accumulation_steps={steps}: inside "
                f"accelerator.accumulate() the wrapped step() does nothing on {steps - 1} of every {steps} "
                f"micro-batches, so their closures never run and their data is dropped. Use "
                f"gradient_accumulation_steps=1. " + ACCUMULATION_ADVICE)

    def after_regular_pass(self) -> None:
        """Remember what the first closure call gave Lightning's loop (its last call's output is what it reads)."""
        if self.lightning_closure is not None:
            self._first_result = getattr(self.lightning_closure, "_result", None)

    @contextlib.contextmanager
    def chase_passes(self) -> Iterator[None]:
        """Chase passes are not new batches: mute Lightning's ``self.log`` and hand its loop the first pass's result."""
        results = None
        trainer = getattr(self.module, "_trainer", None)
        if trainer is not None:
            results = trainer._results
            if results is not None:
                results.log = _ignore  # instance attribute shadows ResultCollection.log for the chase only
        try:
            yield
        finally:
            if results is not None:
                del results.log
            if self._first_result is not None:
                self.lightning_closure._result = self._first_result


def _ignore(*args: Any, **kwargs: Any) -> None:
    return None


_PLAIN = TrainingStack(lambda: None, "")  # plain PyTorch: nothing to refuse, keep or mute
