"""The CUDA path of the fused recurrence (accel/nn/recurrence/_fused_cuda.py) run on the CPU: the fused
cells it calls have only CUDA kernels, so this test registers CPU emulations of them (written from
ATen's definitions) for its duration, and compares the path with the generic one on random inputs,
packed and reversed included. On a GPU, tests/test_bt_recurrence.py::test_cuda_fused_cells_match_loop
runs the real cells."""
import itertools

import pytest
import torch

from accel.nn.recurrence import _fused as fused_recurrence
from accel.nn.recurrence import _fused_cuda as fused_recurrence_cuda


def _lstm_cell(input_gates, hidden_gates, cx, input_bias=None, hidden_bias=None):
    i, f, g, o = (input_gates + hidden_gates).chunk(4, 1)
    i, f, g, o = i.sigmoid(), f.sigmoid(), g.tanh(), o.sigmoid()
    cy = f * cx + i * g
    return o * cy.tanh(), cy, torch.cat([i, f, g, o], 1)


def _lstm_cell_backward(grad_hy, grad_cy, cx, cy, workspace, has_bias):
    i, f, g, o = workspace.chunk(4, 1)
    tc = cy.tanh()
    grad_hy = torch.zeros_like(cy) if grad_hy is None else grad_hy
    grad_c = grad_hy * o * (1 - tc * tc) + (0 if grad_cy is None else grad_cy)
    grad_gates = torch.cat([grad_c * g * i * (1 - i), grad_c * cx * f * (1 - f), grad_c * i * (1 - g * g),
                            grad_hy * tc * o * (1 - o)], 1)
    return grad_gates, grad_c * f, grad_gates.sum(0)


def _gru_cell(input_gates, hidden_gates, hx, input_bias=None, hidden_bias=None):
    x_r, x_z, x_n = input_gates.chunk(3, 1)
    h_r, h_z, h_n = hidden_gates.chunk(3, 1)
    r, z = (x_r + h_r).sigmoid(), (x_z + h_z).sigmoid()
    n = (x_n + r * h_n).tanh()
    return n + z * (hx - n), torch.cat([r, z, n, hx, h_n], 1)


def _gru_cell_backward(grad_hy, workspace, has_bias):
    r, z, n, hx, h_n = workspace.chunk(5, 1)
    grad_n = grad_hy * (1 - z) * (1 - n * n)
    grad_z = grad_hy * (hx - n) * z * (1 - z)
    grad_r = grad_n * h_n * r * (1 - r)
    grad_input = torch.cat([grad_r, grad_z, grad_n], 1)
    grad_hidden = torch.cat([grad_r, grad_z, grad_n * r], 1)
    return grad_input, grad_hidden, grad_hy * z, grad_input.sum(0), grad_hidden.sum(0)


@pytest.fixture(scope="module")
def emulated_cells():
    library = torch.library.Library("aten", "IMPL")
    for name, fn in (("_thnn_fused_lstm_cell", _lstm_cell),
                     ("_thnn_fused_lstm_cell_backward_impl", _lstm_cell_backward),
                     ("_thnn_fused_gru_cell", _gru_cell), ("_thnn_fused_gru_cell_backward", _gru_cell_backward)):
        library.impl(name, fn, "CPU")
    yield
    library._destroy()


@pytest.mark.parametrize("mode,reverse,lengths", list(itertools.product(["LSTM", "GRU", "RNN_TANH"], [False, True],
                                                                        ["equal", "unequal"])))
@pytest.mark.parametrize("grad_final", [False, True])  # h_n's gradient given apart (the op's h_n output)
def test_cuda_path_matches_generic_path(emulated_cells, seed, mode, reverse, lengths, grad_final):
    torch.manual_seed(seed)
    steps, batch, hidden = 5, 4, 3
    width = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1}[mode] * hidden
    active = [4] * 5 if lengths == "equal" else [4, 3, 3, 2, 1]
    kw = {"dtype": torch.float64}
    x_proj = torch.randn(steps, batch, width, **kw)
    h0, c0 = torch.randn(batch, hidden, **kw), torch.randn(batch, hidden, **kw)
    weight, bias = torch.randn(width, hidden, **kw), torch.randn(width, **kw)
    c0 = c0 if mode == "LSTM" else None
    results = {}
    for name, module in (("cuda", fused_recurrence_cuda), ("generic", fused_recurrence)):
        out, extra = module.forward(mode, x_proj, h0, c0, weight, bias, active, reverse)
        grad_out = torch.randn(steps, batch, hidden, generator=torch.Generator().manual_seed(seed), **kw)
        grad_c_n = torch.ones(batch, hidden, **kw) if mode == "LSTM" else None
        grad_h_n = torch.randn(hidden, batch, generator=torch.Generator().manual_seed(seed + 1), **kw)
        grad_h_n = grad_h_n.t() if grad_final else None  # a column-major view: copied into the row-major carry
        saved = extra[1:] if mode == "LSTM" else extra
        grads = module.backward(mode, grad_out, grad_c_n, h0, c0, weight, out, saved, active, reverse, grad_h_n)
        results[name] = [out, *(extra[:1] if mode == "LSTM" else []), *(g for g in grads if g is not None)]
    for a, b in zip(results["cuda"], results["generic"]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
