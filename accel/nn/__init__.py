"""Layers: Block-Term tensor layers (``BTLinear``, ``BTRNN``, ``BTLSTM``, ``BTGRU``) and
``OutOfCoreLinear`` (weights in host memory, matmuls through ``accel.ooc``); whole-model transforms
``offload_`` / ``unoffload_`` and ``compress_`` (:mod:`accel.nn.transforms`).

Re-exports only; each layer's module loads on first use.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_EXPORTS = {
    "BTLinear": "accel.nn.bt.linear",
    "BTRNN": "accel.nn.recurrence.modules",
    "BTLSTM": "accel.nn.recurrence.modules",
    "BTGRU": "accel.nn.recurrence.modules",
    "block_term_decomposition": "accel.nn.bt.decompose",
    "OutOfCoreLinear": "accel.nn.ooc_linear",
    "offload_": "accel.nn.transforms",
    "unoffload_": "accel.nn.transforms",
    "compress_": "accel.nn.transforms",
    "TargetError": "accel.nn.transforms",
    "TiedWeightError": "accel.nn.transforms",
    "CannotCompressError": "accel.nn.transforms",
}

__all__ = list(_EXPORTS)

if TYPE_CHECKING:
    from accel.nn.bt.decompose import block_term_decomposition
    from accel.nn.bt.linear import BTLinear
    from accel.nn.ooc_linear import OutOfCoreLinear
    from accel.nn.recurrence.modules import BTGRU, BTLSTM, BTRNN
    from accel.nn.transforms import CannotCompressError, TargetError, TiedWeightError, compress_, offload_, unoffload_


def __getattr__(name: str):
    try:
        module_name = _EXPORTS[name]
    except KeyError:
        raise AttributeError(f"module 'accel.nn' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(module_name), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
