"""The fused recurrence op (accel::recurrence_v2) against the Python reference loop, its gradients, and its
errors. Export, ONNX and compile of the RNNs: tests/test_bt_rnn_export.py."""
import itertools

import pytest
import torch
from rnn_helpers import INPUT, KINDS, flat_outputs, initial_state, make
from torch.nn.utils.rnn import pack_padded_sequence

from accel.nn.recurrence._onnx import onnx_direction
from accel.nn.recurrence._op import fused_direction, padded_direction
from accel.nn.recurrence._reference import CELLS, GATES, run_direction


def _grads(outputs, inputs, seed_grads):
    return torch.autograd.grad(outputs, inputs, seed_grads, allow_unused=True, retain_graph=True)


GRID = list(itertools.product(KINDS, ["padded", "batch_first", "packed"], [1, 2], [False, True], [False, True]))


@pytest.mark.parametrize("kind,layout,num_layers,bidirectional,with_h0", GRID)
def test_fused_matches_loop_outputs_and_all_gradients(seed, kind, layout, num_layers, bidirectional, with_h0):
    """Same module, recurrence='fused' vs 'loop': outputs, final states, and the gradients of every
    parameter, of the input and of h0/c0 under random output gradients."""
    torch.manual_seed(seed)
    bt = make(kind, num_layers=num_layers, bidirectional=bidirectional, batch_first=layout == "batch_first")
    batch, steps = 4, 6
    x = torch.randn(steps, batch, INPUT, dtype=torch.float64, requires_grad=True)
    if layout == "batch_first":
        model_input = x.transpose(0, 1)
    elif layout == "packed":
        lengths = torch.randperm(steps)[:batch] + 1  # distinct random lengths in 1..6, unsorted
        model_input = pack_padded_sequence(x, lengths, enforce_sorted=False)
    else:
        model_input = x
    hx = initial_state(kind, num_layers, 2 if bidirectional else 1, batch) if with_h0 else None
    hx_leaves = [s.requires_grad_() for s in (hx if isinstance(hx, tuple) else (hx,))] if with_h0 else []
    inputs = [x, *hx_leaves, *bt.parameters()]
    results = {}
    for recurrence in ("fused", "loop"):
        bt.recurrence = recurrence
        results[recurrence] = flat_outputs(*bt(model_input, hx))
    seed_grads = [torch.randn_like(t) for t in results["loop"]]
    for fused, loop in zip(results["fused"], results["loop"]):
        torch.testing.assert_close(fused, loop, rtol=1e-9, atol=1e-10)
    fused_grads = _grads(results["fused"], inputs, seed_grads)
    loop_grads = _grads(results["loop"], inputs, seed_grads)
    for name, a, b in zip(["x", *(f"hx{i}" for i in range(len(hx_leaves))), *(n for n, _ in bt.named_parameters())],
                          fused_grads, loop_grads):
        assert (a is None) == (b is None), name
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-9, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("mode,reverse,lengths", list(itertools.product(GATES, [False, True], ["equal", "unequal"])))
def test_op_gradcheck_float64(seed, mode, reverse, lengths):
    """gradcheck of the whole op (h0, c0, input projections, hidden weight and bias) on a tiny case."""
    torch.manual_seed(seed)
    batch, hidden = 3, 2
    width = GATES[mode] * hidden
    batch_sizes = torch.tensor([3, 3, 3] if lengths == "equal" else [3, 2, 1])
    x_proj = torch.randn(int(batch_sizes.sum()), width, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(width, hidden, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(width, dtype=torch.float64, requires_grad=True)
    state = tuple(torch.randn(batch, hidden, dtype=torch.float64, requires_grad=True)
                  for _ in range(2 if mode == "LSTM" else 1))

    def run(x_proj, weight, bias, *state):
        out, final = fused_direction(mode, x_proj, batch_sizes, state, weight, bias, reverse)
        return (out, *final)

    assert torch.autograd.gradcheck(run, (x_proj, weight, bias, *state))


@pytest.mark.parametrize("mode", list(GATES))
def test_op_passes_torch_library_opcheck(seed, mode):
    """The fake (meta) implementation, the autograd registration and the schema agree with the real op."""
    torch.manual_seed(seed)
    steps, batch, hidden = 3, 2, 2
    width = GATES[mode] * hidden
    args = (mode, torch.randn(steps, batch, width, requires_grad=True), torch.randn(batch, hidden),
            torch.randn(batch, hidden) if mode == "LSTM" else None, torch.randn(width, hidden, requires_grad=True),
            torch.randn(width, requires_grad=True), None, False, True)
    torch.library.opcheck(torch.ops.accel.recurrence_v2.default, args)


def test_fused_without_bias_and_without_state_gradients(seed):
    """No bias_hh, and an h0 that needs no gradient: the op's optional inputs."""
    torch.manual_seed(seed)
    x_proj = torch.randn(5, 3, 8, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(8, 2, dtype=torch.float64, requires_grad=True)
    state = (torch.randn(3, 2, dtype=torch.float64), torch.randn(3, 2, dtype=torch.float64))
    out, (h, c) = padded_direction("LSTM", x_proj, state, weight, None, reverse=True)
    ref_out, (ref_h, ref_c) = run_direction(CELLS["LSTM"], x_proj.flatten(0, 1), [3] * 5, state, weight, None, True)
    torch.testing.assert_close(out.flatten(0, 1), ref_out)
    grad = torch.randn_like(out)
    torch.testing.assert_close(torch.autograd.grad(out, [x_proj, weight], grad),
                               torch.autograd.grad(ref_out, [x_proj, weight], grad.flatten(0, 1)))


def test_double_backward_raises(seed):
    """The hand-written backward is once-differentiable: a second derivative fails loudly, never silently."""
    torch.manual_seed(seed)
    bt = make("gru")
    x = torch.randn(4, 2, INPUT, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(bt(x)[0].square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        grad.sum().backward()


def test_recurrence_choice_is_validated():
    with pytest.raises(ValueError, match="recurrence must be one of .*got 'scan'"):
        make("lstm", recurrence="scan")
    bt = make("lstm")
    bt.recurrence = "cuda"
    with pytest.raises(ValueError, match="got 'cuda'"):
        bt(torch.randn(2, 1, INPUT, dtype=torch.float64))


def test_mixed_dtypes_are_named():
    x_proj = torch.randn(2, 1, 4)
    with pytest.raises(TypeError, match="input projection is torch.float32, weight_hh is torch.float64"):
        padded_direction("RNN_TANH", x_proj, (torch.zeros(1, 4),), torch.randn(4, 4, dtype=torch.float64), None,
                         False)


def test_under_cpu_autocast_the_recurrence_runs_in_bfloat16(seed):
    torch.manual_seed(seed)
    bt = KINDS["lstm"](INPUT, 6, in_shape=(4, 6), hidden_shape=(3, 2), ranks=2)
    x = torch.randn(5, 2, INPUT)
    expected = bt(x)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = bt(x)[0]
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected, rtol=0.05, atol=0.05)
    out.float().sum().backward()
    assert bt.weight_hh_l0.grad.dtype == torch.float32 and bt.weight_hh_l0.grad.abs().sum() > 0


def test_onnx_lowering_refuses_packed_sequences():
    with pytest.raises(NotImplementedError, match="PackedSequence is not supported"):
        onnx_direction("GRU", torch.randn(2, 2, 6), (torch.zeros(2, 2),), torch.randn(6, 2), None, False,
                       torch.tensor([2, 1]))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the fused LSTM/GRU cells (aten._thnn_fused_*_cell) "
                    "have only CUDA kernels; no GPU here")
@pytest.mark.parametrize("kind", list(KINDS))
def test_cuda_fused_cells_match_loop(seed, kind):
    torch.manual_seed(seed)
    bt = make(kind, num_layers=2, bidirectional=True).cuda()
    x = torch.randn(6, 4, INPUT, dtype=torch.float64, device="cuda")
    lengths = torch.tensor([6, 2, 5, 1])
    for model_input in (x, pack_padded_sequence(x, lengths, enforce_sorted=False)):
        results, grads = {}, {}
        for recurrence in ("fused", "loop"):
            bt.recurrence = recurrence
            bt.zero_grad()
            results[recurrence] = flat_outputs(*bt(model_input))
            sum(r.square().sum() for r in results[recurrence]).backward()
            grads[recurrence] = [p.grad.clone() for p in bt.parameters()]
        for a, b in zip(results["fused"] + grads["fused"], results["loop"] + grads["loop"]):
            torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-9)


def test_inference_keeps_nothing_for_backward_and_gives_the_same_outputs(seed):
    """Under no_grad the LSTM keeps no gates or cell states for a backward (empty saved tensors), outputs
    unchanged."""
    torch.manual_seed(seed)
    bt = make("lstm", num_layers=2, bidirectional=True)
    x = torch.randn(5, 3, INPUT, dtype=torch.float64)
    with torch.no_grad():
        inference = bt(x)
        state = torch.zeros(3, 6, dtype=torch.float64)
        saved = torch.ops.accel.recurrence_v2("LSTM", torch.randn(5, 3, 4 * 6, dtype=torch.float64), state, state,
                                           bt.weight_hh_l0, bt.bias_hh_l0, None, False, False)
    assert [t.numel() for t in saved[3:]] == [0, 0]  # after out, h_n, c_n
    training = bt(x)
    for a, b in zip(flat_outputs(*inference), flat_outputs(*training)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_non_contiguous_initial_state(seed):
    """An h0/c0 given as a transposed view (batch-major storage) gives the loop's results."""
    torch.manual_seed(seed)
    bt = make("lstm", num_layers=2)
    x = torch.randn(4, 3, INPUT, dtype=torch.float64)
    h0, c0 = (torch.randn(3, 2, 6, dtype=torch.float64).transpose(0, 1) for _ in range(2))
    fused = bt(x, (h0, c0))
    bt.recurrence = "loop"
    for a, b in zip(flat_outputs(*fused), flat_outputs(*bt(x, (h0, c0)))):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def test_lstm_kernel_path_takes_non_contiguous_tensors(seed):
    """The kernel reads its operands by pointer: strided x_proj, h0, c0 give the results of contiguous ones."""
    from accel.nn.recurrence import _fused as fused_recurrence
    torch.manual_seed(seed)
    steps, batch, hidden = 5, 3, 4
    x_proj = torch.randn(batch, steps, 4 * hidden, dtype=torch.float64).transpose(0, 1)
    h0, c0 = (torch.randn(hidden, batch, dtype=torch.float64).t() for _ in range(2))
    weight, bias = torch.randn(4 * hidden, hidden, dtype=torch.float64), torch.randn(4 * hidden, dtype=torch.float64)
    grad_out, grad_c_n = torch.randn(steps, batch, hidden, dtype=torch.float64), torch.randn_like(c0)
    results = []
    for tensors in ((x_proj, h0, c0), tuple(t.contiguous() for t in (x_proj, h0, c0))):
        out, extra = fused_recurrence.forward("LSTM", *tensors, weight, bias, [batch] * steps, False)
        grads = fused_recurrence.backward("LSTM", grad_out, grad_c_n, *tensors[1:], weight, out, extra[1:],
                                          [batch] * steps, False)
        results.append([out, extra[0], *grads])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("threads", [2, 3])
def test_lstm_kernel_row_blocks_match_one_block(seed, monkeypatch, threads):
    """The kernel's split of a step's rows into blocks (one per thread; run one after the other where it was
    built without OpenMP) against one block: outputs and gradients, with packed steps of fewer rows."""
    from accel.nn.recurrence import _fused as fused_recurrence
    from accel.nn.recurrence import _kernel as recurrence_kernel
    if recurrence_kernel.lstm_step(torch.float64) is None:
        pytest.skip(f"the kernel did not build here: {recurrence_kernel.status}")
    torch.manual_seed(seed)
    steps, batch, hidden = 5, 7, 3
    active = [7, 7, 5, 2, 1]
    x_proj = torch.randn(steps, batch, 4 * hidden, dtype=torch.float64)
    h0, c0 = torch.randn(batch, hidden, dtype=torch.float64), torch.randn(batch, hidden, dtype=torch.float64)
    weight, bias = torch.randn(4 * hidden, hidden, dtype=torch.float64), torch.randn(4 * hidden, dtype=torch.float64)
    grad_out, grad_c_n = torch.randn(steps, batch, hidden, dtype=torch.float64), torch.randn_like(c0)
    results = {}
    previous_threads = torch.get_num_threads()
    monkeypatch.setattr(recurrence_kernel, "parallel", True)  # split even where the build has no threads
    try:
        for grain in (10 ** 9, 1):  # one block, then min(threads, rows) blocks
            monkeypatch.setattr(fused_recurrence, "PARALLEL_GRAIN", grain)
            torch.set_num_threads(threads)
            assert fused_recurrence._blocks(batch, hidden) == (1 if grain > 1 else threads)
            out, extra = fused_recurrence.forward("LSTM", x_proj, h0, c0, weight, bias, active, True)
            grads = fused_recurrence.backward("LSTM", grad_out, grad_c_n, h0, c0, weight, out, extra[1:], active,
                                              True)
            results[grain] = [out, extra[0], *grads]
    finally:
        torch.set_num_threads(previous_threads)
    for a, b in zip(results[10 ** 9], results[1]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)


# The CUDA fused recurrence (accel/nn/recurrence/_fused_cuda.py) calls these private ATen ops: torch has no public
# cell that takes precomputed input gates. Their kernels are CUDA-only, but the schemas are registered on every
# build: a change or removal in torch fails here, on CPU, before any GPU run.
CUDA_FUSED_CELLS = {
    "_thnn_fused_lstm_cell": "aten::_thnn_fused_lstm_cell(Tensor input_gates, Tensor hidden_gates, Tensor cx, "
                             "Tensor? input_bias=None, Tensor? hidden_bias=None) -> (Tensor, Tensor, Tensor)",
    "_thnn_fused_lstm_cell_backward_impl": "aten::_thnn_fused_lstm_cell_backward_impl(Tensor? grad_hy, "
                                           "Tensor? grad_cy, Tensor cx, Tensor cy, Tensor workspace, bool has_bias) "
                                           "-> (Tensor, Tensor, Tensor)",
    "_thnn_fused_gru_cell": "aten::_thnn_fused_gru_cell(Tensor input_gates, Tensor hidden_gates, Tensor hx, "
                            "Tensor? input_bias=None, Tensor? hidden_bias=None) -> (Tensor, Tensor)",
    "_thnn_fused_gru_cell_backward": "aten::_thnn_fused_gru_cell_backward(Tensor grad_hy, Tensor workspace, "
                                     "bool has_bias) -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
}


@pytest.mark.parametrize("name", list(CUDA_FUSED_CELLS))
def test_the_private_cuda_fused_cells_keep_their_schemas(name):
    assert hasattr(torch.ops.aten, name), f"torch removed aten.{name}, which the CUDA fused recurrence calls"
    schema = str(getattr(torch.ops.aten, name).default._schema)
    assert schema == CUDA_FUSED_CELLS[name], f"torch changed aten.{name}, which the CUDA fused recurrence calls"
