"""ISGD and Inconsistent(AdamW) under a real accelerate Accelerator (CPU): chases, first-pass loss, schedulers,
save/load state, gradient accumulation (refused, and the closure that does it right), fp16 loss scaling."""
import statistics

import pytest
import torch
from isgd_helpers import CHASING, HARD_NOISE, N_BATCHES, chasing_optimizer, make_closure, mlp, regression_batches
from torch import nn

from accel.optim import ClosureGradScaler, accumulating_closure

accelerate = pytest.importorskip("accelerate")
from accelerate.state import AcceleratorState, GradientState  # noqa: E402

EPOCHS = 3


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """accelerate keeps its state in process-wide singletons: start and leave every test with a clean one."""
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def decay(step):
    return 1.0 / (1.0 + 0.01 * step)


def prepared(name, seed, scaler=None, **accelerator_kwargs):
    accelerator = accelerate.Accelerator(cpu=True, **accelerator_kwargs)
    if scaler is not None:
        accelerator.scaler = scaler  # before prepare: AcceleratedOptimizer and backward() take it from here
    model = mlp(seed)
    optimizer = chasing_optimizer(name, model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, decay)
    return (accelerator, *accelerator.prepare(model, optimizer, scheduler))


def plain_run(name, seed, batches):
    """The reference: the same optimizer and schedule in a plain loop, one closure per batch."""
    model = mlp(seed)
    optimizer = chasing_optimizer(name, model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, decay)
    for x, y in batches:
        optimizer.step(make_closure(optimizer, model, x, y))
        scheduler.step()
    return model, optimizer


def accumulate_each_batch(accelerator, model, optimizer, scheduler, batches, split):
    """One ``step(accumulating_closure(...))`` per batch over micro-batches cut at row ``split``."""
    for x, y in batches:
        parts = [(x[:split], y[:split]), (x[split:], y[split:])]
        closure = accumulating_closure(optimizer, parts, lambda b: nn.functional.mse_loss(model(b[0]), b[1]),
                                       backward=accelerator.backward, no_sync=lambda: accelerator.no_sync(model))
        optimizer.step(closure)
        scheduler.step()


def train(accelerator, model, optimizer, scheduler, batches, *, autocast=False):
    first_losses = []
    for x, y in batches:
        calls = []

        def closure(calls=calls, x=x, y=y):
            optimizer.zero_grad()
            with torch.autocast("cpu", dtype=torch.float16, enabled=autocast):
                loss = nn.functional.mse_loss(model(x).float(), y)
            accelerator.backward(loss)
            calls.append(loss.detach())
            return loss
        assert optimizer.step(closure) is None  # accelerate's AcceleratedOptimizer.step returns nothing...
        assert torch.equal(optimizer.optimizer.last_loss, calls[0])  # ...the optimizer keeps the first pass's loss
        first_losses.append(float(calls[0]))
        scheduler.step()
    return first_losses


@pytest.mark.parametrize("name", CHASING)
def test_accelerate_trains_like_a_plain_loop(seed, name):
    batches = regression_batches(seed, epochs=EPOCHS, hard_noise=HARD_NOISE)
    accelerator, model, optimizer, scheduler = prepared(name, seed)
    train(accelerator, model, optimizer, scheduler, batches)
    stats = optimizer.optimizer.stats
    assert stats["chased_batches"] > 0 and stats["batches"] == len(batches)
    assert scheduler.scheduler.last_epoch == len(batches)  # chases never advance it
    plain_model, plain = plain_run(name, seed, batches)
    assert repr(plain.stats) == repr(stats)
    for a, b in zip(plain_model.parameters(), model.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", CHASING)
def test_accelerate_save_and_load_state_resume_bit_identically(seed, name, tmp_path):
    batches = regression_batches(seed, epochs=EPOCHS, hard_noise=HARD_NOISE)
    half = len(batches) // 2 + 3
    straight = prepared(name, seed)
    train(*straight, batches)
    first = prepared(name, seed)
    train(*first, batches[:half])
    first[0].save_state(tmp_path / "state")
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    resumed = prepared(name, seed + 1)  # different initial weights: everything comes from the saved state
    resumed[0].load_state(tmp_path / "state")
    train(*resumed, batches[half:])
    assert straight[2].optimizer.stats["chased_batches"] > 0
    assert repr(resumed[2].optimizer.stats) == repr(straight[2].optimizer.stats)
    assert resumed[3].scheduler.last_epoch == len(batches)
    for a, b in zip(straight[1].parameters(), resumed[1].parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", CHASING)
def test_accelerate_gradient_accumulation_is_refused_at_the_first_step(seed, name):
    accelerator, model, optimizer, scheduler = prepared(name, seed, gradient_accumulation_steps=2)
    closure_calls = []
    with pytest.raises(RuntimeError, match="gradient_accumulation_steps=2.*accumulating_closure"):
        for x, y in regression_batches(seed, epochs=1):
            with accelerator.accumulate(model):
                def closure(x=x, y=y):
                    closure_calls.append(1)
                    loss = nn.functional.mse_loss(model(x), y)
                    accelerator.backward(loss)
                    return loss
                optimizer.step(closure)
    assert closure_calls == []  # micro-batch 1: accelerate skipped step(); micro-batch 2: refused before the closure


def test_accumulating_closure_under_accelerate_equals_one_large_batch(seed):
    """The supported way: one step per batch, the closure runs both halves (and a chase re-runs both)."""
    batches = regression_batches(seed, epochs=EPOCHS, hard_noise=HARD_NOISE)
    accelerator, model, optimizer, scheduler = prepared("isgd", seed)
    accumulate_each_batch(accelerator, model, optimizer, scheduler, batches, split=8)
    whole_model, whole = plain_run("isgd", seed, batches)
    stats = optimizer.optimizer.stats
    assert stats["chased_batches"] == whole.stats["chased_batches"] > 0
    assert stats["extra_passes"] == whole.stats["extra_passes"]
    for a, b in zip(whole_model.parameters(), model.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", CHASING)
def test_accelerate_fp16_loss_scaling(seed, name):
    """accelerate builds no GradScaler on CPU (Accelerator.__init__ makes one only when device.type != "cpu"), so
    mixed_precision="fp16" is a no-op here. The scaler path it takes on GPUs is the same code on CPU once a scaler is
    put in place: accelerator.backward scales with it, AcceleratedOptimizer.step calls scaler.step(optimizer, closure)
    and scaler.update(). With a ClosureGradScaler the chase runs scaled; the stock GradScaler fails at the first step."""
    assert accelerate.Accelerator(cpu=True, mixed_precision="fp16").scaler is None
    AcceleratorState._reset_state(True)
    scaler = ClosureGradScaler("cpu", init_scale=2.0 ** 18)
    batches = regression_batches(seed, epochs=EPOCHS + 1)
    accelerator, model, optimizer, scheduler = prepared(name, seed, scaler=scaler, mixed_precision="fp16")
    losses = train(accelerator, model, optimizer, scheduler, batches, autocast=True)
    stats = optimizer.optimizer.stats
    assert stats["overflow_skips"] > 0 and scaler.get_scale() < 2.0 ** 18
    assert stats["chased_batches"] > 0 and stats["nonfinite"] == 0
    assert statistics.median(losses[-N_BATCHES:]) < 0.5 * statistics.median(losses[:5])  # first 5: before training
    assert all(torch.isfinite(p).all() for p in model.parameters())

    AcceleratorState._reset_state(True)
    stock = prepared(name, seed, scaler=torch.amp.GradScaler("cpu"), mixed_precision="fp16")
    with pytest.raises(AssertionError, match="_scale is None"):
        train(*stock, batches[:1], autocast=True)


@pytest.mark.parametrize("name", CHASING)
def test_accumulating_closure_under_gradient_accumulation_steps_equals_one_large_batch(seed, name):
    """gradient_accumulation_steps=2 with step(accumulating_closure) once per batch, outside accumulate(): accepted
    (accelerate calls the optimizer on every step), accelerator.backward's division by 2 is undone, and unequal
    micro-batches (12 + 4) give the run of one batch of 16, chases included."""
    batches = regression_batches(seed, epochs=EPOCHS, hard_noise=HARD_NOISE)
    # the reference first: GradientState is process-wide, and under num_steps=2 a plain closure is refused
    whole_model, whole = plain_run(name, seed, batches)
    accelerator, model, optimizer, scheduler = prepared(name, seed, gradient_accumulation_steps=2)
    assert accelerator.gradient_state.num_steps == 2
    accumulate_each_batch(accelerator, model, optimizer, scheduler, batches, split=12)
    stats = optimizer.optimizer.stats
    assert stats["batches"] == len(batches)
    assert stats["chased_batches"] == whole.stats["chased_batches"] > 0
    assert stats["extra_passes"] == whole.stats["extra_passes"]
    for a, b in zip(whole_model.parameters(), model.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def test_accumulating_closure_built_where_accelerate_skips_the_step_is_refused(seed):
    """Inside accumulate(), on a micro-batch that does not sync, AcceleratedOptimizer.step would drop the closure."""
    accelerator, model, optimizer, scheduler = prepared("isgd", seed, gradient_accumulation_steps=2)
    x, y = regression_batches(seed, epochs=1)[0]
    with accelerator.accumulate(model):
        assert not accelerator.gradient_state.sync_gradients
        with pytest.raises(RuntimeError, match="sync_gradients is False.*accumulating_closure"):
            accumulating_closure(optimizer, [(x, y)], lambda b: nn.functional.mse_loss(model(b[0]), b[1]),
                                 backward=accelerator.backward)
