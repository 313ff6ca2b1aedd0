"""Part d: ISGD's per-step time against SGD's on the GPU, when nothing is chased (a chart that never fires:
``sigma`` huge), timed in interleaved blocks on a small and a large MLP. ISGD reads each batch loss on the
host for its control chart, which costs a device synchronisation per step: on a small, launch-bound model
that is the whole overhead. Both run ``step(closure)`` with momentum 0.9 and torch's default foreach path."""
from __future__ import annotations

import statistics
import time

import torch
from torch import nn

from accel.gpucheck.table import seconds_text
from accel.optim import ISGD

MODELS = {"small": (256, 3, 128), "large": (4096, 3, 1024)}  # name: (width, hidden layers, batch)
DRY_MODELS = {"small": (32, 2, 16)}
BATCHES = 8  # distinct batches cycled through, so the chart sees varied losses


def _mlp(width: int, layers: int, device) -> nn.Module:
    blocks = []
    for _ in range(layers):
        blocks += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*blocks, nn.Linear(width, 10)).to(device)


def _closure(model, optimizer, loss_fn, x, y):
    """The ``step(closure)`` argument: zero the gradients, forward, backward, return the loss."""
    def closure():
        optimizer.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        return loss
    return closure


def overhead(context, name: str, width: int, layers: int, batch: int) -> dict:
    device = context.device
    blocks, steps = (3, 5) if context.dry_run else (9, 50)
    data = [(torch.randn(batch, width, device=device), torch.randint(0, 10, (batch,), device=device))
            for _ in range(BATCHES)]
    loss_fn = nn.CrossEntropyLoss()
    runners = {}
    for kind in ("sgd", "isgd"):
        torch.manual_seed(0)
        model = _mlp(width, layers, device)
        optimizer = (torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9) if kind == "sgd" else
                     ISGD(model.parameters(), lr=0.01, momentum=0.9, sigma=1e30, window=BATCHES))
        runners[kind] = (model, optimizer)
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times: dict[str, list[float]] = {"sgd": [], "isgd": []}
    for block in range(blocks + 1):  # block 0 warms up
        for kind in (("sgd", "isgd") if block % 2 else ("isgd", "sgd")):
            model, optimizer = runners[kind]
            synchronize()
            start = time.perf_counter()
            for step in range(steps):
                optimizer.step(_closure(model, optimizer, loss_fn, *data[step % BATCHES]))
            synchronize()
            if block:
                times[kind].append((time.perf_counter() - start) / steps)
    isgd = runners["isgd"][1]
    if isgd.stats["chased_batches"]:
        raise RuntimeError(f"ISGD chased {isgd.stats['chased_batches']} batches with sigma=1e30")
    sgd_step, isgd_step = statistics.median(times["sgd"]), statistics.median(times["isgd"])
    row = context.record.row(model=name, width=width, hidden_layers=layers, batch=batch, steps_per_block=steps,
                             blocks=blocks, sgd_step_ms=1e3 * sgd_step, isgd_step_ms=1e3 * isgd_step,
                             overhead=isgd_step / sgd_step - 1.0, isgd_batches=isgd.stats["batches"])
    print(f"  {name} MLP (width {width}, batch {batch}): ISGD {row['isgd_step_ms']:.3f} ms/step vs SGD "
          f"{row['sgd_step_ms']:.3f} ms/step ({row['overhead']:+.1%})", flush=True)
    return row


def run(context) -> None:
    for name, (width, layers, batch) in (DRY_MODELS if context.dry_run else MODELS).items():
        if context.left() < 5:
            context.record.note(f"{name} model skipped: {context.left():.0f} s left")
            break
        overhead(context, name, width, layers, batch)


def table_rows(record: dict):
    return [(f"ISGD step, nothing chased, {row['model']} MLP (width {row['width']}, batch {row['batch']})",
             seconds_text(row["isgd_step_ms"] / 1e3), f"SGD {seconds_text(row['sgd_step_ms'] / 1e3)}",
             f"{row['overhead']:+.1%} time per step")
            for row in record["rows"]]
