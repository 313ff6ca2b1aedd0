"""Model-level transforms: one call over a whole model, in place, with a filter (as torchao's ``quantize_``).

* :func:`offload_` / :func:`unoffload_` -- large linear layers to and from :class:`accel.nn.OutOfCoreLinear`
  (weights in host memory, one shared :class:`accel.ooc.Engine`);
* :func:`compress_` -- ``nn.Linear`` / ``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN`` to their block-term versions,
  initialised from the trained weights, ranks given as an int, a per-layer mapping, a fraction of the dense
  parameters, a :class:`TargetError` or ``"full"``.
"""
from accel.nn.transforms.compress import (
    CannotCompressError,
    CompressionSummary,
    LayerCompression,
    TargetError,
    compress_,
)
from accel.nn.transforms.offload import (
    HostEmbedding,
    OffloadedLayer,
    OffloadSummary,
    TiedWeightError,
    offload_,
    unoffload_,
)

__all__ = ["offload_", "unoffload_", "OffloadSummary", "OffloadedLayer", "HostEmbedding",
           "TiedWeightError", "compress_", "CompressionSummary", "LayerCompression", "TargetError",
           "CannotCompressError"]
