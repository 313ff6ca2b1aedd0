"""Optimizers: ISGD (Inconsistent SGD), the :class:`Inconsistent` wrapper, the control charts they share, and the
helpers that fit them into training stacks (loss scaling, gradient accumulation)."""
from accel.optim.amp import ClosureGradScaler
from accel.optim.closures import accumulating_closure
from accel.optim.inconsistent import Inconsistent
from accel.optim.isgd import ISGD
from accel.optim.plot import plot_control_chart
from accel.optim.reference import ReferenceISGD
from accel.optim.spc import ControlChart, ResidualChart

__all__ = ["ISGD", "Inconsistent", "ReferenceISGD", "ControlChart", "ResidualChart", "ClosureGradScaler",
           "accumulating_closure", "plot_control_chart"]
