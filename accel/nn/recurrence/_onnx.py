"""The recurrence under ``torch.onnx.export(dynamo=True)``: ONNX's own ``LSTM`` / ``GRU`` / ``RNN``.

``accel::recurrence_v2`` is a Python op that ONNX cannot run, and a Python loop over time would be
unrolled at the traced length. ONNX has the three recurrences as single operators that keep the
sequence length dynamic; they take the raw input and an input weight ``W``, so the precomputed
projection goes in as the input with ``W`` a permutation matrix that puts the gates in ONNX's order
(LSTM: i, o, f, c; GRU: z, r, h) -- the price is one ``(T * B, gates * H)`` square GEMM in the runtime.
The hidden weight and bias are permuted the same way. ``torch.nn.GRU``'s reset gate scales the hidden
part after its bias: ONNX's ``linear_before_reset=1``.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

__all__ = ["onnx_direction"]

# position of each ONNX gate in torch's order
_ONNX_GATE_ORDER = {"LSTM": (0, 3, 1, 2), "GRU": (1, 0, 2), "RNN_TANH": (0,), "RNN_RELU": (0,)}


def onnx_direction(mode: str, x_proj: Tensor, state: tuple[Tensor, ...], weight_hh: Tensor, bias_hh: Optional[Tensor],
                   reverse: bool, batch_sizes: Optional[Tensor] = None):
    """Same contract as :func:`accel.nn.recurrence._op.padded_direction`, as one ONNX operator."""
    if batch_sizes is not None:
        raise NotImplementedError("torch.onnx.export of a BT RNN on a PackedSequence is not supported (nor is it "
                                  "for torch.nn's RNNs); export with a padded input")
    steps, batch, width = x_proj.shape
    hidden = weight_hh.shape[1]
    rows = torch.cat([torch.arange(hidden) + gate * hidden for gate in _ONNX_GATE_ORDER[mode]])
    dtype = x_proj.dtype
    w = torch.eye(width, dtype=dtype, device=x_proj.device)[rows]
    r = weight_hh.to(dtype)[rows]
    recurrent_bias = bias_hh.to(dtype)[rows] if bias_hh is not None else x_proj.new_zeros(width)
    b = torch.cat([x_proj.new_zeros(width), recurrent_bias])  # the input bias is already in x_proj
    attrs = {"hidden_size": hidden, "direction": "reverse" if reverse else "forward"}
    inputs = [x_proj, w.unsqueeze(0), r.unsqueeze(0), b.unsqueeze(0), None, state[0].to(dtype).unsqueeze(0)]
    if mode == "LSTM":
        inputs.append(state[1].to(dtype).unsqueeze(0))
        name = "LSTM"
    elif mode == "GRU":
        attrs["linear_before_reset"] = 1
        name = "GRU"
    else:
        attrs["activations"] = ["Tanh" if mode == "RNN_TANH" else "Relu"]
        name = "RNN"
    num_outputs = 3 if mode == "LSTM" else 2
    shapes = [(steps, 1, batch, hidden)] + [(1, batch, hidden)] * (num_outputs - 1)
    outputs = torch.onnx.ops.symbolic_multi_out(f"::{name}", inputs, attrs, dtypes=[dtype] * num_outputs,
                                                shapes=shapes, version=14)
    out = outputs[0].squeeze(1)
    return out, tuple(o.squeeze(0) for o in outputs[1:])
