"""Lightning's fp16 loss scaling for inconsistent training (imports Lightning: load it only where Lightning runs).

Lightning's ``MixedPrecision("16-mixed")`` runs the closure itself, then calls ``scaler.step(optimizer)`` without
it (lightning/pytorch/plugins/precision/amp.py), so ISGD could never re-run the batch. :class:`ChaseMixedPrecision`
hands ISGD / ``Inconsistent`` the closure and the scaler instead; every other optimizer gets Lightning's own path.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

from lightning.pytorch.plugins.precision import MixedPrecision

__all__ = ["ChaseMixedPrecision"]


class ChaseMixedPrecision(MixedPrecision):
    """``MixedPrecision`` whose optimizer step lets ISGD and ``Inconsistent`` scale, unscale, skip and chase.

    Each closure call (the regular pass and every chase pass) runs Lightning's closure (``training_step``,
    ``zero_grad``, the scaled ``backward``), unscales the grads and runs ``on_before_optimizer_step`` and gradient
    clipping on the true gradients, as Lightning does for one pass; the optimizer skips a pass whose grads hold
    inf/NaN and updates the scale between passes; this plugin calls ``scaler.update()`` after the step.

    Example:
        >>> trainer = Trainer(plugins=[ChaseMixedPrecision("16-mixed", "cuda")])  # doctest: +SKIP
    """

    def optimizer_step(self, optimizer: Any, model: Any, closure: Callable[[], Any], **kwargs: Any) -> Any:
        if self.scaler is None or getattr(optimizer, "_steps_scaled_closures", False) is not True:
            return super().optimizer_step(optimizer, model=model, closure=closure, **kwargs)
        unscaled = functools.partial(self._unscaled_closure, model, optimizer, closure)
        result = optimizer.step(closure=unscaled, grad_scaler=self.scaler, **kwargs)
        self.scaler.update()
        return result

    def _unscaled_closure(self, model: Any, optimizer: Any, closure: Callable[[], Any]) -> Any:
        result = closure()
        if result is not None:
            self.scaler.unscale_(optimizer)
        self._after_closure(model, optimizer)
        return result
