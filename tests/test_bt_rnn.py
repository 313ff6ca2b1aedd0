import itertools

import pytest
import torch
from rnn_helpers import HIDDEN, INPUT, KINDS, assert_states_close, initial_state, make
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from accel.nn import BTGRU, BTLSTM, BTRNN, BTLinear

GRID = list(itertools.product(KINDS, [False, True], [1, 2], [False, True], [False, True]))


@pytest.mark.parametrize("kind,batch_first,num_layers,bidirectional,with_h0", GRID)
def test_parity_with_torch_padded(seed, kind, batch_first, num_layers, bidirectional, with_h0):
    torch.manual_seed(seed)
    bt = make(kind, num_layers=num_layers, batch_first=batch_first, bidirectional=bidirectional)
    dense = bt.to_dense_module()
    assert type(dense) is bt._torch_class
    steps, batch = 5, 3
    x = torch.randn(*((batch, steps) if batch_first else (steps, batch)), INPUT, dtype=torch.float64)
    hx = initial_state(kind, num_layers, 2 if bidirectional else 1, batch) if with_h0 else None
    out, state = bt(x, hx)
    ref_out, ref_state = dense(x, hx)
    assert out.shape == ref_out.shape
    torch.testing.assert_close(out, ref_out, rtol=1e-9, atol=1e-10)
    assert_states_close(state, ref_state)


@pytest.mark.parametrize("kind,num_layers,bidirectional,with_h0",
                         list(itertools.product(KINDS, [1, 2], [False, True], [False, True])))
def test_parity_with_torch_packed_unequal_lengths(seed, kind, num_layers, bidirectional, with_h0):
    torch.manual_seed(seed)
    bt = make(kind, num_layers=num_layers, batch_first=True, bidirectional=bidirectional)
    dense = bt.to_dense_module()
    lengths = torch.tensor([3, 6, 1, 4])  # unsorted: exercises sorted/unsorted indices
    x = torch.randn(4, 6, INPUT, dtype=torch.float64)
    packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
    hx = initial_state(kind, num_layers, 2 if bidirectional else 1, 4) if with_h0 else None
    out, state = bt(packed, hx)
    ref_out, ref_state = dense(packed, hx)
    assert isinstance(out, type(packed))
    torch.testing.assert_close(out.data, ref_out.data, rtol=1e-9, atol=1e-10)
    assert torch.equal(out.batch_sizes, ref_out.batch_sizes)
    assert_states_close(state, ref_state)
    padded, out_lengths = pad_packed_sequence(out, batch_first=True)
    assert torch.equal(out_lengths, lengths)
    # gradients flow through the packed path to the BT factors exactly as through the dense weight
    grad = torch.randn_like(out.data)
    bt_grad = torch.autograd.grad(out.data, bt.input_projection.core, grad)[0]
    assert bt_grad.abs().sum() > 0


def test_unbatched_and_dropout(seed):
    torch.manual_seed(seed)
    bt = make("gru", num_layers=2, dropout=0.5)
    out, h = bt(torch.randn(7, INPUT, dtype=torch.float64))
    assert out.shape == (7, HIDDEN) and h.shape == (2, HIDDEN)
    bt.eval()
    x = torch.randn(7, 2, INPUT, dtype=torch.float64)
    torch.testing.assert_close(bt(x)[0], bt.to_dense_module().eval()(x)[0], rtol=1e-9, atol=1e-10)


def test_bt_weight_copied_into_nn_lstm_matches(seed):
    """A BT layer's dense equivalent in a plain nn.LSTM gives the same outputs (gate order i, f, g, o)."""
    torch.manual_seed(seed)
    bt = make("lstm")
    lstm = nn.LSTM(INPUT, HIDDEN, dtype=torch.float64)
    with torch.no_grad():
        lstm.weight_ih_l0.copy_(bt.input_projection.to_dense())
        lstm.bias_ih_l0.copy_(bt.input_projection.bias)
        lstm.weight_hh_l0.copy_(bt.weight_hh_l0)
        lstm.bias_hh_l0.copy_(bt.bias_hh_l0)
    x = torch.randn(4, 2, INPUT, dtype=torch.float64)
    torch.testing.assert_close(bt(x)[0], lstm(x)[0], rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn_tanh"])
def test_from_torch_module_full_rank_is_exact(seed, kind):
    torch.manual_seed(seed)
    torch_class = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn_tanh": nn.RNN}[kind]
    dense = torch_class(INPUT, HIDDEN, num_layers=2, bidirectional=True, dtype=torch.float64)
    convert = {"lstm": BTLSTM.from_lstm, "gru": BTGRU.from_gru, "rnn_tanh": BTRNN.from_rnn}[kind]
    gates = {"lstm": 4, "gru": 3, "rnn_tanh": 1}[kind]
    full = (4 * 3 * gates, 6 * 2)  # full ranks: I_k * J_k
    with pytest.warns(UserWarning, match="x the .* of a dense weight"):  # full ranks compress nothing
        bt = convert(dense, in_shape=(4, 6), hidden_shape=(3, 2), ranks=full, num_blocks=1)
    assert bt.reconstruction_error < 1e-10
    x = torch.randn(5, 2, INPUT, dtype=torch.float64)
    torch.testing.assert_close(bt(x)[0], dense(x)[0], rtol=1e-8, atol=1e-9)
    small = convert(dense, in_shape=(4, 6), hidden_shape=(3, 2), ranks=2, num_blocks=2, n_iter=5)
    assert 0 < small.reconstruction_error < 1
    with pytest.raises(TypeError, match="got Linear"):
        convert(nn.Linear(2, 2))


def test_ucf11_setting_parameter_count():
    lstm = BTLSTM(57600, 256, in_shape=(8, 20, 20, 18), hidden_shape=(4, 4, 4, 4), ranks=4, num_blocks=2)
    projection = lstm.input_projection
    assert isinstance(projection, BTLinear) and projection.out_shape == (16, 4, 4, 4)
    assert projection.num_weight_parameters == 3392
    assert int(57600 * 4 * 256 / projection.num_weight_parameters) == 17388
    assert lstm.ranks == (4, 4, 4, 4) and lstm.num_blocks == 2


def test_errors_name_the_numbers():
    with pytest.raises(ValueError, match=r"in_shape=\(4, 5\) has product 20, but in_features=24"):
        BTLSTM(24, 6, in_shape=(4, 5), hidden_shape=(3, 2))
    with pytest.raises(ValueError, match=r"hidden_shape=\(4, 2\) has product 8, but hidden_size=6"):
        BTLSTM(24, 6, in_shape=(4, 6), hidden_shape=(4, 2))
    with pytest.raises(ValueError, match=r"ranks\[0\]=99"):
        BTGRU(24, 6, in_shape=(4, 6), hidden_shape=(3, 2), ranks=(99, 2))
    lstm = make("lstm")
    with pytest.raises(ValueError, match="Expected 24, got 23"):
        lstm(torch.randn(3, 2, 23, dtype=torch.float64))
    with pytest.raises(ValueError, match="got torch.Size"):
        lstm(torch.randn(3, 2, 1, 24))
    with pytest.raises(ValueError, match=r"expected h_0 of shape \(1, 2, 6\), got \(1, 3, 6\)"):
        h = torch.zeros(1, 3, 6, dtype=torch.float64)
        lstm(torch.randn(3, 2, 24, dtype=torch.float64), (h, h))
    with pytest.raises(ValueError, match="nonlinearity must be 'tanh' or 'relu', got 'gelu'"):
        BTRNN(24, 6, nonlinearity="gelu")


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_parity_without_bias(seed, kind):
    torch.manual_seed(seed)
    bt = make(kind, bias=False, num_layers=2)
    assert bt.input_projection.bias is None and not hasattr(bt, "bias_hh_l0")
    x = torch.randn(4, 3, INPUT, dtype=torch.float64)
    torch.testing.assert_close(bt(x)[0], bt.to_dense_module()(x)[0], rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn_tanh"])
@pytest.mark.parametrize("recurrence", ["fused", "loop"])
def test_empty_sequence_is_refused_by_name(kind, recurrence):
    bt = make(kind, batch_first=True, recurrence=recurrence)
    with pytest.raises(ValueError, match=r"sequence length of at least 1 .*got input of shape \(2, 0, 24\)"):
        bt(torch.randn(2, 0, INPUT, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"got input of shape \(0, 24\)"):
        bt(torch.randn(0, INPUT, dtype=torch.float64))


@pytest.mark.parametrize("kind", ["gru", "rnn_tanh"])
def test_tuple_state_for_gru_and_rnn_is_refused_by_name(kind):
    bt = make(kind)
    h0 = torch.zeros(1, 2, HIDDEN, dtype=torch.float64)
    name = type(bt).__name__
    with pytest.raises(TypeError, match=f"{name} expects hx as one tensor h_0 .*got tuple"):
        bt(torch.randn(3, 2, INPUT, dtype=torch.float64), (h0,))
    with pytest.raises(TypeError, match="BTLSTM expects hx as a tuple"):
        make("lstm")(torch.randn(3, 2, INPUT, dtype=torch.float64), h0)


@pytest.mark.parametrize("kind", ["lstm", "rnn_tanh"])
@pytest.mark.parametrize("projection", ["nn.Linear", "BTLinear without bias"])
def test_swapped_input_projection_fused_matches_loop(seed, kind, projection):
    """A projection a user swapped in (any module, e.g. a TT layer, or a BTLinear without bias) is called as a
    module on both recurrences: same results."""
    torch.manual_seed(seed)
    rnn = make(kind, num_layers=2, bidirectional=True)
    gates = rnn.input_projection.out_features
    for name in ("input_projection", "input_projection_reverse"):
        swapped = (nn.Linear(INPUT, gates, dtype=torch.float64) if projection == "nn.Linear" else
                   BTLinear(INPUT, gates, in_shape=(4, 6), ranks=2, bias=False, dtype=torch.float64))
        setattr(rnn, name, swapped)
    x = torch.randn(5, 3, INPUT, dtype=torch.float64)
    grad = torch.randn(5, 3, 2 * HIDDEN, dtype=torch.float64)
    results = {}
    for recurrence in ("fused", "loop"):
        rnn.recurrence = recurrence
        rnn.zero_grad()
        out, _ = rnn(x)
        out.backward(grad)
        results[recurrence] = [out.detach()] + [p.grad.clone() for p in rnn.parameters()]
    for fused, loop in zip(results["fused"], results["loop"]):
        torch.testing.assert_close(fused, loop, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("kind", list(KINDS))
def test_reset_parameters_draws_as_construction_does(seed, kind):
    """reset_parameters re-draws every parameter as the constructor does: from the same seed, the same values
    (dense ones within torch.nn's U(-1/sqrt(H), 1/sqrt(H)))."""
    torch.manual_seed(seed)
    constructed = make(kind, num_layers=2, bidirectional=True)
    model = make(kind, num_layers=2, bidirectional=True)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(7.0)
    torch.manual_seed(seed)
    model.reset_parameters()
    for (name, a), b in zip(constructed.named_parameters(), model.parameters()):
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=lambda m, name=name: f"{name}: {m}")
        if not name.startswith("input_projection") or name.endswith("bias"):
            assert b.abs().max() <= 1 / HIDDEN ** 0.5, name


@pytest.mark.parametrize("kind", list(KINDS))
def test_meta_device_then_to_empty_and_reset_parameters(seed, kind):
    extra = {"nonlinearity": kind[4:]} if kind.startswith("rnn") else {}
    meta = KINDS[kind](INPUT, HIDDEN, num_layers=2, bidirectional=True, in_shape=(4, 6), hidden_shape=(3, 2),
                       ranks=2, device="meta", dtype=torch.float64, **extra)
    assert all(p.device.type == "meta" for p in meta.parameters())
    model = meta.to_empty(device="cpu")
    torch.manual_seed(seed)
    model.reset_parameters()
    assert all(p.device.type == "cpu" and p.dtype == torch.float64 and torch.isfinite(p).all()
               for p in model.parameters())
    x = torch.randn(5, 3, INPUT, dtype=torch.float64)
    out, _ = model(x)
    out.square().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    torch.testing.assert_close(out, model.to_dense_module()(x)[0], rtol=1e-9, atol=1e-10)


def test_device_and_dtype_factory_arguments():
    model = BTLSTM(INPUT, HIDDEN, in_shape=(4, 6), hidden_shape=(3, 2), ranks=2, device="cpu", dtype=torch.float64)
    assert {(p.device.type, p.dtype) for p in model.parameters()} == {("cpu", torch.float64)}
    assert {(p.device.type, p.dtype) for p in model.to_dense_module().parameters()} == {("cpu", torch.float64)}


def test_reset_parameters_names_a_projection_that_cannot_reset():
    model = make("lstm")

    class Fixed(nn.Module):
        def forward(self, x):
            return x.new_zeros(*x.shape[:-1], 4 * HIDDEN)

    model.input_projection = Fixed()
    with pytest.raises(TypeError, match=r"BTLSTM.reset_parameters: the input projection \(Fixed\) has no "):
        model.reset_parameters()


def _functorch_loss(model, x):
    params = dict(model.named_parameters())
    return params, lambda p, x: torch.func.functional_call(model, p, (x,))[0].square().sum()


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_torch_func_on_the_fused_recurrence_names_the_layer_and_what_to_use(seed, kind):
    torch.manual_seed(seed)
    model = make(kind)
    model.input_projection.contraction = "lowrank"  # a projection torch.func can run: the recurrence refuses
    x = torch.randn(4, 2, INPUT, dtype=torch.float64)
    name = type(model).__name__
    params, loss = _functorch_loss(model, x)
    with pytest.raises(RuntimeError, match=f"not supported by {name} with recurrence='fused'.*recurrence='loop'"):
        torch.func.grad(loss)(params, x)
    with pytest.raises(RuntimeError, match=f"not supported by {name} with recurrence='fused'"):
        torch.func.vmap(lambda xi: model(xi)[0], in_dims=1)(x)


def test_torch_func_on_a_projection_without_functorch_rules_names_it(seed):
    torch.manual_seed(seed)
    model = make("lstm", recurrence="loop")
    model.input_projection.contraction = "dense"  # a custom autograd.Function
    x = torch.randn(4, 2, INPUT, dtype=torch.float64)
    params, loss = _functorch_loss(model, x)
    with pytest.raises(RuntimeError, match=r"not supported by BTLSTM.input_projection \(BTLinear\).*'lowrank'"):
        torch.func.grad(loss)(params, x)


@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn_tanh"])
def test_torch_func_grad_and_vmap_run_on_the_loop(seed, kind):
    """recurrence='loop' with a low-rank projection: torch.func.grad equals torch.autograd, vmap equals the
    batched call."""
    torch.manual_seed(seed)
    model = make(kind, recurrence="loop", num_layers=2)
    model.input_projection.contraction = "lowrank"
    x = torch.randn(4, 3, INPUT, dtype=torch.float64)
    params, loss = _functorch_loss(model, x)
    grads = torch.func.grad(loss)(params, x)
    expected = torch.autograd.grad(loss(params, x), list(params.values()))
    for (name, a), b in zip(grads.items(), expected):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10, msg=lambda m, name=name: f"{name}: {m}")
    mapped = torch.func.vmap(lambda xi: model(xi)[0], in_dims=1, out_dims=1)(x)
    torch.testing.assert_close(mapped, model(x)[0], rtol=1e-9, atol=1e-10)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch deprecates the TorchScript exporter
@pytest.mark.parametrize("kind,operator", [("lstm", "LSTM"), ("gru", "GRU"), ("rnn_relu", "RNN")])
@pytest.mark.parametrize("recurrence", ["fused", "loop"])
def test_onnx_export_without_dynamo_says_to_use_dynamo(tmp_path, kind, operator, recurrence):
    model = make(kind, recurrence=recurrence)
    with pytest.raises(RuntimeError, match=rf"dynamo=False\) .* does not support {type(model).__name__}: export "
                                           rf"with torch.onnx.export\(\.\.\., dynamo=True\).*{operator} operator"):
        torch.onnx.export(model, (torch.randn(3, 2, INPUT, dtype=torch.float64),), str(tmp_path / "m.onnx"),
                          dynamo=False)
