"""The pool of large CPU buffers kept between training steps (accel/nn/_step_buffers.py): memory is handed out
again only when nothing holds it, and the recurrence and the dense BT path stay exact with every buffer pooled."""
import threading

import numpy as np
import pytest
import torch

from accel.nn import BTLSTM, BTLinear
from accel.nn import _step_buffers as step_buffers
from test_bt_recurrence import test_fused_matches_loop_outputs_and_all_gradients as fused_matches_loop

LIKE = torch.empty(0)
SHAPE = (512, 1024)  # 2 MiB of float32: pooled


@pytest.fixture
def pool_everything(monkeypatch):
    """Every CPU buffer the library asks for goes through the pool, however small."""
    monkeypatch.setattr(step_buffers, "MIN_BYTES", 0)
    monkeypatch.setattr(step_buffers, "enabled", True)
    step_buffers.clear()
    yield
    step_buffers.clear()


def address(tensor):
    return tensor.untyped_storage().data_ptr()


def test_a_freed_buffer_is_handed_out_again():
    first = step_buffers.empty(SHAPE, LIKE)
    where = address(first)
    del first
    second = step_buffers.empty(SHAPE, LIKE)
    assert address(second) == where and second.shape == SHAPE and second.is_contiguous()
    other = step_buffers.empty(SHAPE, LIKE)  # while the second is held: memory of its own
    assert address(other) != where


HOLDERS = {
    "the tensor": lambda t: t,
    "a view": lambda t: t[3:, ::2],
    "its storage object": lambda t: t.untyped_storage(),
    "a NumPy array": lambda t: t.numpy(),
    "autograd (a saved tensor)": lambda t: torch.randn(SHAPE[1], requires_grad=True) * t,
}


@pytest.mark.parametrize("holder", HOLDERS)
def test_memory_still_held_is_never_handed_out(holder):
    buffer = step_buffers.empty(SHAPE, LIKE).fill_(1.0)
    where = address(buffer)
    kept = HOLDERS[holder](buffer)
    del buffer
    again = [step_buffers.empty(SHAPE, LIKE).fill_(2.0) for _ in range(3)]
    assert all(address(t) != where for t in again)
    del kept, again
    assert address(step_buffers.empty(SHAPE, LIKE)) == where  # let go: the pool has it back


def test_small_or_disabled_requests_allocate_afresh(monkeypatch):
    small = step_buffers.empty((8, 8), LIKE)
    assert small.untyped_storage().nbytes() == 8 * 8 * 4  # exactly its size: not from a pooled buffer
    monkeypatch.setattr(step_buffers, "enabled", False)
    before = step_buffers.pooled_bytes()
    assert step_buffers.empty(SHAPE, LIKE).untyped_storage().nbytes() == 512 * 1024 * 4
    assert step_buffers.pooled_bytes() == before


def test_dtype_and_size_classes():
    half = step_buffers.empty(SHAPE, LIKE, dtype=torch.float16)
    assert half.dtype == torch.float16 and half.shape == SHAPE
    for nbytes in (1 << 20, (1 << 20) + 1, 3_000_001, 13 * 2 ** 20 + 7):
        size = step_buffers._size_class(nbytes)
        assert nbytes <= size <= nbytes * 1.125
    # neighbouring sizes (sequences one step longer) share one buffer
    where = address(step_buffers.empty((100, 32, 1024), LIKE))
    assert address(step_buffers.empty((101, 32, 1024), LIKE)) == where


def test_the_pool_stops_growing_at_its_cap_and_clear_lets_idle_buffers_go(monkeypatch):
    step_buffers.clear()
    monkeypatch.setattr(step_buffers, "MAX_BYTES", step_buffers.pooled_bytes() + 5 * 2 ** 20)
    held = [step_buffers.empty(SHAPE, LIKE) for _ in range(4)]  # 2 MiB each: two fit under the cap
    assert step_buffers.pooled_bytes() <= step_buffers.MAX_BYTES
    assert len({address(t) for t in held}) == 4  # the requests past the cap got memory all the same
    in_use = step_buffers.pooled_bytes()
    held = held[:1]
    step_buffers.clear()
    assert 0 < step_buffers.pooled_bytes() < in_use  # the held buffer stays pooled


def test_threads_never_share_a_buffer():
    failures = []

    def work(value):
        for _ in range(50):
            buffer = step_buffers.empty(SHAPE, LIKE).fill_(value)
            if not bool((buffer == value).all()):
                failures.append(value)

    threads = [threading.Thread(target=work, args=(float(k),)) for k in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures


@pytest.mark.parametrize("kind,layout,num_layers,bidirectional,with_h0",
                         [("lstm", "packed", 2, True, True), ("gru", "batch_first", 1, True, False),
                          ("rnn_tanh", "packed", 2, False, True), ("lstm", "padded", 1, False, False)])
def test_fused_recurrence_matches_the_loop_with_every_buffer_pooled(pool_everything, seed, kind, layout,
                                                                   num_layers, bidirectional, with_h0):
    fused_matches_loop(seed, kind, layout, num_layers, bidirectional, with_h0)


@pytest.mark.parametrize("compiled", [False, True])
def test_btlstm_outputs_kept_across_steps_and_retain_graph(pool_everything, seed, compiled):
    """Training steps reuse the pool's memory without touching what a user kept: the outputs of an earlier step,
    and the saved tensors of a graph kept for a second backward."""
    torch.manual_seed(seed)
    lstm = BTLSTM(24, 16, in_shape=(2, 3, 4), hidden_shape=(2, 2, 4), batch_first=True)
    model = torch.compile(lstm, fullgraph=True) if compiled else lstm
    x, y = torch.randn(3, 7, 24), torch.randn(3, 7, 16)
    kept, copies = [], []
    for _ in range(3):
        out, (h, c) = model(x)
        ((out - y).square().mean() + h.sum()).backward()
        kept.append((out, h, c))
        copies.append(tuple(t.detach().clone() for t in (out, h, c)))
        x = torch.randn_like(x)
    for held, copy in zip(kept, copies):
        for a, b in zip(held, copy):
            assert torch.equal(a, b)
    if compiled:  # a compiled backward refuses retain_graph itself (donated buffers)
        return
    lstm.zero_grad()
    out, _ = model(x)
    loss = (out - y).square().sum()
    loss.backward(retain_graph=True)
    once = [p.grad.clone() for p in lstm.parameters()]
    model(torch.randn_like(x))[0].sum().backward()  # another step in between: its buffers must be others
    lstm.zero_grad()
    loss.backward()
    for p, g in zip(lstm.parameters(), once):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-6)


def test_bt_linear_dense_outputs_are_not_overwritten(pool_everything, seed):
    torch.manual_seed(seed)
    layer = BTLinear(64, 1024, in_shape=(4, 4, 4), out_shape=(8, 8, 16), contraction="dense")
    x = torch.randn(96, 64)
    first = layer(x)
    expected = first.detach().clone()
    second = layer(torch.randn(96, 64))
    assert address(second) != address(first) and torch.equal(first, expected)
    torch.testing.assert_close(layer(x), x @ layer.to_dense().t() + layer.bias, rtol=1e-4, atol=1e-4)


def test_a_training_step_reuses_its_memory():
    """At the size the pool was made for (64 -> 256, T=100, batch 32: 13 MB buffers), steps after the first
    allocate nothing new from it."""
    lstm = BTLSTM(64, 256, batch_first=True)
    x = torch.randn(32, 100, 64)

    def step():
        lstm.zero_grad(set_to_none=True)
        out, _ = lstm(x)
        out.backward(torch.randn_like(out))

    step_buffers.clear()
    step()
    pooled = step_buffers.pooled_bytes()
    # the gates and the projection (whose memory the gates' gradient takes over once it is freed) at least
    assert pooled >= 2 * 100 * 32 * 1024 * 4
    for _ in range(3):
        step()
    assert step_buffers.pooled_bytes() == pooled


def test_inference_mode_then_training_with_pooled_buffers(pool_everything, seed):
    """Pool buffers and workspaces first made under torch.inference_mode serve training steps afterwards."""
    torch.manual_seed(seed)
    lstm = BTLSTM(64, 32, in_shape=(4, 4, 4), hidden_shape=(2, 4, 4), batch_first=True)
    x = torch.randn(4, 9, 64)
    with torch.inference_mode():
        expected = lstm(x)[0]
    out = lstm(x)[0]
    out.square().sum().backward()
    torch.testing.assert_close(out.detach(), expected)
    with torch.no_grad():
        torch.testing.assert_close(lstm(x)[0], expected)


def test_a_buffer_pooled_after_the_cap_let_idle_ones_go_is_reused(monkeypatch):
    step_buffers.clear()
    held = step_buffers.empty(SHAPE, LIKE)  # class X, in use
    step_buffers.empty((700, 1024), LIKE)  # class Y, idle at once
    monkeypatch.setattr(step_buffers, "MAX_BYTES", step_buffers.pooled_bytes() + 2 ** 20)
    second = step_buffers.empty(SHAPE, LIKE)  # X again: over the cap until Y's buffer goes
    where = address(second)
    del second
    assert address(step_buffers.empty(SHAPE, LIKE)) == where
    assert step_buffers.pooled_bytes() == sum(size * len(pool) for size, pool in step_buffers._buffers.items())
    del held
