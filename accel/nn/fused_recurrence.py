"""The whole recurrence of one direction of one layer with a hand-written backward-through-time.

The fast twin of :func:`accel.nn.recurrence.run_direction` (the Python reference loop, which autograd
differentiates step by step). Layout: padded, time-major. ``x_proj`` is ``(T, B, gates * H)``, the
input projections of every step with ``bias_ih`` included; ``active[t]`` is the number of sequences
still running at step ``t`` (a prefix of the batch, as in a ``PackedSequence``; ``None``: all).

What makes it fast on CPU (measured against the reference in ``experiments/bt_recurrence.py``):

- one GEMM per step for the hidden path, added in place into a preallocated gate buffer
  (``addmm_``), and the gate activations applied in place in that buffer, which is then kept for
  the backward: no per-step allocation, no autograd graph of ~10 nodes per step;
- the backward's per-step work reduced to ~5 small ops: every factor that does not depend on the
  incoming gradient (``sigmoid'``, ``tanh'``, products with the saved gates) is computed for all
  steps at once before the loop, with few large elementwise ops;
- the weight and bias gradients taken after the loop with one GEMM over all ``T * B`` rows.

Rows of a sequence that has finished (forward) or not yet started (reverse) carry the state through
the step unchanged, in the outputs as well: so ``out[last]`` is every sequence's final state, and
the previous-state tensor of every step is ``out`` shifted by one step. The gradient carries back
the same way.

On CUDA the LSTM and GRU step runs ``torch``'s fused cells that take precomputed input gates
(``aten._thnn_fused_lstm_cell`` / ``_thnn_fused_gru_cell`` and their backward), see
:mod:`accel.nn.fused_recurrence_cuda`.
"""
from __future__ import annotations

import torch

__all__ = ["SAVED", "forward", "backward", "previous"]

# tensors each mode keeps for its backward besides ``out``; the LSTM also returns ``c_n``
SAVED = {"LSTM": ("gates", "cells", "tanh_cells"), "GRU": ("gates", "hidden_gates"), "RNN_TANH": (),
         "RNN_RELU": ()}


def _time_steps(steps: int, reverse: bool):
    return range(steps - 1, -1, -1) if reverse else range(steps)


def previous(states: torch.Tensor, initial: torch.Tensor, reverse: bool) -> torch.Tensor:
    """The state each step starts from: ``states`` shifted by one step, ``initial`` at the first step."""
    if reverse:
        return torch.cat([states[1:], initial.unsqueeze(0)])
    return torch.cat([initial.unsqueeze(0), states[:-1]])


def _carry(buffer: torch.Tensor, t: int, state: torch.Tensor, active: int) -> None:
    if active < buffer.shape[1]:
        buffer[t, active:] = state[active:]


def _per_step(tensor: torch.Tensor, start: int | None = None, stop: int | None = None):
    """Views of each time step (optionally of some columns), made in one call rather than by
    slicing inside the loop: at B=32, H=256 a step's ops take a few microseconds each, as much as the
    Python slicing around them."""
    return (tensor if start is None else tensor[..., start:stop]).unbind(0)


def _rows(active: int, batch: int):
    """The running rows of a step: the view itself when all run."""
    return (lambda v: v) if active == batch else (lambda v: v[:active])


def forward(mode: str, x_proj, h0, c0, weight_hh, bias_hh, active: list[int], reverse: bool):
    """Returns ``(out, extra)``: ``out`` ``(T, B, H)`` and the list of tensors named in
    :data:`SAVED` (for the LSTM, ``c_n`` first)."""
    steps, batch, _ = x_proj.shape
    hidden = h0.shape[-1]
    w_t = weight_hh.t()
    out = x_proj.new_empty(steps, batch, hidden)
    outs = _per_step(out)
    h = h0
    if mode == "GRU":
        gates = x_proj.clone()  # becomes r, z, n
        hidden_gates = x_proj.new_empty(steps, batch, 3 * hidden)  # W_hh h + b_hh, the backward needs W_hn h + b_hn
        hg_all, rz_all, n_all = _per_step(hidden_gates), _per_step(gates, 0, 2 * hidden), _per_step(gates, 2 * hidden)
        hg_rz, hg_n, r_all, z_all = (_per_step(hidden_gates, 0, 2 * hidden), _per_step(hidden_gates, 2 * hidden),
                                     _per_step(gates, 0, hidden), _per_step(gates, hidden, 2 * hidden))
        for t in _time_steps(steps, reverse):
            a = active[t]
            rows = _rows(a, batch)
            h_prev = rows(h)
            if bias_hh is None:
                torch.mm(h_prev, w_t, out=rows(hg_all[t]))
            else:
                torch.addmm(bias_hh, h_prev, w_t, out=rows(hg_all[t]))
            rows(rz_all[t]).add_(rows(hg_rz[t])).sigmoid_()
            n = rows(n_all[t]).addcmul_(rows(r_all[t]), rows(hg_n[t])).tanh_()
            torch.lerp(n, h_prev, rows(z_all[t]), out=rows(outs[t]))  # (1 - z) n + z h
            _carry(out, t, h, a)
            h = outs[t]
        return out, [gates, hidden_gates]
    gates = x_proj + bias_hh if bias_hh is not None else x_proj.clone()
    gates_all = _per_step(gates)
    if mode != "LSTM":
        activation = torch.tanh if mode == "RNN_TANH" else torch.clamp_min  # relu has no out=
        extra = () if mode == "RNN_TANH" else (0,)
        for t in _time_steps(steps, reverse):
            a = active[t]
            rows = _rows(a, batch)
            activation(rows(gates_all[t]).addmm_(rows(h), w_t), *extra, out=rows(outs[t]))
            _carry(out, t, h, a)
            h = outs[t]
        return out, []
    cells = x_proj.new_empty(steps, batch, hidden)
    tanh_cells = x_proj.new_zeros(steps, batch, hidden) if min(active) < batch else torch.empty_like(cells)
    cells_all, tanh_all = _per_step(cells), _per_step(tanh_cells)
    i_all, f_all, if_all = _per_step(gates, 0, hidden), _per_step(gates, hidden, 2 * hidden), _per_step(gates, 0, 2 * hidden)
    g_all, o_all = _per_step(gates, 2 * hidden, 3 * hidden), _per_step(gates, 3 * hidden)
    c = c0
    for t in _time_steps(steps, reverse):
        a = active[t]
        rows = _rows(a, batch)
        rows(gates_all[t]).addmm_(rows(h), w_t)
        rows(if_all[t]).sigmoid_()
        g = rows(g_all[t]).tanh_()
        o = rows(o_all[t]).sigmoid_()
        c_new = torch.mul(rows(f_all[t]), rows(c), out=rows(cells_all[t])).addcmul_(rows(i_all[t]), g)
        torch.mul(o, torch.tanh(c_new, out=rows(tanh_all[t])), out=rows(outs[t]))
        _carry(out, t, h, a)
        _carry(cells, t, c, a)
        h, c = outs[t], cells_all[t]
    return out, [c.clone(), gates, cells, tanh_cells]


def _lstm_factors(gates, c_prev, tanh_cells):
    """For every step at once: the derivative of each gate's pre-activation per unit of the cell
    gradient (i, f, g) or of the hidden gradient (o), and ``d c / d h`` through the output."""
    s = gates.unflatten(-1, (4, -1))
    i, f, g, o = s.unbind(-2)
    factors = torch.addcmul(s, s, s, value=-1)  # sigmoid' = s (1 - s) (the g slot is overwritten)
    factors[..., 0, :].mul_(g)
    factors[..., 1, :].mul_(c_prev)
    torch.mul(i, 1 - g.square(), out=factors[..., 2, :])
    factors[..., 3, :].mul_(tanh_cells)
    cell_from_hidden = (1 - tanh_cells.square()).mul_(o)
    return factors, cell_from_hidden


def _gru_factors(gates, hidden_gates, h_prev):
    """Per unit of the hidden-state gradient, for every step at once: the pre-activation gradients of
    r, z and of the hidden part of n (laid out as the hidden gates), and of the input part of n."""
    r, z, n = gates.unflatten(-1, (3, -1)).unbind(-2)
    hidden = h_prev.shape[-1]
    d_n = (1 - z) * (1 - n.square())
    factors = gates.new_empty(*gates.shape[:-1], 3, hidden)
    torch.mul(d_n * hidden_gates[..., 2 * hidden:], r - r.square(), out=factors[..., 0, :])
    torch.mul(h_prev - n, z - z.square(), out=factors[..., 1, :])
    torch.mul(d_n, r, out=factors[..., 2, :])
    return factors, d_n


def backward(mode: str, grad_out, grad_c_n, h0, c0, weight_hh, out, saved: list, active: list[int], reverse: bool):
    """Gradients ``(x_proj, h0, c0, weight_hh, bias_hh)`` (``c0``'s is ``None`` but for the LSTM).

    ``grad_out`` (``(T, B, H)``, or ``None``) already holds the gradient of ``h_n`` (a view of ``out``);
    ``grad_c_n`` is the gradient of the LSTM's ``c_n`` (or ``None``)."""
    steps, batch, hidden = out.shape
    packed = min(active) < batch
    h_prev = previous(out, h0, reverse)
    width = weight_hh.shape[0]
    # the gradient of the pre-activation gates is the gradient of x_proj (for the GRU: of W_hh h + b_hh)
    grad_gates = out.new_zeros(steps, batch, width) if packed else out.new_empty(steps, batch, width)
    grad_gates_all = _per_step(grad_gates)
    grad_h = torch.zeros_like(h0)
    grad_h_columns = grad_h.unsqueeze(1)
    order = list(_time_steps(steps, not reverse))
    # padded: the next step's output gradient is added by the GEMM that carries the gradient back
    fold = grad_out is not None and not packed
    grad_outs = _per_step(grad_out) if grad_out is not None else None
    if fold:
        grad_h.copy_(grad_outs[order[0]])

    def start_step(k: int, t: int):
        if grad_out is not None and not fold:
            grad_h.add_(grad_outs[t])
        return grad_outs[order[k + 1]] if fold and k + 1 < steps else None

    def carry_back(rows, t: int, dh, next_grad, direct=None):
        """``dh <- grad_gates[t] @ weight_hh (+ direct) (+ the next step's output gradient)``."""
        if direct is None and next_grad is None:
            torch.mm(rows(grad_gates_all[t]), weight_hh, out=dh)
        else:
            torch.addmm(direct if direct is not None else next_grad, rows(grad_gates_all[t]), weight_hh, out=dh)

    grad_c0 = None
    if mode == "LSTM":
        gates, cells, tanh_cells = saved
        factors, cell_from_hidden = _lstm_factors(gates, previous(cells, c0, reverse), tanh_cells)
        grad_c = grad_c_n.clone() if grad_c_n is not None else torch.zeros_like(c0)
        grad_c_columns = grad_c.unsqueeze(1)
        by_cell, by_hidden = _per_step(factors[:, :, :3]), _per_step(factors[:, :, 3])
        cell_from_hidden, forget = _per_step(cell_from_hidden), _per_step(gates, hidden, 2 * hidden)
        grad_by_cell = _per_step(grad_gates.unflatten(-1, (4, hidden))[:, :, :3])
        grad_by_hidden = _per_step(grad_gates, 3 * hidden)
        for k, t in enumerate(order):
            a = active[t]
            rows = _rows(a, batch)
            next_grad = start_step(k, t)
            dh, dc = rows(grad_h), rows(grad_c)
            dc.addcmul_(dh, rows(cell_from_hidden[t]))
            torch.mul(rows(by_cell[t]), rows(grad_c_columns), out=rows(grad_by_cell[t]))
            torch.mul(rows(by_hidden[t]), dh, out=rows(grad_by_hidden[t]))
            carry_back(rows, t, dh, next_grad)
            dc.mul_(rows(forget[t]))
        grad_c0 = grad_c
        grad_x = grad_gates
    elif mode == "GRU":
        gates, hidden_gates = saved
        factors, d_n = _gru_factors(gates, hidden_gates, h_prev)
        grad_x_n = out.new_zeros(steps, batch, hidden) if packed else torch.empty_like(out)
        direct = torch.empty_like(h0)
        factors, d_n, grad_n, update = (_per_step(factors), _per_step(d_n), _per_step(grad_x_n),
                                        _per_step(gates, hidden, 2 * hidden))
        grad_three = _per_step(grad_gates.unflatten(-1, (3, hidden)))
        for k, t in enumerate(order):
            a = active[t]
            rows = _rows(a, batch)
            next_grad = start_step(k, t)
            dh = rows(grad_h)
            torch.mul(rows(factors[t]), rows(grad_h_columns), out=rows(grad_three[t]))
            torch.mul(rows(d_n[t]), dh, out=rows(grad_n[t]))
            if next_grad is None:
                torch.mul(dh, rows(update[t]), out=rows(direct))
            else:
                torch.addcmul(next_grad, dh, update[t], out=direct)
            carry_back(rows, t, dh, None, rows(direct))
        grad_x = torch.cat([grad_gates[..., :2 * hidden], grad_x_n], dim=-1)
    else:
        derivative = (1 - out.square()) if mode == "RNN_TANH" else (out > 0).to(out.dtype)
        derivative = _per_step(derivative)
        for k, t in enumerate(order):
            a = active[t]
            rows = _rows(a, batch)
            next_grad = start_step(k, t)
            dh = rows(grad_h)
            torch.mul(dh, rows(derivative[t]), out=rows(grad_gates_all[t]))
            carry_back(rows, t, dh, next_grad)
        grad_x = grad_gates
    flat = grad_gates.reshape(-1, width)
    grad_weight = flat.t().mm(h_prev.reshape(-1, hidden))
    return grad_x, grad_h, grad_c0, grad_weight, flat.sum(0)
