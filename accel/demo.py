"""``python -m accel demo``: one model trained with all three techniques under whatever launcher ran it.

A sequence classifier on :func:`accel.datasets.moving_digits` (1,600 inputs per frame):

* a :class:`accel.nn.BTLSTM` encoder, whose input-to-hidden weight is a Block-Term tensor;
* an :class:`accel.nn.OutOfCoreLinear` head, whose weight lives in host memory and whose matmuls run
  through the out-of-core GEMM engine;
* :class:`accel.ISGD` with a cosine LR schedule, data-parallel over every process
  :func:`accel.distributed.init` finds (torchrun, SLURM, mpirun, or ``--nproc N`` which relaunches
  itself through torchrun).

It writes ``report.json``, ``control_chart.png`` and ``accuracy.png`` to ``--out``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from accel import distributed

NUM_CLASSES = 10


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--nproc", type=int, default=1,
                        help="processes to train on; > 1 relaunches through torchrun (default: 1, or the "
                             "processes a launcher such as srun or mpiexec started)")
    parser.add_argument("--epochs", type=int, default=None, help="epochs (default: 12, or 3 with --quick)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None,
                        help="default: cuda when a GPU is visible, else cpu")
    parser.add_argument("--out", type=Path, default=Path("runs/demo"), help="directory for the report and plots")
    parser.add_argument("--quick", action="store_true", help="a small, fast run (for tests and a first look)")
    parser.add_argument("--batch-size", type=int, default=64, help="global batch size (default: 64)")
    parser.add_argument("--lr", type=float, default=0.1, help="peak learning rate (default: 0.1)")
    parser.add_argument("--hidden-size", type=int, default=64, help="LSTM hidden size (default: 64)")
    parser.add_argument("--sigma", type=float, default=3.0,
                        help="ISGD control limit in standard deviations (default: 3.0, the paper's)")
    parser.add_argument("--seed", type=int, default=0, help="seed for data and initialisation (default: 0)")


class DemoModel(nn.Module):
    """BT-LSTM encoder -> last hidden state -> out-of-core linear head."""

    def __init__(self, input_size: int, hidden_size: int, *, device: torch.device, memory_limit: int):
        super().__init__()
        from accel.nn import BTLSTM, OutOfCoreLinear

        self.encoder = BTLSTM(input_size, hidden_size, batch_first=True, ranks=8, num_blocks=2, device=device)
        # The head's weight stays in host memory whatever the device; its three matmuls per step run
        # on this rank's device through the out-of-core engine (tile cache included).
        self.head = OutOfCoreLinear(hidden_size, NUM_CLASSES, devices=[str(device)], memory_limit=memory_limit)

    def forward(self, clips: torch.Tensor) -> torch.Tensor:
        _, (hidden, _) = self.encoder(clips)
        return self.head(hidden[-1])


def _relaunch_through_torchrun(args: argparse.Namespace) -> int:
    """Start ``args.nproc`` copies of this demo under torchrun and wait for them."""
    import subprocess

    forwarded = ["--out", str(args.out), "--batch-size", str(args.batch_size), "--lr", str(args.lr),
                 "--hidden-size", str(args.hidden_size), "--sigma", str(args.sigma), "--seed", str(args.seed)]
    forwarded += ["--epochs", str(args.epochs)] if args.epochs is not None else []
    forwarded += ["--device", args.device] if args.device is not None else []
    forwarded += ["--quick"] if args.quick else []
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={args.nproc}", "-m", "accel", "demo", *forwarded]
    print("launching:", " ".join(command), flush=True)
    return subprocess.call(command)


def _shard(count: int, info) -> torch.Tensor:
    return torch.arange(info.rank, count, info.world_size)


def _average_gradients(parameters, group) -> None:
    """Mean of the gradients over the group, for parameters that DDP does not own (the host-side head)."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, group=group)
    flat /= dist.get_world_size(group)
    offset = 0
    for grad in grads:
        grad.copy_(flat[offset:offset + grad.numel()].view_as(grad))
        offset += grad.numel()


@torch.no_grad()
def _accuracy(model: nn.Module, split, indices: torch.Tensor, device, batch_size: int, info) -> float:
    model.eval()
    correct = torch.zeros(2, dtype=torch.float64)
    for start in range(0, len(indices), batch_size):
        idx = indices[start:start + batch_size]
        logits = model(split.inputs[idx].to(device))
        correct[0] += (logits.argmax(1).cpu() == split.labels[idx]).sum().item()
        correct[1] += len(idx)
    if info.world_size > 1:
        dist.all_reduce(correct)
    model.train()
    return float(correct[0] / correct[1])


def _plot_accuracy(epochs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, left = plt.subplots(figsize=(6, 3.5))
    xs = [e["epoch"] for e in epochs]
    left.plot(xs, [100 * e["test_accuracy"] for e in epochs], "o-", color="tab:blue", label="test accuracy")
    left.axhline(100 / NUM_CLASSES, color="gray", ls=":", label="chance")
    left.set_xlabel("epoch")
    left.set_ylabel("test accuracy (%)")
    right = left.twinx()
    right.plot(xs, [e["train_loss"] for e in epochs], "s--", color="tab:red", label="train loss")
    right.set_ylabel("mean train loss")
    lines = left.get_legend_handles_labels()[0] + right.get_legend_handles_labels()[0]
    left.legend(lines, [line.get_label() for line in lines], loc="center right")
    left.set_title("accel demo: BT-LSTM + out-of-core head + ISGD")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _train(args: argparse.Namespace, info) -> dict:
    from tqdm import tqdm

    from accel.datasets import moving_digits
    from accel.optim import ISGD, plot_control_chart

    device = torch.device(info.device if args.device is None else args.device)
    if device.type == "cuda" and info.device.startswith("cuda"):
        device = torch.device(info.device)  # this rank's GPU
    epochs = args.epochs if args.epochs is not None else (3 if args.quick else 12)
    per_rank_batch = max(1, args.batch_size // info.world_size)
    torch.manual_seed(args.seed)  # identical initial weights on every rank
    train, test = moving_digits(sequences_per_image=1 if args.quick else 2, seed=args.seed)
    features = train.inputs.shape[-1]

    model = DemoModel(features, args.hidden_size, device=device, memory_limit=64 << 20)
    encoder = model.encoder
    head_group = None
    if info.world_size > 1:
        encoder = nn.parallel.DistributedDataParallel(
            model.encoder, device_ids=[device.index] if device.type == "cuda" else None)
        # the head's parameters live in host memory: average them over a gloo group even under nccl
        head_group = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else dist.group.WORLD

    train_indices = _shard(len(train), info)
    batches_per_epoch = -(-len(train_indices) // per_rank_batch)
    # the paper's window: one epoch of batch losses
    optimizer = ISGD(model.parameters(), lr=args.lr, momentum=0.9, sigma=args.sigma, window=batches_per_epoch,
                     max_chase=3, history=info.rank == 0)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    loss_fn = nn.CrossEntropyLoss()
    generator = torch.Generator().manual_seed(args.seed)  # the same shuffle on every rank

    history, start = [], time.perf_counter()
    for epoch in range(1, epochs + 1):
        order = train_indices[torch.randperm(len(train_indices), generator=generator)]
        bar = tqdm(range(batches_per_epoch), desc=f"epoch {epoch}/{epochs}", disable=info.rank != 0,
                   file=sys.stdout, dynamic_ncols=True, mininterval=0.1 if sys.stdout.isatty() else 5.0)
        losses = []
        for b in bar:
            idx = order[b * per_rank_batch:(b + 1) * per_rank_batch]
            clips, labels = train.inputs[idx].to(device), train.labels[idx].to(device)

            def closure():
                optimizer.zero_grad()
                _, (hidden, _) = encoder(clips)
                loss = loss_fn(model.head(hidden[-1]), labels)
                loss.backward()
                if head_group is not None:
                    _average_gradients(model.head.parameters(), head_group)
                return loss

            loss = optimizer.step(closure)
            losses.append(loss.item())
            bar.set_postfix(loss=f"{losses[-1]:.3f}", chased=optimizer.stats["chased_batches"], refresh=False)
        scheduler.step()
        accuracy = _accuracy(model, test, _shard(len(test), info), device, 256, info)
        history.append({"epoch": epoch, "train_loss": sum(losses) / len(losses), "test_accuracy": accuracy,
                        "seconds": time.perf_counter() - start})
        if info.rank == 0:
            print(f"epoch {epoch}: train loss {history[-1]['train_loss']:.3f}, "
                  f"test accuracy {100 * accuracy:.1f}%", flush=True)

    seconds = time.perf_counter() - start
    bt = model.encoder.input_projection
    engine_totals = model.head.engine.totals.as_dict()
    report = {
        "launcher": info.launcher, "world_size": info.world_size, "backend": info.backend,
        "device": str(device), "epochs": epochs, "global_batch_size": per_rank_batch * info.world_size,
        "train_sequences": len(train), "test_sequences": len(test), "features_per_frame": features,
        "test_accuracy": history[-1]["test_accuracy"], "chance_accuracy": 1 / NUM_CLASSES,
        "history": history, "wall_seconds": seconds,
        "isgd": {k: v for k, v in optimizer.stats.items()},
        "out_of_core": engine_totals,
    }
    report["block_term"] = {"parameters": bt.num_weight_parameters,
                            "dense_parameters": bt.in_features * bt.out_features,
                            "compression_ratio": bt.compression_ratio}
    if info.rank == 0:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "report.json").write_text(json.dumps(report, indent=2, default=float))
        plot_control_chart(optimizer.history, args.out / "control_chart.png")
        _plot_accuracy(history, args.out / "accuracy.png")
    return report


def _summary(report: dict, out: Path) -> str:
    isgd, ooc = report["isgd"], report["out_of_core"]
    lines = [
        "",
        f"accel demo: {report['world_size']} process(es) via {report['launcher']} on {report['device']}, "
        f"{report['epochs']} epochs in {report['wall_seconds']:.1f} s",
        f"  test accuracy      {100 * report['test_accuracy']:.1f}%  (chance {100 * report['chance_accuracy']:.0f}%)",
    ]
    bt = report["block_term"]
    lines += [
        f"  BT-LSTM input weight  {bt['parameters']:,} parameters vs {bt['dense_parameters']:,} dense "
        f"({bt['dense_parameters'] / bt['parameters']:,.0f}x fewer)",
        f"  ISGD               {isgd['chased_batches']} of {isgd['batches']} batches chased, "
        f"{isgd['extra_passes']} extra forward/backward passes",
        f"  out-of-core head   {ooc['bytes_to_device'] / 2**20:.1f} MiB in, {ooc['bytes_to_host'] / 2**20:.1f} MiB out "
        f"over {ooc['calls']} GEMMs, tile-cache hit rate {100 * ooc['cache_hit_rate']:.0f}%",
        f"  wrote {out / 'report.json'}, {out / 'control_chart.png'}, {out / 'accuracy.png'}",
    ]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    if args.nproc < 1:
        raise SystemExit(f"--nproc must be >= 1, got {args.nproc}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda asked for, but torch sees no CUDA GPU")
    if args.nproc > 1 and distributed.detect().launcher == "single":
        return _relaunch_through_torchrun(args)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    # --device cpu on a GPU machine: gloo, since nccl cannot reduce host tensors
    with distributed.init(backend="gloo" if args.device == "cpu" else None) as info:
        if info.rank == 0:
            print(f"accel demo: rank 0 of {info.world_size} ({info.launcher}, {info.backend or 'no process group'})",
                  flush=True)
        report = _train(args, info)
        if info.rank == 0:
            print(_summary(report, args.out), flush=True)
    return 0
