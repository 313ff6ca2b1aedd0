"""Recurrent layers with a Block-Term input projection: :class:`BTRNN`, :class:`BTLSTM`, :class:`BTGRU`
(``modules``), the reference loop (``_reference``), the fused recurrence on CPU (``_fused`` with the C++ step
kernel in ``_csrc``) and CUDA (``_fused_cuda``), and the op that holds a whole recurrence for compile, export
and ONNX (``_op``, ``_onnx``)."""
from accel.nn.recurrence._kernel import KernelStatus, kernel_status
from accel.nn.recurrence.modules import BTGRU, BTLSTM, BTRNN

__all__ = ["BTGRU", "BTLSTM", "BTRNN", "KernelStatus", "kernel_status"]
