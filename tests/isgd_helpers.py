"""Builders shared by the ISGD test modules: fixed-cycle regression batches with one hard batch, a small MLP,
closures, and the optimizers set up to chase the hard batch."""
from __future__ import annotations

import torch
from torch import nn

from accel.optim import ISGD, Inconsistent

N_BATCHES = 20  # one epoch; a window of 20 lets one persistently hard batch stand out (z up to 19/sqrt(20))
CHASING = ("isgd", "inconsistent-adamw")
HARD_NOISE = 5.0  # the hard batch's offset where a test needs a chase within a few epochs


def hard_offsets(batch: int, size: float) -> torch.Tensor:
    """Targets the model cannot fit: +size and -size on alternate samples (a fixed pattern, not a random draw),
    so the hard batch's loss floor is about ``size ** 2`` on every seed."""
    signs = torch.tensor([1.0 if i % 2 == 0 else -1.0 for i in range(batch)]).unsqueeze(1)
    return size * signs


def regression_batches(seed, *, epochs=4, n_batches=N_BATCHES, batch=16, dim=5, hard_index=7, hard_noise=3.0):
    """Fixed-cycle batches (as the paper samples): easy linear targets, and one batch whose targets carry an
    unfittable offset of ``hard_noise`` (see :func:`hard_offsets`)."""
    generator = torch.Generator().manual_seed(seed)
    w_true = torch.randn(dim, 1, generator=generator)
    xs = torch.randn(n_batches, batch, dim, generator=generator)
    ys = xs @ w_true + 0.01 * torch.randn(n_batches, batch, 1, generator=generator)
    if hard_index is not None:
        ys[hard_index] += hard_offsets(batch, hard_noise)
    return [(xs[i], ys[i]) for _ in range(epochs) for i in range(n_batches)]


def chasing_optimizer(name, params, **settings):
    """ISGD or Inconsistent(AdamW), set up to chase the hard batch of :func:`regression_batches`."""
    settings = {"window": N_BATCHES, "max_chase": 3, **settings}
    if name == "isgd":
        return ISGD(params, lr=0.05, momentum=0.5, **settings)
    return Inconsistent(torch.optim.AdamW(params, lr=3e-2), **settings)


def mlp(seed, dim=5, hidden=8):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(dim, hidden), nn.Tanh(), nn.Linear(hidden, 1))


def make_closure(optimizer, model, x, y, *, sign=1.0, loss_fn=nn.functional.mse_loss):
    def closure():
        optimizer.zero_grad()
        loss = sign * loss_fn(model(x), y)
        loss.backward()
        return loss
    return closure


def train(optimizer, model, batches, *, sign=1.0, scheduler=None):
    for x, y in batches:
        optimizer.step(make_closure(optimizer, model, x, y, sign=sign))
        if scheduler is not None:
            scheduler.step()
