"""Optimizers: ISGD (Inconsistent SGD), the :class:`Inconsistent` wrapper, and the control chart they share."""
from accel.optim.inconsistent import Inconsistent
from accel.optim.isgd import ISGD
from accel.optim.plot import plot_control_chart
from accel.optim.spc import ControlChart

__all__ = ["ISGD", "Inconsistent", "ControlChart", "plot_control_chart"]
