"""The whole recurrence of one direction of one layer with a hand-written backward-through-time.

The fast twin of :func:`accel.nn.recurrence._reference.run_direction` (the Python reference loop, which autograd
differentiates step by step). Layout: padded, time-major. ``x_proj`` is ``(T, B, gates * H)``, the
input projections of every step with ``bias_ih`` included; ``active[t]`` is the number of sequences
still running at step ``t`` (a prefix of the batch, as in a ``PackedSequence``; ``None``: all).

What makes it fast on CPU (measured against the reference in ``experiments/bt_recurrence.py``):

- one GEMM per step for the hidden path, written into a preallocated buffer (``addmm`` / ``mm`` with
  ``out=``), and the step's elementwise work into the gate buffer that is then kept for the backward:
  no autograd graph of ~10 nodes per step. The LSTM's step runs in a hand-written kernel
  (``accel/nn/recurrence/_csrc/lstm_step.cpp``: ``x_proj``'s step and ``b_hh`` added, activations, cell and hidden state
  in one pass forward; the gate gradients, ``b_hh``'s share and the carried cell gradient in one pass
  backward);
- the backward's per-step work reduced to one GEMM plus that pass for the LSTM (its torch-op twin and
  the GRU and the plain RNN compute every factor that does not depend on the incoming gradient in a
  few whole-sequence ops before the backward loop, then ~5 small ops per step);
- the weight and bias gradients taken after the loop with two GEMMs over all ``T * B`` rows.

The whole-sequence buffers (outputs, saved gates, their gradient) are ordinary tensors, allocated per call:
the library keeps no memory between calls and sets no allocator option. A step's large buffers are freed and
allocated again each training step; where the C allocator returns them to the system in between, each step
faults their pages in again (the performance guide gives the allocator settings that avoid it).

Rows of a sequence that has finished (forward) or not yet started (reverse) carry the state through
the step unchanged, in the outputs as well: so ``out[last]`` is every sequence's final state, and
the previous-state tensor of every step is ``out`` shifted by one step. The gradient carries back
the same way.

On CUDA the LSTM and GRU step runs ``torch``'s fused cells that take precomputed input gates
(``aten._thnn_fused_lstm_cell`` / ``_thnn_fused_gru_cell`` and their backward), see
:mod:`accel.nn.recurrence._fused_cuda`.
"""
from __future__ import annotations

import torch

from accel.nn.recurrence import _kernel as recurrence_kernel

__all__ = ["SAVED", "forward", "backward", "previous", "use_kernel", "time_steps", "carry", "per_step", "rows_of",
           "weight_grad"]

# the LSTM step's elementwise work through accel/nn/recurrence/_csrc/lstm_step.cpp when it builds (else the torch ops below,
# its reference twin); tests switch this off to compare the two
use_kernel = True


# elements per step (rows x hidden) from which the kernel splits a step's rows over torch's threads: below
# it a step's elementwise work is too short to pay for waking a thread
PARALLEL_GRAIN = 4096


def _lstm_kernel(tensor: torch.Tensor):
    return recurrence_kernel.lstm_step(tensor.dtype) if use_kernel and tensor.device.type == "cpu" else None


def _blocks(rows: int, hidden: int) -> int:
    """Row blocks of one kernel step: one per thread when the kernel has threads and the step is large enough."""
    if not recurrence_kernel.parallel or rows * hidden < PARALLEL_GRAIN:
        return 1
    return max(1, min(torch.get_num_threads(), rows))


# tensors each mode keeps for its backward besides ``out``; the LSTM also returns ``c_n``
SAVED = {"LSTM": ("gates", "cells"), "GRU": ("gates", "hidden_gates"), "RNN_TANH": (), "RNN_RELU": ()}


def time_steps(steps: int, reverse: bool):
    return range(steps - 1, -1, -1) if reverse else range(steps)


def previous(states: torch.Tensor, initial: torch.Tensor, reverse: bool) -> torch.Tensor:
    """The state each step starts from: ``states`` shifted by one step, ``initial`` at the first step."""
    if reverse:
        return torch.cat([states[1:], initial.unsqueeze(0)])
    return torch.cat([initial.unsqueeze(0), states[:-1]])


def carry(buffer: torch.Tensor, t: int, state: torch.Tensor, active: int) -> None:
    if active < buffer.shape[1]:
        buffer[t, active:] = state[active:]


def per_step(tensor: torch.Tensor, start: int | None = None, stop: int | None = None):
    """Views of each time step (optionally of some columns), made in one call rather than by
    slicing inside the loop: a step's ops are small, and Python slicing around each would cost as much."""
    return (tensor if start is None else tensor[..., start:stop]).unbind(0)


def rows_of(active: int, batch: int):
    """The running rows of a step: the view itself when all run."""
    return (lambda v: v) if active == batch else (lambda v: v[:active])


def forward(mode: str, x_proj, h0, c0, weight_hh, bias_hh, active: list[int], reverse: bool,
            keep_for_backward: bool = True):
    """Returns ``(out, extra)``: ``out`` ``(T, B, H)`` and the list of tensors named in
    :data:`SAVED` (for the LSTM, ``c_n`` first; its saved tensors are empty unless ``keep_for_backward``)."""
    steps, batch, _ = x_proj.shape
    hidden = h0.shape[-1]
    w_t = weight_hh.t().contiguous()  # h @ W^T with W^T stored row-major: MKL's faster layout for the step GEMM
    if mode == "LSTM":
        return _lstm_forward(x_proj, h0, c0, w_t, bias_hh, active, reverse, keep_for_backward)
    out = x_proj.new_empty((steps, batch, hidden))
    outs = per_step(out)
    h = h0
    if mode == "GRU":
        gates = x_proj.new_empty(x_proj.shape).copy_(x_proj)  # becomes r, z, n
        # W_hh h + b_hh: the backward needs W_hn h + b_hn
        hidden_gates = x_proj.new_empty((steps, batch, 3 * hidden))
        hg_all, rz_all, n_all = per_step(hidden_gates), per_step(gates, 0, 2 * hidden), per_step(gates, 2 * hidden)
        hg_rz, hg_n, r_all, z_all = (per_step(hidden_gates, 0, 2 * hidden), per_step(hidden_gates, 2 * hidden),
                                     per_step(gates, 0, hidden), per_step(gates, hidden, 2 * hidden))
        for t in time_steps(steps, reverse):
            a = active[t]
            rows = rows_of(a, batch)
            h_prev = rows(h)
            if bias_hh is None:
                torch.mm(h_prev, w_t, out=rows(hg_all[t]))
            else:
                torch.addmm(bias_hh, h_prev, w_t, out=rows(hg_all[t]))
            rows(rz_all[t]).add_(rows(hg_rz[t])).sigmoid_()
            n = rows(n_all[t]).addcmul_(rows(r_all[t]), rows(hg_n[t])).tanh_()
            torch.lerp(n, h_prev, rows(z_all[t]), out=rows(outs[t]))  # (1 - z) n + z h
            carry(out, t, h, a)
            h = outs[t]
        return out, [gates, hidden_gates]
    # the plain RNN: W_hh h + x_proj + b_hh per step into one step's scratch, activated into out
    scratch, inputs = x_proj.new_empty(batch, x_proj.shape[-1]), per_step(x_proj)

    def pre_activation(t, rows):
        g = torch.addmm(rows(inputs[t]), rows(h), w_t, out=rows(scratch))
        return g if bias_hh is None else g.add_(bias_hh)

    activation = torch.tanh if mode == "RNN_TANH" else torch.clamp_min  # relu has no out=
    extra = () if mode == "RNN_TANH" else (0,)
    for t in time_steps(steps, reverse):
        a = active[t]
        rows = rows_of(a, batch)
        activation(pre_activation(t, rows), *extra, out=rows(outs[t]))
        carry(out, t, h, a)
        h = outs[t]
    return out, []


def _lstm_forward(x_proj, h0, c0, w_t, bias_hh, active: list[int], reverse: bool, keep_for_backward: bool):
    """The LSTM's forward: per step one GEMM (``h W_hh^T``), then the elementwise work (``x_proj``'s step
    and ``b_hh`` added, activations, cell and hidden state) in one pass of the kernel, or ``addmm`` into
    the gate buffer and its torch-op twin. Kept for the backward: the activated gates and the cell states,
    nothing derived from them (the backward recomputes ``tanh(c)`` and the derivatives: cheaper than a
    (T, B, 5H) buffer more, written here and read back there). Under ``no_grad`` one step's gates and two
    cell states are reused."""
    steps, batch, width = x_proj.shape
    hidden = h0.shape[-1]
    x_proj, c0 = x_proj.contiguous(), c0.contiguous()  # the kernel reads them by pointer (no copy if already)
    out = x_proj.new_empty((steps, batch, hidden))
    gates = x_proj.new_empty((steps if keep_for_backward else 1, batch, width))
    cells = x_proj.new_empty((steps if keep_for_backward else 2, batch, hidden))
    outs, inputs, gates_all, cells_all = per_step(out), per_step(x_proj), per_step(gates), per_step(cells)
    kernel = _lstm_kernel(x_proj)
    if kernel is not None:  # h W_hh^T into a scratch (mm, not addmm: no copy of x_proj's step into it first)
        bias = (bias_hh if bias_hh is not None else x_proj.new_zeros(width)).contiguous()
        scratch = x_proj.new_empty(batch, width)
        blocks = {a: _blocks(a, hidden) for a in set(active)}
    h, c = h0, c0
    for k, t in enumerate(time_steps(steps, reverse)):
        a = active[t]
        rows = rows_of(a, batch)
        g, c_new = gates_all[t if keep_for_backward else 0], cells_all[t if keep_for_backward else k % 2]
        if kernel is not None:  # every row block starts at its tensor's first row: data_ptr is rows(.)'s
            torch.mm(rows(h), w_t, out=rows(scratch))
            kernel[0](a, hidden, blocks[a], inputs[t], scratch, bias, g, c, c_new, outs[t])
        else:
            torch.addmm(rows(inputs[t]), rows(h), w_t, out=rows(g))
            _lstm_step_torch(rows(g), bias_hh, rows(c), rows(c_new), rows(outs[t]))
        if a < batch:  # rows that do not run this step carry their state
            outs[t][a:], c_new[a:] = h[a:], c[a:]
        h, c = outs[t], c_new
    saved = [gates, cells] if keep_for_backward else [x_proj.new_empty(0), x_proj.new_empty(0)]
    return out, [c.clone(), *saved]


def _lstm_step_torch(g, bias_hh, c_prev, c_new, h_new):
    """The twin of accel/nn/recurrence/_csrc/lstm_step.cpp's forward step, in place on one step's running rows."""
    if bias_hh is not None:
        g.add_(bias_hh)
    hidden = c_prev.shape[-1]
    i, f, cell_input, o = g.unflatten(-1, (4, hidden)).unbind(-2)
    g[:, :2 * hidden].sigmoid_()
    cell_input.tanh_()
    o.sigmoid_()
    torch.mul(f, c_prev, out=c_new).addcmul_(i, cell_input)
    torch.mul(o, torch.tanh(c_new), out=h_new)


def _lstm_factors(gates, cells, c0, reverse: bool):
    """The twin's backward factors for every step at once: the pre-activation gradients of i, f, g per
    unit of the cell gradient and of o per unit of the hidden gradient ``(T, B, 4, H)``, and
    ``d c / d h = o (1 - tanh(c)^2)`` ``(T, B, H)``."""
    i, f, cell_input, o = gates.unflatten(-1, (4, -1)).unbind(-2)
    tanh_cell = torch.tanh(cells)
    factors = torch.stack([i * (1 - i) * cell_input, f * (1 - f) * previous(cells, c0, reverse),
                           i * (1 - cell_input.square()), o * (1 - o) * tanh_cell], dim=2)
    return factors, o * (1 - tanh_cell.square())


def _gru_factors(gates, hidden_gates, h_prev):
    """Per unit of the hidden-state gradient, for every step at once: the pre-activation gradients of
    r, z and of the hidden part of n (laid out as the hidden gates), and of the input part of n."""
    r, z, n = gates.unflatten(-1, (3, -1)).unbind(-2)
    hidden = h_prev.shape[-1]
    d_n = (1 - z) * (1 - n.square())
    factors = gates.new_empty((*gates.shape[:-1], 3, hidden))
    torch.mul(d_n * hidden_gates[..., 2 * hidden:], r - r.square(), out=factors[..., 0, :])
    torch.mul(h_prev - n, z - z.square(), out=factors[..., 1, :])
    torch.mul(d_n, r, out=factors[..., 2, :])
    return factors, d_n


def backward(mode: str, grad_out, grad_c_n, h0, c0, weight_hh, out, saved: list, active: list[int], reverse: bool,
             grad_h_n=None):
    """Gradients ``(x_proj, h0, c0, weight_hh, bias_hh)`` (``c0``'s is ``None`` but for the LSTM).

    ``grad_out`` (``(T, B, H)``, or ``None``) is the gradient of ``out``; ``grad_h_n`` (or ``None``) that of
    the final state ``h_n`` (``out``'s last step) where it is an output of its own; ``grad_c_n`` is the
    gradient of the LSTM's ``c_n`` (or ``None``)."""
    steps, batch, hidden = out.shape
    packed = min(active) < batch
    width = weight_hh.shape[0]
    # the gradient of the pre-activation gates is the gradient of x_proj (for the GRU: of W_hh h + b_hh)
    grad_gates = out.new_empty((steps, batch, width))
    if packed:
        grad_gates.zero_()
    grad_gates_all = per_step(grad_gates)
    grad_h = torch.zeros_like(h0, memory_format=torch.contiguous_format)  # the LSTM kernel reads it by pointer
    grad_h_columns = grad_h.unsqueeze(1)
    order = list(time_steps(steps, not reverse))
    # padded: the next step's output gradient is added by the GEMM that carries the gradient back
    fold = grad_out is not None and not packed
    grad_outs = per_step(grad_out) if grad_out is not None else None
    if fold:
        grad_h.copy_(grad_outs[order[0]])
    if grad_h_n is not None:  # where the backward starts: as if added to grad_out's last step
        grad_h.add_(grad_h_n)

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

    grad_c0 = grad_bias = None
    if mode == "LSTM":
        gates, cells = saved
        c0 = c0.contiguous()
        grad_c = torch.zeros_like(c0, memory_format=torch.contiguous_format)
        if grad_c_n is not None:
            grad_c.copy_(grad_c_n)
        kernel = _lstm_kernel(out)
        if kernel is not None:
            gates_all, cells_all = per_step(gates), per_step(cells)
            # each step's b_hh gradient, summed over the rows of each of its row blocks
            blocks = {a: _blocks(a, hidden) for a in set(active)}
            grad_bias_steps = out.new_zeros(steps, max(blocks.values()), width)
            first = steps - 1 if reverse else 0
            for k, t in enumerate(order):
                next_grad = start_step(k, t)
                c_prev = c0 if t == first else cells_all[t + 1 if reverse else t - 1]
                kernel[1](active[t], hidden, blocks[active[t]], grad_h, grad_c, gates_all[t], cells_all[t], c_prev,
                          grad_gates_all[t], grad_bias_steps[t])
                rows = rows_of(active[t], batch)
                carry_back(rows, t, rows(grad_h), next_grad)
            grad_bias = grad_bias_steps.sum((0, 1))
        else:
            factors, cell_from_hidden = _lstm_factors(gates, cells, c0, reverse)
            grad_c_columns = grad_c.unsqueeze(1)
            by_cell, by_hidden = per_step(factors[:, :, :3]), per_step(factors[:, :, 3])
            cell_from_hidden, forget = per_step(cell_from_hidden), per_step(gates, hidden, 2 * hidden)
            grad_by_cell = per_step(grad_gates.unflatten(-1, (4, hidden))[:, :, :3])
            grad_by_hidden = per_step(grad_gates, 3 * hidden)
            for k, t in enumerate(order):
                rows = rows_of(active[t], batch)
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
        factors, d_n = _gru_factors(gates, hidden_gates, previous(out, h0, reverse))
        grad_x_n = out.new_empty(out.shape)
        if packed:
            grad_x_n.zero_()
        direct = torch.empty_like(h0)
        factors, d_n, grad_n, update = (per_step(factors), per_step(d_n), per_step(grad_x_n),
                                        per_step(gates, hidden, 2 * hidden))
        grad_three = per_step(grad_gates.unflatten(-1, (3, hidden)))
        for k, t in enumerate(order):
            a = active[t]
            rows = rows_of(a, batch)
            next_grad = start_step(k, t)
            dh = rows(grad_h)
            torch.mul(rows(factors[t]), rows(grad_h_columns), out=rows(grad_three[t]))
            torch.mul(rows(d_n[t]), dh, out=rows(grad_n[t]))
            if next_grad is None:
                torch.mul(dh, rows(update[t]), out=rows(direct))
            else:
                torch.addcmul(next_grad, dh, update[t], out=direct)
            carry_back(rows, t, dh, None, rows(direct))
        grad_x = out.new_empty(grad_gates.shape)
        torch.cat([grad_gates[..., :2 * hidden], grad_x_n], dim=-1, out=grad_x)
    else:
        derivative = (1 - out.square()) if mode == "RNN_TANH" else (out > 0).to(out.dtype)
        derivative = per_step(derivative)
        for k, t in enumerate(order):
            a = active[t]
            rows = rows_of(a, batch)
            next_grad = start_step(k, t)
            dh = rows(grad_h)
            torch.mul(dh, rows(derivative[t]), out=rows(grad_gates_all[t]))
            carry_back(rows, t, dh, next_grad)
        grad_x = grad_gates
    if grad_bias is None:
        grad_bias = grad_gates.sum((0, 1))
    return grad_x, grad_h, grad_c0, weight_grad(grad_gates, out, h0, reverse), grad_bias


def weight_grad(grad_gates, out, h0, reverse: bool):
    """``sum_t grad_gates[t]^T h_prev[t]`` as two GEMMs over all steps (``h_prev`` is ``out`` shifted)."""
    first, later, earlier = (-1, grad_gates[:-1], out[1:]) if reverse else (0, grad_gates[1:], out[:-1])
    return torch.addmm(grad_gates[first].t().mm(h0), later.flatten(0, 1).t(), earlier.flatten(0, 1))
