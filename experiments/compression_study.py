"""Post-training compression of a trained LSTM classifier: accel's block-term format (``accel.nn.compress_``) vs
tensorly-torch's TT-matrix format at the same parameter budgets, each fine-tuned for a few epochs.

The BT-RNN paper (Ye et al., CVPR 2018) trains BT layers from scratch; users mostly have a trained dense model
and want it smaller. This study measures that use.

Task: :func:`accel.demo.datasets.moving_digits` (built offline from sklearn's digits) with ``--canvas`` frames (default
32x32 = 1,024 inputs per frame), ``--frames`` frames per clip, 2 clips per source image, data seed 0. Its training
clips are split 85/15 by source image into train and validation; the test clips show images never seen in training.

Model: ``nn.LSTM(features, 64, batch_first=True)`` -> last hidden state -> ``nn.Linear(64, 10)``. Its input weight
(256 x 1,024 by default) holds most of the parameters; it is the weight both formats compress.

Per seed (the seed fixes the initialisation and the batch order):

1. Dense: Adam (lr 2e-3), batch 32, until the validation accuracy has not improved for ``--patience`` epochs (at
   most ``--max-epochs``); the best-validation weights are kept.
2. For each budget (a fraction of the input weight's parameters, ``--budgets``):

   * BT: ``accel.nn.compress_(model, filter_fn=<the LSTM>, ranks=budget)`` (N=2 blocks; the largest common
     Tucker rank that fits the budget), i.e. a BTLSTM whose input projection is the block-term decomposition of
     the trained input weight;
   * TT: the same BTLSTM recurrence with its input projection replaced by
     ``tltorch.FactorizedLinear.from_linear(..., factorization="blocktt")`` (the TT-matrix format of TT-LSTM,
     tltorch's TT-SVD of the trained weight) on the same in/out tensor shapes, its TT rank the one whose weight
     parameter count is nearest BT's;
   * BT-random-init (the control): BT's architecture freshly initialised (``compress_(..., decompose=False)``),
     trained for the same epochs: what the decomposition of the trained weights is worth.

   Each is fine-tuned for ``--finetune-epochs`` epochs (Adam, lr 1e-3, same batch order for all) and its test
   accuracy measured before and after; fine-tuning time is wall-clock on one thread.

3. Step times (first seed only): the dense, BT and TT models' training steps timed in interleaved rounds
   (medians), so a change of the machine's load hits all of them alike.

Everything runs in one process on one thread (a 2-core machine shared with other jobs: times are indicative,
their BT/TT ratio more than their values). Writes ``experiments/results/compression_study.json`` and ``.png``.

    nice -n 10 python experiments/compression_study.py            # 3 seeds, 3 budgets
    python experiments/compression_study.py --smoke               # 1 seed, 1 budget, 2 epochs, into /tmp
"""
from __future__ import annotations

import argparse
import copy
import functools
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import accel.nn  # noqa: E402
from accel.demo.datasets import moving_digits  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results"
HIDDEN, CLASSES, BATCH, LR, FINETUNE_LR, NUM_BLOCKS = 64, 10, 32, 2e-3, 1e-3, 2


class Classifier(nn.Module):
    def __init__(self, features: int):
        super().__init__()
        self.lstm = nn.LSTM(features, HIDDEN, batch_first=True)
        self.head = nn.Linear(HIDDEN, CLASSES)

    def forward(self, x):
        _, (h, _) = self.lstm(x)
        return self.head(h[-1])


def make_data(canvas: int, frames: int):
    train, test = moving_digits(num_frames=frames, canvas=(canvas, canvas), sequences_per_image=2, seed=0)
    images = train.sources.unique()
    held = images[torch.randperm(len(images), generator=torch.Generator().manual_seed(0))[:round(0.15 * len(images))]]
    is_val = torch.isin(train.sources, held)
    return {"train": (train.inputs[~is_val], train.labels[~is_val]),
            "val": (train.inputs[is_val], train.labels[is_val]), "test": (test.inputs, test.labels)}


@torch.no_grad()
def accuracy(model, split):
    model.eval()
    x, y = split
    correct = sum((model(x[i:i + 256]).argmax(1) == y[i:i + 256]).sum().item() for i in range(0, len(y), 256))
    model.train()
    return correct / len(y)


def train_epoch(model, optimizer, data, generator):
    x, y = data["train"]
    order = torch.randperm(len(y), generator=generator)
    for i in range(0, len(y), BATCH):
        index = order[i:i + BATCH]
        loss = nn.functional.cross_entropy(model(x[index]), y[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def train_dense(data, seed, max_epochs, patience):
    torch.manual_seed(seed)
    model = Classifier(data["train"][0].shape[-1])
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    generator = torch.Generator().manual_seed(seed)
    best, best_state, best_epoch, epoch = -1.0, None, 0, 0
    start = time.perf_counter()
    for epoch in range(1, max_epochs + 1):
        train_epoch(model, optimizer, data, generator)
        val = accuracy(model, data["val"])
        if val > best:
            best, best_state, best_epoch = val, copy.deepcopy(model.state_dict()), epoch
        elif epoch - best_epoch >= patience:
            break
    model.load_state_dict(best_state)
    return model, {"seed": seed, "epochs": epoch, "best_epoch": best_epoch, "val_accuracy": best,
                   "test_accuracy": accuracy(model, data["test"]), "parameters": count(model),
                   "input_weight_parameters": model.lstm.weight_ih_l0.numel(),
                   "train_seconds": time.perf_counter() - start}


def count(module):
    return sum(p.numel() for p in module.parameters())


def weight_count(module):
    return sum(p.numel() for name, p in module.named_parameters() if "bias" not in name.rpartition(".")[2])


def compress_bt(dense, budget):
    model = copy.deepcopy(dense)
    start = time.perf_counter()
    summary = accel.nn.compress_(model, lambda module, name: name == "lstm", ranks=budget, num_blocks=NUM_BLOCKS)
    seconds = time.perf_counter() - start
    layer = summary["lstm"]
    return model, {"rank": list(layer.ranks), "relative_error": layer.relative_error,
                   "input_weight_parameters": weight_count(model.lstm.input_projection), "compress_seconds": seconds}


def random_bt(features, seed, ranks, num_blocks):
    """The BT model's architecture freshly initialised (``compress_(..., decompose=False)``): the control that
    shows what the decomposition of the trained weights is worth."""
    torch.manual_seed(100 + seed)
    model = Classifier(features)
    accel.nn.compress_(model, ranks={"lstm": tuple(ranks)}, num_blocks={"lstm": num_blocks}, decompose=False)
    return model, {"rank": list(ranks), "relative_error": None,
                   "input_weight_parameters": weight_count(model.lstm.input_projection), "compress_seconds": 0.0}


def step_times(models, data, rounds, batches):
    """Median seconds per training step of each model, measured in interleaved rounds (round-robin over the
    models, ``batches`` steps each per round), so a change in the machine's load hits every model alike."""
    x, y = data["train"]
    samples = {name: [] for name in models}
    optimizers = {name: torch.optim.Adam(model.parameters(), lr=FINETUNE_LR) for name, model in models.items()}
    for round_ in range(rounds + 1):
        for name, model in models.items():
            start = time.perf_counter()
            for b in range(batches):
                index = torch.arange(b * BATCH, (b + 1) * BATCH) % len(y)
                loss = nn.functional.cross_entropy(model(x[index]), y[index])
                optimizers[name].zero_grad()
                loss.backward()
                optimizers[name].step()
            if round_:  # the first round warms up (allocations, plan caches)
                samples[name].append((time.perf_counter() - start) / batches)
    return {name: statistics.median(values) for name, values in samples.items()}


def tt_projection(weight, bias, in_shape, out_shape, rank):
    import tltorch

    linear = nn.Linear(weight.shape[1], weight.shape[0])
    with torch.no_grad():
        linear.weight.copy_(weight)
        linear.bias.copy_(bias)
    return tltorch.FactorizedLinear.from_linear(linear, auto_tensorize=False, in_tensorized_features=in_shape,
                                                out_tensorized_features=out_shape, factorization="blocktt",
                                                rank=rank)


def matched_tt_rank(weight, bias, in_shape, out_shape, target):
    """The TT rank whose TT-SVD of ``weight`` has the weight parameter count nearest ``target`` (counted on the
    layers tltorch builds, whose TT-SVD caps ranks at the unfoldings' sizes; counts grow with the rank)."""
    @functools.cache
    def parameters(rank):
        return weight_count(tt_projection(weight, bias, in_shape, out_shape, rank))

    low, high = 1, 1
    while parameters(high) < target and high < 4096:
        low, high = high, 2 * high
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if parameters(middle) < target else (low, middle)
    return min((low, high), key=lambda r: abs(parameters(r) - target))


def compress_tt(dense, bt_model, target_parameters):
    """The BT model's recurrence (its dense weights are the trained ones) with a TT input projection."""
    model = copy.deepcopy(bt_model)
    projection = model.lstm.input_projection
    in_shape, out_shape = tuple(projection.in_shape), tuple(projection.out_shape)
    weight, bias = dense.lstm.weight_ih_l0.detach(), dense.lstm.bias_ih_l0.detach()
    rank = matched_tt_rank(weight, bias, in_shape, out_shape, target_parameters)
    start = time.perf_counter()
    tt = tt_projection(weight, bias, in_shape, out_shape, rank)
    seconds = time.perf_counter() - start
    model.lstm.input_projection = tt
    with torch.no_grad():
        error = ((tt.weight.to_matrix() - weight).norm() / weight.norm()).item()
    return model, {"rank": rank, "relative_error": error, "input_weight_parameters": weight_count(tt),
                   "compress_seconds": seconds}


def finetune(model, data, seed, epochs):
    optimizer = torch.optim.Adam(model.parameters(), lr=FINETUNE_LR)
    generator = torch.Generator().manual_seed(10_000 + seed)
    history = []
    start = time.perf_counter()
    for _ in range(epochs):
        train_epoch(model, optimizer, data, generator)
        history.append(accuracy(model, data["val"]))
    seconds = time.perf_counter() - start
    return {"finetune_seconds": seconds, "val_history": history, "val_accuracy": history[-1] if history else None,
            "test_accuracy": accuracy(model, data["test"])}


def run(args):
    torch.set_num_threads(1)
    data = make_data(args.canvas, args.frames)
    results = {"config": {"canvas": args.canvas, "frames": args.frames, "hidden": HIDDEN, "batch": BATCH, "lr": LR,
                          "finetune_lr": FINETUNE_LR, "num_blocks": NUM_BLOCKS, "budgets": args.budgets,
                          "seeds": args.seeds, "max_epochs": args.max_epochs, "patience": args.patience,
                          "finetune_epochs": args.finetune_epochs,
                          "clips": {k: len(v[1]) for k, v in data.items()}, "threads": 1,
                          "machine": f"{platform.machine()}, 2 cores shared with other jobs",
                          "torch": torch.__version__},
               "dense": [], "runs": []}
    for seed in args.seeds:
        dense, report = train_dense(data, seed, args.max_epochs, args.patience)
        results["dense"].append(report)
        print(f"seed {seed}: dense {report['test_accuracy']:.3f} test after {report['best_epoch']} epochs "
              f"({report['train_seconds']:.0f} s)", flush=True)
        timed = {"dense": copy.deepcopy(dense)}
        for budget in args.budgets:
            bt, bt_info = compress_bt(dense, budget)
            tt, tt_info = compress_tt(dense, bt, bt_info["input_weight_parameters"])
            scratch, scratch_info = random_bt(data["train"][0].shape[-1], seed, bt_info["rank"], NUM_BLOCKS)
            timed[f"BT|{budget}"], timed[f"TT|{budget}"] = copy.deepcopy(bt), copy.deepcopy(tt)
            for name, model, info in (("BT", bt, bt_info), ("TT", tt, tt_info),
                                      ("BT-random-init", scratch, scratch_info)):
                torch.manual_seed(seed)
                record = {"format": name, "budget": budget, "seed": seed, **info, "parameters": count(model),
                          "test_accuracy_compressed": accuracy(model, data["test"])}
                record.update(finetune(model, data, seed, args.finetune_epochs))
                results["runs"].append(record)
                error = "-" if record["relative_error"] is None else f"{record['relative_error']:.3f}"
                print(f"  {name} budget {budget}: {record['parameters']:,} params, error "
                      f"{error}, test {record['test_accuracy_compressed']:.3f} -> "
                      f"{record['test_accuracy']:.3f} in {record['finetune_seconds']:.1f} s", flush=True)
        if seed == args.seeds[0]:  # step times, interleaved, on the first seed's models
            load = os.getloadavg()[0]
            times = step_times(timed, data, args.timing_rounds, 10)
            results["step_seconds"] = {"median_per_step": times, "load_average_1min_before": load,
                                       "rounds": args.timing_rounds, "steps_per_round": 10}
            print("  step ms: " + ", ".join(f"{k} {1e3 * v:.1f}" for k, v in times.items()), flush=True)
        args.out.write_text(json.dumps(results, indent=1))
    results["table"] = table(results)
    args.out.write_text(json.dumps(results, indent=1))
    print(markdown(results))
    plot(results, args.out.with_suffix(".png"))


def table(results):
    rows = []
    dense = results["dense"]
    rows.append({"format": "dense", "budget": 1.0, "parameters": dense[0]["parameters"],
                 "input_weight_parameters": dense[0]["input_weight_parameters"], "relative_error": 0.0,
                 "test_compressed": [d["test_accuracy"] for d in dense], "test": [d["test_accuracy"] for d in dense],
                 "finetune_seconds": [0.0 for _ in dense]})
    for budget in results["config"]["budgets"]:
        for name in ("BT", "TT", "BT-random-init"):
            runs = [r for r in results["runs"] if r["format"] == name and r["budget"] == budget]
            if not runs:
                continue
            rows.append({"format": name, "budget": budget, "parameters": runs[0]["parameters"],
                         "input_weight_parameters": runs[0]["input_weight_parameters"], "rank": runs[0]["rank"],
                         "relative_error": None if runs[0]["relative_error"] is None else
                         statistics.mean(r["relative_error"] for r in runs),
                         "test_compressed": [r["test_accuracy_compressed"] for r in runs],
                         "test": [r["test_accuracy"] for r in runs],
                         "finetune_seconds": [r["finetune_seconds"] for r in runs],
                         "step_seconds": results.get("step_seconds", {}).get("median_per_step", {}).get(
                             f"{name}|{budget}")})
    rows[0]["step_seconds"] = results.get("step_seconds", {}).get("median_per_step", {}).get("dense")
    return rows


def _mean_sd(values, scale=100.0):
    mean = statistics.mean(values) * scale
    sd = statistics.stdev(values) * scale if len(values) > 1 else 0.0
    return f"{mean:.1f} ± {sd:.1f}"


def markdown(results):
    lines = ["| format | budget | rank | input weight params | model params | rel. error | test acc. compressed (%) | "
             "test acc. fine-tuned (%) | fine-tune s (median) | ms / step (interleaved) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in results["table"]:
        rank = row.get("rank", "-")
        rank = "x".join(map(str, rank)) if isinstance(rank, list) else rank
        step = "-" if row.get("step_seconds") is None else f"{1e3 * row['step_seconds']:.1f}"
        error = "-" if row["relative_error"] is None else f"{row['relative_error']:.3f}"
        compressed = "-" if row["format"] == "BT-random-init" else _mean_sd(row["test_compressed"])
        lines.append(f"| {row['format']} | {row['budget']:g} | {rank} | {row['input_weight_parameters']:,} | "
                     f"{row['parameters']:,} | {error} | {compressed} | {_mean_sd(row['test'])} | "
                     f"{statistics.median(row['finetune_seconds']):.1f} | {step} |")
    return "\n".join(lines)


def plot(results, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    dense = results["table"][0]
    colours = {"BT": "tab:blue", "TT": "tab:orange", "BT-random-init": "tab:gray"}
    for name in ("BT", "TT", "BT-random-init"):
        rows = [r for r in results["table"] if r["format"] == name]
        if not rows:
            continue
        x = [r["parameters"] for r in rows]
        curves = [("test", "-o", "fine-tuned")]
        if name != "BT-random-init":
            curves.append(("test_compressed", ":x", "right after compression"))
        for key, style, label in curves:
            means = [statistics.mean(r[key]) * 100 for r in rows]
            sds = [statistics.stdev(r[key]) * 100 if len(r[key]) > 1 else 0 for r in rows]
            left.errorbar(x, means, yerr=sds, fmt=style, color=colours[name], capsize=3, label=f"{name}, {label}")
        if name != "BT-random-init" and all(r.get("step_seconds") for r in rows):
            right.plot(x, [1e3 * r["step_seconds"] for r in rows], "-o", color=colours[name], label=name)
    left.axhline(statistics.mean(dense["test"]) * 100, color="k", lw=1,
                 label=f"dense LSTM ({dense['parameters']:,} params)")
    left.set(xscale="log", xlabel="model parameters", ylabel="test accuracy (%)",
             title=f"moving digits: {results['config']['finetune_epochs']} fine-tuning epochs, "
                   f"{len(results['dense'])} seeds (mean ± sd)")
    left.legend(fontsize=7)
    if dense.get("step_seconds"):
        right.axhline(1e3 * dense["step_seconds"], color="k", lw=1, label="dense LSTM")
    right.set(xscale="log", xlabel="model parameters", ylabel="ms per training step (batch 32)",
              title="step time, interleaved medians (1 thread, shared machine)")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.005, 0.02, 0.08],
                        help="fractions of the dense input weight's parameters")
    parser.add_argument("--canvas", type=int, default=32)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--max-epochs", type=int, default=40)
    parser.add_argument("--patience", type=int, default=4)
    parser.add_argument("--finetune-epochs", type=int, default=4)
    parser.add_argument("--timing-rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=RESULTS / "compression_study.json")
    parser.add_argument("--smoke", action="store_true", help="1 seed, 1 budget, 2 epochs, written to /tmp")
    args = parser.parse_args()
    if args.smoke:
        args.seeds, args.budgets, args.max_epochs, args.finetune_epochs, args.timing_rounds = [0], [0.02], 2, 1, 1
        args.out = Path(tempfile.gettempdir()) / "compression_study_smoke.json"
    if any(not 0 < b < 1 for b in args.budgets):
        parser.error("--budgets are fractions in (0, 1)")
    if math.prod([len(args.seeds), len(args.budgets)]) == 0:
        parser.error("need at least one seed and one budget")
    run(args)


if __name__ == "__main__":
    main()
