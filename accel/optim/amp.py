"""fp16 dynamic loss scaling for closures: GradScaler's scale / unscale / skip-on-inf / update on every pass.

``torch.amp.GradScaler.step`` refuses closures, and a chase needs one: each chase pass is a new scaled backward
whose gradients must be unscaled and checked before the chase uses them. The chase engine therefore drives the
scaler itself, pass by pass, through its public ``unscale_`` and ``update`` (see :func:`unscale_and_check`), and
:class:`ClosureGradScaler` lets ``scaler.step(optimizer, closure)`` (and accelerate, which calls exactly that)
hand the closure and the scaler to an optimizer that can use them.
"""
from __future__ import annotations

from typing import Any

import torch
from torch.amp.grad_scaler import OptState

__all__ = ["ClosureGradScaler", "unscale_and_check", "scaling_enabled"]


def scaling_enabled(scaler: Any) -> bool:
    """Whether ``scaler`` is an enabled GradScaler (``None`` or a disabled one means no loss scaling)."""
    if scaler is None:
        return False
    if not isinstance(scaler, torch.amp.GradScaler):
        raise TypeError(f"grad_scaler must be a torch.amp.GradScaler, got {type(scaler).__name__}")
    return scaler.is_enabled()


def unscale_and_check(scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer) -> bool:
    """Unscale ``optimizer``'s grads (unless the closure already called ``scaler.unscale_``); True when all finite.

    The inf/NaN record is the one ``unscale_`` leaves for ``scaler.update()`` (GradScaler's per-optimizer state,
    read here because GradScaler has no public accessor for it), so the scale backs off exactly when a pass
    overflowed.
    """
    if getattr(scaler, "_scale", None) is None:
        raise RuntimeError("a grad_scaler was given but the closure never scaled its loss: call "
                           "grad_scaler.scale(loss).backward() (accelerator.backward(loss) under accelerate)")
    state = scaler._per_optimizer_states[id(optimizer)]
    if state["stage"] is not OptState.UNSCALED:
        scaler.unscale_(optimizer)
    found = state["found_inf_per_device"].values()
    return not any(bool(flag.item()) for flag in found)


class ClosureGradScaler(torch.amp.GradScaler):
    """A :class:`torch.amp.GradScaler` whose ``step(optimizer, closure)`` works with ISGD and ``Inconsistent``.

    For an optimizer that takes ``step(closure, grad_scaler=...)`` (ISGD, Inconsistent) it hands over the closure
    and itself; the optimizer scales nothing itself but unscales, skips on inf/NaN and updates the scale after
    every pass but the last, whose record ``update()`` consumes as usual. Any other call is GradScaler's own.

    Plain PyTorch::

        scaler = ClosureGradScaler("cuda")
        loss = scaler.step(opt, closure)   # the closure calls scaler.scale(loss).backward()
        scaler.update()

    accelerate (fp16): replace the scaler before ``prepare``; ``accelerator.backward`` then scales with it and
    ``AcceleratedOptimizer.step(closure)`` calls ``scaler.step(optimizer, closure)`` and ``scaler.update()``::

        accelerator.scaler = ClosureGradScaler.from_scaler(accelerator.scaler)
    """

    @classmethod
    def from_scaler(cls, scaler: torch.amp.GradScaler) -> "ClosureGradScaler":
        """A ClosureGradScaler with ``scaler``'s device, settings and current scale."""
        new = cls(getattr(scaler, "_device", "cuda"), enabled=scaler.is_enabled())
        if scaler.is_enabled():
            new.load_state_dict(scaler.state_dict())
        return new

    def step(self, optimizer: torch.optim.Optimizer, *args: Any, **kwargs: Any) -> Any:
        closure = kwargs.pop("closure", None)
        if closure is None and args and callable(args[0]):
            closure, args = args[0], args[1:]
        if closure is not None and getattr(optimizer, "_steps_scaled_closures", False) is True:
            return optimizer.step(closure, *args, grad_scaler=self, **kwargs)
        if closure is not None:
            raise RuntimeError(f"ClosureGradScaler.step got a closure for {type(optimizer).__name__}, which does not "
                               f"take step(closure, grad_scaler=...); only ISGD and Inconsistent do")
        return super().step(optimizer, *args, **kwargs)
