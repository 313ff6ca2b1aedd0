"""torchrun worker for tests/test_isgd_ddp.py: ISGD under DistributedDataParallel (gloo, CPU).

Phase "train": every rank holds half of each global batch; batch 7 of every epoch is hard only in rank 0's half,
so only the all-reduced loss can make both ranks chase together. Every rank also runs ISGD single-process
(before joining the process group) on the concatenated batches: the reference the DDP run must match.
Phase "float": the same training with a closure that returns a Python float (the loss all-reduce then makes its
own tensor on the group's device). Phase "nan": rank 1 returns a NaN loss on one regular pass and on one chase
pass; nobody hangs or diverges. The backend is chosen explicitly (argv[2], "gloo" from the test): a default pick
would take nccl on a GPU machine.
Rank 0 prints one line ``RESULT <json>`` for the test to check.
"""
import json
import math
import os
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from accel.optim import ISGD

N_BATCHES, EPOCHS, HALF, DIM, HARD = 20, 4, 8, 5, 7
SETTINGS = dict(lr=0.05, momentum=0.5, window=N_BATCHES, max_chase=3, history=True)


def global_batches(seed):
    generator = torch.Generator().manual_seed(seed)
    w_true = torch.randn(DIM, 1, generator=generator)
    xs = torch.randn(N_BATCHES, 2 * HALF, DIM, generator=generator)
    ys = xs @ w_true + 0.01 * torch.randn(N_BATCHES, 2 * HALF, 1, generator=generator)
    ys[HARD, :HALF] += 6.0 * torch.randn(HALF, 1, generator=generator)  # hard only in rank 0's half
    return [(xs[i], ys[i]) for _ in range(EPOCHS) for i in range(N_BATCHES)]


def mlp(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(DIM, 8), nn.Tanh(), nn.Linear(8, 1))


def train(model, optimizer, batches, poison=lambda step, call: False, as_float=False):
    for step, (x, y) in enumerate(batches):
        calls = [0]

        def closure(calls=calls, step=step, x=x, y=y):
            optimizer.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            if poison(step, calls[0]):
                loss = loss * math.nan
            calls[0] += 1
            loss.backward()
            return loss.item() if as_float else loss
        optimizer.step(closure)


def flat(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def gathered(tensor):
    pieces = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(pieces, tensor)
    return pieces


def gathered_object(value):
    pieces = [None] * dist.get_world_size()
    dist.all_gather_object(pieces, value)
    return pieces


def main(seed, backend):
    batches = global_batches(seed)
    reference_model = mlp(seed)
    reference = ISGD(reference_model.parameters(), **SETTINGS)
    train(reference_model, reference, batches)  # single process: torch.distributed is not initialized yet

    dist.init_process_group(backend)
    rank = dist.get_rank()
    local = [(x[rank * HALF:(rank + 1) * HALF], y[rank * HALF:(rank + 1) * HALF]) for x, y in batches]
    model = DistributedDataParallel(mlp(seed))
    optimizer = ISGD(model.parameters(), **SETTINGS)
    train(model, optimizer, local)
    params = gathered(flat(model.module))
    stats = gathered_object(optimizer.stats)
    chased = gathered_object([h["step"] for h in optimizer.history if h["chased"]])

    float_model = DistributedDataParallel(mlp(seed))
    float_optimizer = ISGD(float_model.parameters(), **SETTINGS)
    train(float_model, float_optimizer, local, as_float=True)
    float_params = gathered(flat(float_model.module))

    # phase "nan": rank 1 poisons the regular pass of step 25 and the first chase pass of the first chased batch
    first_hard = next(s for s in chased[0] if s >= 0)
    nan_model = DistributedDataParallel(mlp(seed))
    nan_optimizer = ISGD(nan_model.parameters(), **SETTINGS)
    train(nan_model, nan_optimizer, local,
          poison=lambda step, call: rank == 1 and ((step == 25 and call == 0) or (step == first_hard and call == 1)))
    nan_params = gathered(flat(nan_model.module))
    nan_stats = gathered_object(nan_optimizer.stats)

    if rank == 0:
        result = {
            "backend": dist.get_backend(),
            "float_equals_tensor": all(torch.equal(a, b) for a, b in zip(params, float_params)),
            "float_stats": float_optimizer.stats,
            "ranks_identical": all(torch.equal(params[0], p) for p in params[1:]),
            "max_diff_to_single_process": float((params[0] - flat(reference_model)).abs().max()),
            "stats": stats, "reference_stats": reference.stats,
            "chased": chased, "reference_chased": [h["step"] for h in reference.history if h["chased"]],
            "nan_ranks_identical": all(torch.equal(nan_params[0], p) for p in nan_params[1:]),
            "nan_finite": bool(torch.isfinite(nan_params[0]).all()),
            "nan_stats": nan_stats, "first_hard": first_hard,
        }
        print("RESULT " + json.dumps(result), flush=True)
    dist.barrier()
    # leave without tearing down: in torch 2.13 freeing a DDP Reducer destroys ProcessGroupGloo, whose destructor
    # joins a gloo thread that waits for the GIL the freeing thread holds (a deadlock seen here at exit)
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2])
