"""Lightning: precision plugins that run ISGD's and ``Inconsistent``'s chase passes (imports Lightning).

Under automatic optimization Lightning builds one ``Closure`` per batch (``training_step``, ``zero_grad``,
``backward``), hands it to the precision plugin's ``optimizer_step`` hook, and afterwards reads the result of the
closure's *last* call for the loop (``on_train_batch_end``'s ``outputs``, the progress bar). A chase calls the closure
again, so with Lightning's own plugins the loop would report a chase pass's loss and every ``self.log`` would log
each pass. The plugins here use that hook: the regular pass calls Lightning's closure as usual, and each chase pass
calls its public ``closure()`` method, which runs the same ``training_step`` / ``zero_grad`` / ``backward`` without
replacing the result the loop reads. During chase passes the module's ``log`` method (which ``log_dict`` calls too)
is shadowed on the instance by a no-op: Lightning has no public switch for logging, and a chase pass is not a new
batch. Every pass runs ``on_before_optimizer_step`` and gradient clipping, as Lightning does for one pass.

* :class:`ChasePrecision` -- full precision (``"32-true"``);
* :class:`ChaseMixedPrecision` -- ``"16-mixed"`` (fp16 with loss scaling: Lightning's own plugin calls
  ``scaler.step(optimizer)`` without the closure, so no chase could run) and ``"bf16-mixed"``.

Other optimizers get Lightning's own path. ISGD / ``Inconsistent`` under automatic optimization without one of these
plugins are refused at the first step; manual optimization needs no plugin.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable, Iterator

from lightning.pytorch import LightningModule
from lightning.pytorch.loops.optimization.closure import AbstractClosure
from lightning.pytorch.plugins.precision import MixedPrecision, Precision

__all__ = ["ChasePrecision", "ChaseMixedPrecision", "refuse_bare_closure"]

PLUGIN_ADVICE = (
    "Trainer(plugins=[accel.optim.integrations.lightning.ChasePrecision()]) for full precision, or "
    "ChaseMixedPrecision('16-mixed' or 'bf16-mixed', device) for mixed precision; or use manual optimization")
ACCUMULATION_ADVICE = (
    "A chase re-evaluates the whole batch of the step, so the closure passed to step() must run every micro-batch "
    "of it: use accumulate_grad_batches=1 with a larger batch, or manual optimization with "
    "accel.optim.accumulating_closure(optimizer, micro_batches, loss_fn, backward=self.manual_backward)")


def _chases(optimizer: Any) -> bool:
    return getattr(optimizer, "_steps_scaled_closures", False) is True


def _lightning_closures(closure: Callable[[], Any]) -> Iterator[Any]:
    """Lightning closures and chase wrappers found in ``closure`` and the partials around it."""
    pending = [closure]
    while pending:
        candidate = pending.pop()
        if isinstance(candidate, (AbstractClosure, _ChasePasses)):
            yield candidate
        elif isinstance(candidate, functools.partial):
            pending.extend(candidate.args)


def refuse_bare_closure(closure: Callable[[], Any], optimizer_name: str) -> None:
    """Raise when Lightning's automatic-optimization closure reaches the optimizer without a chase plugin."""
    if any(isinstance(found, AbstractClosure) for found in _lightning_closures(closure)):
        raise RuntimeError(
            f"{optimizer_name} under Lightning's automatic optimization needs a chase precision plugin: Lightning's "
            f"own plugins let the loop report and log the last chase pass instead of the batch. Use "
            + PLUGIN_ADVICE)


def _ignore(*args: Any, **kwargs: Any) -> None:
    return None


@contextlib.contextmanager
def _muted_log(module: Any) -> Iterator[None]:
    if not isinstance(module, LightningModule):
        yield
        return
    module.log = _ignore  # an instance attribute shadows LightningModule.log for the chase pass only
    try:
        yield
    finally:
        del module.log


class _ChasePasses:
    """The closure the optimizer gets: Lightning's closure on the first call, its ``closure()`` method afterwards."""

    def __init__(self, closure: Callable[[], Any], module: Any, after: Callable[[Any], None] | None = None) -> None:
        self.closure, self.module, self.after, self.calls = closure, module, after, 0

    def __call__(self) -> Any:
        self.calls += 1
        if self.calls == 1 or not isinstance(self.closure, AbstractClosure):
            result = self.closure()
        else:
            with _muted_log(self.module):
                result = self.closure.closure().loss
        if self.after is not None:
            self.after(result)
        return result


def _refuse_accumulation(model: Any, optimizer: Any) -> None:
    trainer = model.trainer if isinstance(model, LightningModule) else None
    steps = getattr(trainer, "accumulate_grad_batches", 1)
    if model.automatic_optimization and steps > 1:
        raise RuntimeError(
            f"{type(optimizer).__name__} cannot run under Lightning's accumulate_grad_batches={steps}: Lightning "
            f"runs the earlier micro-batches outside step() and never zeroes the grads before the last one, so a "
            f"chase would add to stale gradients of part of a batch. " + ACCUMULATION_ADVICE)


class ChasePrecision(Precision):
    """Full-precision plugin whose ``optimizer_step`` lets ISGD and ``Inconsistent`` chase (see the module docstring).

    Example:
        >>> trainer = Trainer(plugins=[ChasePrecision()])  # doctest: +SKIP
    """

    def optimizer_step(self, optimizer: Any, model: Any, closure: Callable[[], Any], **kwargs: Any) -> Any:
        if not _chases(optimizer):
            return super().optimizer_step(optimizer, model=model, closure=closure, **kwargs)
        _refuse_accumulation(model, optimizer)
        return super().optimizer_step(optimizer, model=model, closure=_ChasePasses(closure, model), **kwargs)


class ChaseMixedPrecision(MixedPrecision):
    """``MixedPrecision`` whose optimizer step lets ISGD and ``Inconsistent`` scale, unscale, skip and chase.

    With a scaler (``"16-mixed"``) each closure call (the regular pass and every chase pass) runs Lightning's
    closure, unscales the grads and runs ``on_before_optimizer_step`` and gradient clipping on the true gradients;
    the optimizer skips a pass whose grads hold inf/NaN and updates the scale between passes; this plugin calls
    ``scaler.update()`` after the step. Without one (``"bf16-mixed"``) it behaves as :class:`ChasePrecision` under
    autocast.

    Example:
        >>> trainer = Trainer(plugins=[ChaseMixedPrecision("16-mixed", "cuda")])  # doctest: +SKIP
    """

    def optimizer_step(self, optimizer: Any, model: Any, closure: Callable[[], Any], **kwargs: Any) -> Any:
        if not _chases(optimizer):
            return super().optimizer_step(optimizer, model=model, closure=closure, **kwargs)
        _refuse_accumulation(model, optimizer)
        if self.scaler is None:
            return Precision.optimizer_step(self, optimizer, model=model, closure=_ChasePasses(closure, model),
                                            **kwargs)
        scaler = self.scaler

        def unscale(result: Any) -> None:
            if result is not None:
                scaler.unscale_(optimizer)

        passes = _ChasePasses(closure, model, after=unscale)
        result = Precision.optimizer_step(self, optimizer, model=model, closure=passes, grad_scaler=scaler, **kwargs)
        scaler.update()
        return result
