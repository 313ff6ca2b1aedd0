"""Recognising layers of other libraries without importing them (they are not dependencies)."""
from __future__ import annotations

import torch

__all__ = ["is_conv1d"]


def is_conv1d(module) -> bool:
    """Whether ``module`` is transformers' ``Conv1D`` (``transformers.pytorch_utils``; ``y = x @ W + b`` with ``W``
    of shape ``(nx, nf)``). Recognised by its class name, its module and the layout the class defines, so
    transformers is never imported here (it is not a dependency)."""
    cls = type(module)
    weight = getattr(module, "weight", None)
    return (cls.__name__ == "Conv1D" and cls.__module__.split(".")[0] == "transformers"
            and isinstance(weight, torch.Tensor) and weight.dim() == 2
            and tuple(weight.shape) == (getattr(module, "nx", None), getattr(module, "nf", None)))
