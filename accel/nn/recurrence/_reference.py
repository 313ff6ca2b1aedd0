"""Recurrences of RNN / LSTM / GRU over precomputed input projections.

The input-to-hidden projection of every time step is computed before the loop (one call of the
projection layer over all steps); these functions run only the hidden-to-hidden part. Sequences use
the packed layout of ``torch.nn.utils.rnn.PackedSequence``: rows of step ``t`` are
``data[offsets[t]:offsets[t] + batch_sizes[t]]`` and sequences are sorted by decreasing length, so
at every step the active sequences are a prefix of the batch. A padded batch of equal lengths is
the special case ``batch_sizes = [B] * T``.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch.nn import functional as F

__all__ = ["GATES", "rnn_tanh_cell", "rnn_relu_cell", "lstm_cell", "gru_cell", "CELLS", "run_direction"]

# gates per mode; their order inside the projection follows torch.nn (LSTM: i, f, g, o; GRU: r, z, n)
GATES = {"RNN_TANH": 1, "RNN_RELU": 1, "LSTM": 4, "GRU": 3}


def rnn_tanh_cell(x_proj, state, weight_hh, bias_hh):
    (h,) = state
    return (torch.tanh(x_proj + F.linear(h, weight_hh, bias_hh)),)


def rnn_relu_cell(x_proj, state, weight_hh, bias_hh):
    (h,) = state
    return (torch.relu(x_proj + F.linear(h, weight_hh, bias_hh)),)


def lstm_cell(x_proj, state, weight_hh, bias_hh):
    h, c = state
    i, f, g, o = (x_proj + F.linear(h, weight_hh, bias_hh)).chunk(4, dim=-1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c), c


def gru_cell(x_proj, state, weight_hh, bias_hh):
    (h,) = state
    x_r, x_z, x_n = x_proj.chunk(3, dim=-1)
    h_r, h_z, h_n = F.linear(h, weight_hh, bias_hh).chunk(3, dim=-1)
    r = torch.sigmoid(x_r + h_r)
    z = torch.sigmoid(x_z + h_z)
    n = torch.tanh(x_n + r * h_n)  # the reset gate scales the hidden part only, as in torch.nn.GRU
    return ((1 - z) * n + z * h,)


CELLS: dict[str, Callable] = {"RNN_TANH": rnn_tanh_cell, "RNN_RELU": rnn_relu_cell, "LSTM": lstm_cell,
                              "GRU": gru_cell}


def run_direction(cell: Callable, x_proj: torch.Tensor, batch_sizes: list[int], state: tuple[torch.Tensor, ...],
                  weight_hh: torch.Tensor, bias_hh: torch.Tensor | None, reverse: bool):
    """Run one direction of one layer.

    Args:
        cell: one of :data:`CELLS`.
        x_proj: ``(sum(batch_sizes), gates * hidden)``, the packed input projections.
        batch_sizes: active sequences per step (non-increasing).
        state: initial ``(h,)`` or ``(h, c)``, each ``(batch, hidden)``.
        weight_hh, bias_hh: the hidden-to-hidden weight and bias.
        reverse: process each sequence from its last step to its first.

    Returns:
        ``(outputs, final_state)``: packed ``(sum(batch_sizes), hidden)`` outputs and the state after
        each sequence's last processed step.
    """
    # one split, not a slice per step: a slice's backward writes a zero tensor of the full size,
    # which made the backward quadratic in the number of steps
    inputs = x_proj.split(batch_sizes)
    steps = range(len(batch_sizes) - 1, -1, -1) if reverse else range(len(batch_sizes))
    outputs = [None] * len(batch_sizes)
    for t in steps:
        active = batch_sizes[t]
        new = cell(inputs[t], tuple(s[:active] for s in state), weight_hh, bias_hh)
        outputs[t] = new[0]
        if active == state[0].shape[0]:
            state = new
        else:
            # Forward: finished sequences keep their last state. Reverse: sequences that have not
            # started yet keep the initial state until their last step comes.
            state = tuple(torch.cat([n, s[active:]]) for n, s in zip(new, state))
    return torch.cat(outputs), state
