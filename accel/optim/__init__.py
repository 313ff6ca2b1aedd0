"""Optimizers: ISGD (Inconsistent SGD), the :class:`Inconsistent` wrapper, the control charts they share, and the
helpers that fit them into training stacks (loss scaling, gradient accumulation; Lightning and accelerate in
:mod:`accel.optim.integrations`)."""
from accel.optim.amp import ClosureGradScaler
from accel.optim.charts import ControlChart, ResidualChart
from accel.optim.closures import accumulating_closure, micro_batch_size
from accel.optim.inconsistent import Inconsistent
from accel.optim.isgd import ISGD
from accel.optim.isgd_reference import ReferenceISGD
from accel.optim.plot import plot_control_chart

__all__ = ["ISGD", "Inconsistent", "ReferenceISGD", "ControlChart", "ResidualChart", "ClosureGradScaler",
           "accumulating_closure", "micro_batch_size", "plot_control_chart"]
