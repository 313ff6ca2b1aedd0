"""The fused recurrence's LSTM and GRU steps on CUDA: ``torch``'s fused cells that take precomputed gates.

``aten._thnn_fused_lstm_cell(input_gates, hidden_gates, cx)`` returns ``(hy, cy, workspace)`` with the
activated gates in ``workspace``; ``_thnn_fused_lstm_cell_backward_impl(grad_hy, grad_cy, cx, cy,
workspace, has_bias)`` returns the pre-activation gate gradient and ``grad_cx``.
``aten._thnn_fused_gru_cell(input_gates, hidden_gates, hx)`` returns ``(hy, workspace)`` (r, z, n, hx
and the hidden part of n, ``5 * H`` wide) and ``_thnn_fused_gru_cell_backward(grad_hy, workspace,
has_bias)`` the gradients of both gate inputs and of ``hx``'s direct path. These are the cells
``torch.nn.LSTMCell`` / ``GRUCell`` run on CUDA; they have no CPU kernel. Biases are folded into the
hidden GEMM (``addmm``), so the cells run without theirs. Same contract, carried rows and saved
tensors' roles as :mod:`accel.nn.recurrence._fused`; the saved tensors differ (see :data:`SAVED`).
"""
from __future__ import annotations

import torch

from accel.nn.recurrence._fused import backward as generic_backward
from accel.nn.recurrence._fused import carry, per_step, previous, rows_of, time_steps, weight_grad
from accel.nn.recurrence._fused import forward as generic_forward

__all__ = ["SAVED", "forward", "backward", "saved_widths"]

SAVED = {"LSTM": ("workspace", "cells"), "GRU": ("workspace",)}


def saved_widths(mode: str, hidden: int) -> list[int]:
    """Last-dimension sizes of the ``(T, B, *)`` tensors saved for the backward (for the fake op)."""
    return {"LSTM": [4 * hidden, hidden], "GRU": [5 * hidden]}[mode]


def forward(mode: str, x_proj, h0, c0, weight_hh, bias_hh, active: list[int], reverse: bool,
            keep_for_backward: bool = True):
    """The fused cells' workspace is their output: it is kept whatever ``keep_for_backward`` says."""
    if mode not in SAVED:  # the plain RNN's step is two ops: the generic path is as fused
        return generic_forward(mode, x_proj, h0, c0, weight_hh, bias_hh, active, reverse)
    steps, batch, _ = x_proj.shape
    hidden = h0.shape[-1]
    w_t = weight_hh.t()
    out = x_proj.new_empty(steps, batch, hidden)
    workspace = x_proj.new_zeros(steps, batch, (4 if mode == "LSTM" else 5) * hidden)
    outs, inputs, workspaces = per_step(out), per_step(x_proj), per_step(workspace)
    cells = x_proj.new_empty(steps, batch, hidden) if mode == "LSTM" else None
    h, c = h0, c0
    for t in time_steps(steps, reverse):
        a = active[t]
        rows = rows_of(a, batch)
        hidden_gates = torch.mm(rows(h), w_t) if bias_hh is None else torch.addmm(bias_hh, rows(h), w_t)
        if mode == "LSTM":
            hy, cy, ws = torch.ops.aten._thnn_fused_lstm_cell(rows(inputs[t]), hidden_gates, rows(c))
            rows(cells[t]).copy_(cy)
        else:
            hy, ws = torch.ops.aten._thnn_fused_gru_cell(rows(inputs[t]), hidden_gates, rows(h))
        rows(outs[t]).copy_(hy)
        rows(workspaces[t]).copy_(ws)
        carry(out, t, h, a)
        h = outs[t]
        if mode == "LSTM":
            carry(cells, t, c, a)
            c = cells[t]
    return out, ([c.clone(), workspace, cells] if mode == "LSTM" else [workspace])


def backward(mode: str, grad_out, grad_c_n, h0, c0, weight_hh, out, saved: list, active: list[int], reverse: bool,
             grad_h_n=None):
    if mode not in SAVED:
        return generic_backward(mode, grad_out, grad_c_n, h0, c0, weight_hh, out, saved, active, reverse, grad_h_n)
    steps, batch, hidden = out.shape
    width = weight_hh.shape[0]
    packed = min(active) < batch
    grad_hidden_gates = out.new_zeros(steps, batch, width) if packed else out.new_empty(steps, batch, width)
    grad_x = grad_hidden_gates if mode == "LSTM" else torch.zeros_like(grad_hidden_gates)
    grad_hg_all, grad_x_all, workspaces = per_step(grad_hidden_gates), per_step(grad_x), per_step(saved[0])
    grad_outs = per_step(grad_out) if grad_out is not None else None
    grad_h = torch.zeros_like(h0) if grad_h_n is None else grad_h_n.clone(memory_format=torch.contiguous_format)
    if mode == "LSTM":
        cells = per_step(saved[1])
        cells_prev = per_step(previous(saved[1], c0, reverse))
        grad_c = grad_c_n.clone() if grad_c_n is not None else torch.zeros_like(c0)
    for t in time_steps(steps, not reverse):
        a = active[t]
        rows = rows_of(a, batch)
        if grad_outs is not None:
            grad_h.add_(grad_outs[t])
        dh = rows(grad_h)
        if mode == "LSTM":
            grad_gates, grad_cx, _ = torch.ops.aten._thnn_fused_lstm_cell_backward_impl(
                dh, rows(grad_c), rows(cells_prev[t]), rows(cells[t]), rows(workspaces[t]), False)
            rows(grad_hg_all[t]).copy_(grad_gates)
            rows(grad_c).copy_(grad_cx)
            torch.mm(grad_gates, weight_hh, out=dh)
        else:
            grad_input, grad_hidden, grad_hx, _, _ = torch.ops.aten._thnn_fused_gru_cell_backward(
                dh, rows(workspaces[t]), False)
            rows(grad_x_all[t]).copy_(grad_input)
            rows(grad_hg_all[t]).copy_(grad_hidden)
            torch.addmm(grad_hx, grad_hidden, weight_hh, out=dh)
    grad_c0 = grad_c if mode == "LSTM" else None
    return (grad_x, grad_h, grad_c0, weight_grad(grad_hidden_gates, out, h0, reverse),
            grad_hidden_gates.sum((0, 1)))
