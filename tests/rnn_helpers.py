"""Builders shared by the BT RNN test modules (test modules never import each other)."""
from __future__ import annotations

import torch

from accel.nn import BTGRU, BTLSTM, BTRNN

INPUT, HIDDEN = 24, 6  # in_shape (4, 6), hidden_shape (3, 2)
KINDS = {"lstm": BTLSTM, "gru": BTGRU, "rnn_tanh": BTRNN, "rnn_relu": BTRNN}


def make(kind, **kwargs):
    """A small float64 BT RNN of ``kind`` (a key of :data:`KINDS`)."""
    extra = {"nonlinearity": kind[4:]} if kind.startswith("rnn") else {}
    return KINDS[kind](INPUT, HIDDEN, in_shape=(4, 6), hidden_shape=(3, 2), ranks=2, num_blocks=2,
                       dtype=torch.float64, **extra, **kwargs)


def initial_state(kind, layers, directions, batch):
    h0 = torch.randn(layers * directions, batch, HIDDEN, dtype=torch.float64)
    return (h0, torch.randn_like(h0)) if kind == "lstm" else h0


def assert_states_close(a, b):
    for x, y in zip(a if isinstance(a, tuple) else (a,), b if isinstance(b, tuple) else (b,)):
        torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-10)


def flat_outputs(out, state):
    """``[output data, *final states]`` of an RNN's ``(output, state)``."""
    out = out.data if hasattr(out, "batch_sizes") else out
    return [out, *(state if isinstance(state, tuple) else (state,))]


def btlstm_step_outputs(seed: int, steps: int):
    """``steps`` forward+backward steps of a BTLSTM large enough for the recurrence's whole-sequence buffers to
    be megabytes (64 -> 256, T=40, batch 32): yields each step's output (as the layer returned it) and a copy."""
    torch.manual_seed(seed)
    lstm = BTLSTM(64, 256, batch_first=True)
    for _ in range(steps):
        x = torch.randn(32, 40, 64)
        out, _ = lstm(x)
        out.square().mean().backward()
        yield out.detach(), out.detach().clone()


def produce_btlstm_outputs(queue, trained, done, seed: int, steps: int):
    """A producer process: sends each step's BTLSTM output with a copy, trains three more steps (after it has
    dropped every sent output: memory it let go of would be written over while the receiver holds it), sets
    ``trained`` and stays alive until ``done``."""
    # one thread, as DataLoader workers do: a forked child must not enter the OpenMP pool its parent started
    torch.set_num_threads(1)
    outputs = btlstm_step_outputs(seed, steps + 3)
    for _ in range(steps):
        queue.put(next(outputs))
    for _ in outputs:
        pass
    trained.set()
    done.wait(120)


class BTLSTMDataset(torch.utils.data.Dataset):
    """Each item is a BTLSTM training step's output and its copy, computed in the DataLoader worker."""

    def __init__(self, seed: int, length: int):
        self.seed, self.length = seed, length
        self._outputs = None

    def __len__(self):
        return self.length

    def __getitem__(self, index):
        if self._outputs is None:
            self._outputs = btlstm_step_outputs(self.seed, self.length)
        return next(self._outputs)
