"""The fused recurrence as one ``torch.library`` op: ``torch.ops.accel.recurrence_v2``.

One graph node for the whole recurrence of one direction of one layer: ``torch.export`` keeps it
with a dynamic batch and a dynamic sequence length (a Python loop over time would be unrolled at
the traced length), ``torch.compile`` sees no graph break, and its backward is a second op
(``torch.ops.accel.recurrence_backward_v2``), so a compiled training step keeps the hand-written
backward-through-time too. The arithmetic lives in :mod:`accel.nn.recurrence._fused` (CPU) and
:mod:`accel.nn.recurrence._fused_cuda` (CUDA).

The op names carry a version (``_v2``): a compiled graph cached on disk calls the ops by name, so a change of
an op's schema or meaning takes a new suffix (``_v3``) and old cached graphs can never call the new op.

:func:`fused_direction` is the drop-in twin of :func:`accel.nn.recurrence._reference.run_direction` for
packed data; :func:`padded_direction` runs the padded layout directly. Under
``torch.onnx.export`` the op is replaced by ONNX's own ``LSTM`` / ``GRU`` / ``RNN`` operator
(:mod:`accel.nn.recurrence._onnx`).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from accel.nn.recurrence import _fused as fused_recurrence
from accel.nn.recurrence._reference import GATES

__all__ = ["padded_direction", "fused_direction", "OP", "BACKWARD_OP"]

OP, BACKWARD_OP = "accel::recurrence_v2", "accel::recurrence_backward_v2"

_MODES = tuple(GATES)


def _active(batch_sizes: Optional[Tensor], steps: int, batch: int) -> list[int]:
    return [batch] * steps if batch_sizes is None else batch_sizes.tolist()


def _implementation(x_proj: Tensor):
    if x_proj.device.type == "cuda":
        from accel.nn.recurrence import _fused_cuda as fused_recurrence_cuda  # the fused cells exist only on CUDA
        return fused_recurrence_cuda
    return fused_recurrence


@torch.library.custom_op(OP, mutates_args=())
def _recurrence(mode: str, x_proj: Tensor, h0: Tensor, c0: Optional[Tensor], weight_hh: Tensor,
                bias_hh: Optional[Tensor], batch_sizes: Optional[Tensor], reverse: bool,
                keep_for_backward: bool) -> list[Tensor]:
    """``[out, h_n, *extra]``: ``out`` ``(T, B, H)``, ``h_n`` its last step, then (LSTM) ``c_n`` and the tensors
    the backward needs (the LSTM's saved gates and cell states are left empty when ``keep_for_backward`` is
    false: inference).

    ``h_n`` is a copy, an output of its own rather than a view of ``out``: a compiled graph then passes its
    gradient to the backward op as is, which adds it where the backward-through-time starts, instead of
    scattering it into a zero-filled ``(T, B, H)`` tensor added to ``out``'s gradient (even where ``h_n`` is
    unused and its gradient zero)."""
    steps, batch, _ = x_proj.shape
    out, extra = _implementation(x_proj).forward(mode, x_proj, h0, c0, weight_hh, bias_hh,
                                                 _active(batch_sizes, steps, batch), reverse, keep_for_backward)
    return [out, (out[0] if reverse else out[-1]).clone(), *extra]


@_recurrence.register_fake
def _(mode, x_proj, h0, c0, weight_hh, bias_hh, batch_sizes, reverse, keep_for_backward):
    steps, batch, width = x_proj.shape
    hidden = h0.shape[-1]
    outputs = [x_proj.new_empty(steps, batch, hidden), x_proj.new_empty(batch, hidden)]  # out, h_n
    if x_proj.device.type == "cuda" and mode in ("LSTM", "GRU"):
        from accel.nn.recurrence._fused_cuda import saved_widths
        saved = [x_proj.new_empty(steps, batch, w) for w in saved_widths(mode, hidden)]
        return [*outputs, *([h0.new_empty(batch, hidden)] if mode == "LSTM" else []), *saved]
    if mode == "LSTM":  # c_n, then the activated gates and the cell states (empty at inference)
        if not keep_for_backward:
            return [*outputs, h0.new_empty(batch, hidden), x_proj.new_empty(0), x_proj.new_empty(0)]
        return [*outputs, h0.new_empty(batch, hidden), x_proj.new_empty(steps, batch, width),
                x_proj.new_empty(steps, batch, hidden)]
    if mode == "GRU":
        return [*outputs, x_proj.new_empty(steps, batch, width), x_proj.new_empty(steps, batch, width)]
    return outputs


@torch.library.custom_op(BACKWARD_OP, mutates_args=())
def _recurrence_backward(mode: str, grad_out: Optional[Tensor], grad_h_n: Optional[Tensor], grad_c_n: Optional[Tensor],
                         h0: Tensor, c0: Optional[Tensor], weight_hh: Tensor, out: Tensor, saved: list[Tensor],
                         batch_sizes: Optional[Tensor], reverse: bool) -> list[Tensor]:
    """``[grad_x_proj, grad_h0, grad_weight_hh, grad_bias_hh]``, then ``grad_c0`` for the LSTM."""
    steps, batch, _ = out.shape
    grads = _implementation(out).backward(mode, grad_out, grad_c_n, h0, c0, weight_hh, out, saved,
                                          _active(batch_sizes, steps, batch), reverse, grad_h_n)
    grad_x, grad_h0, grad_c0, grad_weight, grad_bias = grads
    return [grad_x, grad_h0, grad_weight, grad_bias] + ([grad_c0] if mode == "LSTM" else [])


@_recurrence_backward.register_fake
def _(mode, grad_out, grad_h_n, grad_c_n, h0, c0, weight_hh, out, saved, batch_sizes, reverse):
    steps, batch, _ = out.shape
    grads = [out.new_empty(steps, batch, weight_hh.shape[0]), torch.empty_like(h0), torch.empty_like(weight_hh),
             weight_hh.new_empty(weight_hh.shape[0])]
    return grads + ([torch.empty_like(c0)] if mode == "LSTM" else [])


def _setup_context(ctx, inputs, output):
    mode, _, h0, c0, weight_hh, bias_hh, batch_sizes, reverse, _ = inputs
    ctx.mode, ctx.reverse, ctx.has_bias = mode, reverse, bias_hh is not None
    ctx.batch_sizes = batch_sizes
    saved = output[3:] if mode == "LSTM" else output[2:]  # after out, h_n (and c_n)
    ctx.mark_non_differentiable(*saved)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(h0, c0, weight_hh, output[0], *saved)


def _backward(ctx, grads):
    h0, c0, weight_hh, out, *saved = ctx.saved_tensors
    grad_c_n = grads[2] if ctx.mode == "LSTM" else None
    result = _recurrence_backward(ctx.mode, grads[0], grads[1], grad_c_n, h0, c0, weight_hh, out, saved,
                                  ctx.batch_sizes, ctx.reverse)
    grad_x, grad_h0, grad_weight, grad_bias = result[:4]
    grad_c0 = result[4] if ctx.mode == "LSTM" else None
    return None, grad_x, grad_h0, grad_c0, grad_weight, grad_bias if ctx.has_bias else None, None, None, None


# torch marks the backward once-differentiable: double backward raises 'trying to differentiate twice'
_recurrence.register_autograd(_backward, setup_context=_setup_context)


def padded_direction(mode: str, x_proj: Tensor, state: tuple[Tensor, ...], weight_hh: Tensor,
                     bias_hh: Optional[Tensor], reverse: bool, batch_sizes: Optional[Tensor] = None):
    """One direction of one layer on padded, time-major projections ``(T, B, gates * H)``.

    ``batch_sizes`` (``(T,)``, non-increasing, on the CPU): sequences still running at each step; rows
    past it are padding and come out holding the carried state. Returns ``(out, final_state)``.
    """
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
    if torch.onnx.is_in_onnx_export():
        from accel.nn.recurrence._onnx import onnx_direction
        return onnx_direction(mode, x_proj, state, weight_hh, bias_hh, reverse, batch_sizes)
    dtype = x_proj.dtype
    if torch.is_autocast_enabled(x_proj.device.type):  # the projection came out in the autocast dtype
        state = tuple(s.to(dtype) for s in state)
        weight_hh = weight_hh.to(dtype)
        bias_hh = None if bias_hh is None else bias_hh.to(dtype)
    for name, tensor in (("h0/c0", state[0]), ("weight_hh", weight_hh)):
        if tensor.dtype != dtype:
            raise TypeError(f"the recurrence needs one dtype: input projection is {dtype}, {name} is {tensor.dtype}")
    # the steps write through views into buffers shaped like these: contiguous rows (no copy when already so)
    x_proj, state = x_proj.contiguous(), tuple(s.contiguous() for s in state)
    c0 = state[1] if mode == "LSTM" else None
    keep = torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                           for t in (x_proj, state[0], c0, weight_hh, bias_hh))
    result = _recurrence(mode, x_proj, state[0], c0, weight_hh, bias_hh, batch_sizes, reverse, keep)
    out, h_n = result[:2]
    return out, ((h_n, result[2]) if mode == "LSTM" else (h_n,))


def fused_direction(mode: str, x_proj: Tensor, batch_sizes: Tensor, state: tuple[Tensor, ...],
                    weight_hh: Tensor, bias_hh: Optional[Tensor], reverse: bool):
    """:func:`accel.nn.recurrence._reference.run_direction` on packed data through the fused op: the packed rows
    are scattered into a padded buffer and gathered back (both differentiable)."""
    steps, batch = batch_sizes.shape[0], state[0].shape[0]
    valid = torch.arange(batch).unsqueeze(0) < batch_sizes.unsqueeze(1)  # (T, B), row-major = packed order
    valid = valid.to(x_proj.device)
    padded = x_proj.new_zeros(steps, batch, x_proj.shape[-1])
    padded[valid] = x_proj
    out, final = padded_direction(mode, padded, state, weight_hh, bias_hh, reverse, batch_sizes)
    return out[valid], final
