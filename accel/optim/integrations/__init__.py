"""Training stacks around ``optimizer.step(closure)``, and what a chase needs from each (one module per stack).

Inconsistent training calls the closure more than once per step. Each stack that wraps that call gets a module here
that talks to it only through its public extension points, and is imported only once the stack itself is (nothing
here imports Lightning or accelerate):

* :mod:`accel.optim.integrations.lightning` -- precision plugins (``ChasePrecision``, ``ChaseMixedPrecision``) whose
  ``optimizer_step`` hook runs the chase passes without overwriting the result Lightning's loop reads;
* :mod:`accel.optim.integrations.accelerate` -- gradient accumulation read from ``GradientState``.

A new stack is one more module and one more line in :func:`refuse_unsupported`.
"""
from __future__ import annotations

import sys
from typing import Any, Callable

__all__ = ["refuse_unsupported", "check_closure_build", "backward_divisor"]


def refuse_unsupported(closure: Callable[[], Any], optimizer_name: str) -> None:
    """Raise, before the first closure call, where a loaded stack would make a chase silently wrong."""
    if "lightning.pytorch" in sys.modules:
        from accel.optim.integrations import lightning
        lightning.refuse_bare_closure(closure, optimizer_name)
    if "accelerate" in sys.modules:
        from accel.optim.integrations import accelerate
        accelerate.refuse_partial_step(closure, optimizer_name)


def check_closure_build(builder: str) -> None:
    """Raise where a closure built now would never be called by the loaded stack's wrapped step."""
    if "accelerate" in sys.modules:
        from accel.optim.integrations import accelerate
        accelerate.refuse_skipped_closure(builder)


def backward_divisor(backward: Callable[..., Any] | None) -> int:
    """What ``backward`` divides each loss by on its own (accelerate's ``Accelerator.backward`` under accumulation)."""
    if backward is not None and "accelerate" in sys.modules:
        from accel.optim.integrations import accelerate
        return accelerate.backward_divisor(backward)
    return 1
