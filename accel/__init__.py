"""accel: faster multi-GPU training for PyTorch.

Three techniques, each usable alone and all composable in an ordinary training loop:

* ``accel.ISGD`` -- Inconsistent SGD, a drop-in ``torch.optim`` optimizer (``accel.optim``);
* ``accel.gemm`` -- out-of-core multi-GPU matrix multiply on host tensors (``accel.ooc``),
  and ``accel.nn.OutOfCoreLinear`` built on it;
* ``accel.nn.BTLinear`` / ``BTLSTM`` / ``BTGRU`` / ``BTRNN`` -- Block-Term tensor layers;

plus ``accel.distributed.init()`` for torchrun, SLURM and MPI launches.

This module only re-exports. Submodules load on first use, so ``import accel`` stays cheap
and one capability never drags in another.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from accel._version import __version__

# public name -> (module, attribute or None for the module itself)
_EXPORTS = {
    "ISGD": ("accel.optim", "ISGD"),
    "Inconsistent": ("accel.optim", "Inconsistent"),
    "gemm": ("accel.ooc", "gemm"),
    "optim": ("accel.optim", None),
    "ooc": ("accel.ooc", None),
    "nn": ("accel.nn", None),
    "distributed": ("accel.distributed", None),
}

__all__ = ["__version__", *_EXPORTS]

if TYPE_CHECKING:  # static tools see plain imports
    from accel import distributed, nn, ooc, optim
    from accel.ooc import gemm
    from accel.optim import ISGD, Inconsistent


def __getattr__(name: str):
    try:
        module_name, attribute = _EXPORTS[name]
    except KeyError:
        raise AttributeError(f"module 'accel' has no attribute {name!r}") from None
    module = importlib.import_module(module_name)
    value = module if attribute is None else getattr(module, attribute)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
