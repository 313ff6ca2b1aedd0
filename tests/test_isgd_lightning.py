"""ISGD and Inconsistent(AdamW) under a real Lightning Trainer (CPU) with accel's precision plugins: chases, first-pass
loss, schedulers, resume, gradient accumulation refused, fp16 loss scaling through ChaseMixedPrecision; without a
plugin, refused with the advice; manual optimization with no plugin."""
import statistics

import pytest
import torch
from isgd_helpers import CHASING, HARD_NOISE, N_BATCHES, chasing_optimizer, make_closure, mlp, regression_batches
from torch import nn

pl = pytest.importorskip("lightning.pytorch")
from accel.optim.integrations.lightning import ChaseMixedPrecision, ChasePrecision  # noqa: E402

EPOCHS = 3


def decay(step):
    return 1.0 / (1.0 + 0.01 * step)


class Regression(pl.LightningModule):
    """Records every closure call's loss, what the loop hands on_train_batch_end, and what self.log kept."""

    def __init__(self, name, seed):
        super().__init__()
        self.net, self.name = mlp(seed), name
        self.calls, self.outputs, self.logged, self.hook_grad_norms = [], [], [], []

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        self.calls.append((self.trainer.global_step, float(loss.detach())))
        self.log("train_loss", loss, on_step=True, on_epoch=True)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self.outputs.append(float(outputs["loss"]))
        self.logged.append(float(self.trainer.callback_metrics["train_loss_step"]))

    def on_before_optimizer_step(self, optimizer):
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        self.hook_grad_norms.append(float(torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads]))))

    def configure_optimizers(self):
        optimizer = chasing_optimizer(self.name, self.parameters())
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, decay)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def fit(module, batches, epochs=EPOCHS, ckpt_path=None, **trainer_kwargs):
    trainer_kwargs.setdefault("plugins", [ChasePrecision()])
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         **trainer_kwargs)
    loader = torch.utils.data.DataLoader(batches, batch_size=None, shuffle=False)
    trainer.fit(module, loader, ckpt_path=ckpt_path)
    return trainer


def first_passes(calls):
    firsts = {}
    for step, loss in calls:
        firsts.setdefault(step, loss)
    return [firsts[step] for step in sorted(firsts)]


@pytest.mark.parametrize("name", CHASING)
def test_lightning_trains_like_a_plain_loop_and_reports_first_passes(seed, name):
    batches = regression_batches(seed, epochs=1, hard_noise=HARD_NOISE)
    module = Regression(name, seed)
    trainer = fit(module, batches)
    optimizer = trainer.optimizers[0]
    stats = optimizer.stats
    assert stats["chased_batches"] > 0 and stats["batches"] == trainer.global_step == EPOCHS * N_BATCHES
    assert len(module.calls) == stats["batches"] + stats["extra_passes"]  # training_step ran for every pass
    firsts = first_passes(module.calls)
    assert module.outputs == firsts and module.logged == firsts  # never a chase pass's loss
    last_epoch = firsts[-N_BATCHES:]
    assert float(trainer.callback_metrics["train_loss_epoch"]) == pytest.approx(sum(last_epoch) / N_BATCHES,
                                                                                 rel=1e-5)
    scheduler = trainer.lr_scheduler_configs[0].scheduler
    assert scheduler.last_epoch == EPOCHS * N_BATCHES  # chases never advance it
    # the same optimizer and schedule in a plain loop: bit-identical weights
    plain_model = mlp(seed)
    plain = chasing_optimizer(name, plain_model.parameters())
    plain_scheduler = torch.optim.lr_scheduler.LambdaLR(plain, decay)
    for x, y in batches * EPOCHS:
        plain.step(make_closure(plain, plain_model, x, y))
        plain_scheduler.step()
    assert repr(plain.stats) == repr(stats)
    for a, b in zip(plain_model.parameters(), module.net.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", CHASING)
def test_lightning_checkpoint_resume_is_bit_identical(seed, name, tmp_path):
    batches = regression_batches(seed, epochs=1, hard_noise=HARD_NOISE)
    straight = Regression(name, seed)
    straight_trainer = fit(straight, batches)
    first = Regression(name, seed)
    fit(first, batches, epochs=1).save_checkpoint(tmp_path / "one_epoch.ckpt")
    resumed = Regression(name, seed + 1)  # different initial weights: everything must come from the checkpoint
    resumed_trainer = fit(resumed, batches, ckpt_path=tmp_path / "one_epoch.ckpt")
    assert straight_trainer.optimizers[0].stats["chased_batches"] > 0
    assert repr(resumed_trainer.optimizers[0].stats) == repr(straight_trainer.optimizers[0].stats)
    for a, b in zip(straight.net.parameters(), resumed.net.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", CHASING)
def test_lightning_gradient_accumulation_is_refused_at_the_first_step(seed, name):
    module = Regression(name, seed)
    with pytest.raises(RuntimeError, match="accumulate_grad_batches=2.*accumulating_closure"):
        fit(module, regression_batches(seed, epochs=1), accumulate_grad_batches=2)
    assert len(module.calls) == 1  # the window's first micro-batch ran outside step(); step() refused the second


@pytest.mark.parametrize("name", CHASING)
def test_lightning_16_mixed_with_chase_mixed_precision(seed, name):
    """fp16 autocast and a GradScaler forced on CPU: an initial scale far too large overflows and backs off, chases
    run, every pass's grads reach on_before_optimizer_step unscaled, and the loss falls."""
    batches = regression_batches(seed, epochs=1)
    module = Regression(name, seed)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 18)
    trainer = fit(module, batches, epochs=4, plugins=[ChaseMixedPrecision("16-mixed", "cpu", scaler=scaler)])
    stats = trainer.optimizers[0].stats
    assert stats["overflow_skips"] > 0 and scaler.get_scale() < 2.0 ** 18
    assert stats["chased_batches"] > 0 and stats["nonfinite"] == 0
    assert len(module.hook_grad_norms) == stats["batches"] + stats["extra_passes"]
    finite = [norm for norm in module.hook_grad_norms if torch.isfinite(torch.tensor(norm))]
    assert finite and max(finite) < 1e3  # unscaled: a scaled gradient would be >= 2**k times larger
    firsts = first_passes(module.calls)
    assert module.outputs == firsts
    assert statistics.median(firsts[-N_BATCHES:]) < 0.5 * statistics.median(firsts[:5])  # first 5: before training
    assert all(torch.isfinite(p).all() for p in module.parameters())


def test_lightning_stock_16_mixed_says_what_to_use(seed):
    from lightning.pytorch.plugins.precision import MixedPrecision
    module = Regression("isgd", seed)
    with pytest.raises(RuntimeError, match="ChaseMixedPrecision"):
        fit(module, regression_batches(seed, epochs=1), plugins=[MixedPrecision("16-mixed", "cpu")])


@pytest.mark.parametrize("name", CHASING)
def test_lightning_without_a_chase_plugin_is_refused_before_any_pass_is_reported(seed, name):
    module = Regression(name, seed)
    with pytest.raises(RuntimeError, match="ChasePrecision"):
        fit(module, regression_batches(seed, epochs=1), plugins=[])
    assert module.calls == []  # refused before the first closure call


def test_lightning_bf16_mixed_through_chase_mixed_precision(seed):
    batches = regression_batches(seed, epochs=1, hard_noise=HARD_NOISE)
    module = Regression("isgd", seed)
    trainer = fit(module, batches, plugins=[ChaseMixedPrecision("bf16-mixed", "cpu")])
    stats = trainer.optimizers[0].stats
    assert stats["chased_batches"] > 0 and len(module.calls) == stats["batches"] + stats["extra_passes"]
    assert module.outputs == first_passes(module.calls) == module.logged


class ManualRegression(Regression):
    """Manual optimization: the module steps ISGD with its own closure; no plugin is needed."""

    def __init__(self, name, seed):
        super().__init__(name, seed)
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        x, y = batch
        optimizer = self.optimizers()

        def closure():
            optimizer.zero_grad()
            loss = nn.functional.mse_loss(self.net(x), y)
            self.calls.append((self.trainer.global_step, float(loss.detach())))
            self.manual_backward(loss)
            return loss
        optimizer.step(closure)
        self.lr_schedulers().step()
        loss = optimizer.optimizer.last_loss
        self.log("train_loss", loss, on_step=True, on_epoch=True)
        return loss


def test_lightning_manual_optimization_needs_no_plugin(seed):
    batches = regression_batches(seed, epochs=1, hard_noise=HARD_NOISE)
    module = ManualRegression("isgd", seed)
    trainer = fit(module, batches, plugins=[])
    stats = trainer.optimizers[0].stats
    assert stats["chased_batches"] > 0 and stats["batches"] == EPOCHS * N_BATCHES
    assert module.logged == first_passes(module.calls)
    plain_model = mlp(seed)
    plain = chasing_optimizer("isgd", plain_model.parameters())
    plain_scheduler = torch.optim.lr_scheduler.LambdaLR(plain, decay)
    for x, y in batches * EPOCHS:
        plain.step(make_closure(plain, plain_model, x, y))
        plain_scheduler.step()
    for a, b in zip(plain_model.parameters(), module.net.parameters()):
        assert torch.equal(a, b)
