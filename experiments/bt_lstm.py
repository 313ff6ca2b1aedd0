"""BT-LSTM vs TT-LSTM vs LSTM, each trained to convergence, at several parameter budgets.

Settles on our data the claim of Ye et al. (CVPR 2018) that a Block-Term (BT) input-to-hidden weight beats a
Tensor-Train (TT) one, and measures the training speed of both.

Tasks (all data built offline, fixed across seeds):

1. ``moving``: :func:`accel.demo.datasets.moving_digits` with the demo's arguments (seed 0, 2 clips per image):
   8 frames of 40x40 = 1,600 inputs. Its training clips are split 85/15 by source image into train and
   validation; the test clips show images never seen in training (2,444 / 432 / 718 clips).
2. ``rows``: sklearn's 8x8 digits read one row per step (8 steps x 8 inputs), split 60/15/25 at random
   (1,079 / 269 / 449 images). A narrow input: the dense input weight has only 2,048 entries.

Models: one recurrent layer of hidden size 64, its last hidden state -> ``nn.Linear(64, 10)``.

- ``LSTM``: ``torch.nn.LSTM``.
- ``BT``: :class:`accel.nn.BTLSTM` (its default in/hidden shapes, N=2 blocks), ranks R in ``--ranks``.
- ``TT``: the same BTLSTM recurrence with its input projection swapped for tensorly-torch's TT-matrix layer
  (``tltorch.FactorizedLinear(factorization="blocktt")``, the format of TT-LSTM, Yang et al. 2017; tltorch
  0.5 has no other TT linear layer) on the same in/out tensor shapes, its TT rank chosen so that its weight
  has the parameter count nearest to BT's at each R. Its factors are rescaled so that the dense weight starts
  with BTLinear's std (``nn.Linear``'s default), and its bias is initialised as BTLSTM's.

Training: Adam (lr 2e-3, constant), batch 32, cross-entropy; after every epoch the validation accuracy and
loss are measured; training stops when neither has reached a new best for ``--patience`` epochs (the loss
keeps moving where the accuracy sits at chance early on) or after ``--max-epochs``, and the test accuracy is
that of the best-validation-accuracy weights. A seed fixes the initialisation RNG and the batch
order, which is the same for every model. Runs go to worker processes of 1 thread each; every finished run
is written to the JSON at once (``--resume`` continues a run that stopped).

The timing part (``--parts timing``) times training steps of BT and TT at each budget and of LSTM,
interleaved in one process on 1 thread (medians), so it can be rerun alone on newer library code.

    python experiments/bt_lstm.py                        # everything: 15-40 min on 2 cores, by their load
    python experiments/bt_lstm.py --parts timing report  # re-time on the current code, redraw
    python experiments/bt_lstm.py --smoke                # 1 seed, 1 rank, 2 epochs, into /tmp (pipeline check)
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from accel.nn import BTLSTM  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results"
HIDDEN, CLASSES, BATCH, LR, NUM_BLOCKS = 64, 10, 32, 2e-3, 2
DATA: dict = {}  # task -> {"train": (x, y), "val": ..., "test": ...}; built before the workers fork


def moving_task():
    from accel.demo.datasets import moving_digits

    train, test = moving_digits(sequences_per_image=2, seed=0)  # the demo's data
    images = train.sources.unique()
    held = images[torch.randperm(len(images), generator=torch.Generator().manual_seed(0))[:round(0.15 * len(images))]]
    is_val = torch.isin(train.sources, held)
    return {"train": (train.inputs[~is_val], train.labels[~is_val]), "val": (train.inputs[is_val], train.labels[is_val]),
            "test": (test.inputs, test.labels)}


def rows_task():
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.from_numpy(digits.images.astype(np.float32) / 16.0)  # (1797, 8 rows = steps, 8 columns = inputs)
    y = torch.from_numpy(digits.target.astype(np.int64))
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    test, val = order[:round(0.25 * len(y))], order[round(0.25 * len(y)):round(0.40 * len(y))]
    train = order[round(0.40 * len(y)):]
    return {"train": (x[train], y[train]), "val": (x[val], y[val]), "test": (x[test], y[test])}


TASKS = {"moving": moving_task, "rows": rows_task}


class Classifier(nn.Module):
    def __init__(self, rnn):
        super().__init__()
        self.rnn, self.head = rnn, nn.Linear(HIDDEN, CLASSES)

    def forward(self, x):
        _, (h, _) = self.rnn(x)
        return self.head(h[-1])


def tt_projection(bt, rank):
    """A tltorch TT-matrix layer on ``bt``'s in/out shapes, started at BTLinear's weight std and bias."""
    import tltorch

    tt = tltorch.FactorizedLinear(tuple(bt.in_shape), tuple(bt.out_shape), factorization="blocktt", rank=rank)
    with torch.no_grad():
        target = 1.0 / math.sqrt(3 * bt.in_features)  # nn.Linear's default weight std, which BTLinear starts at
        scale = (target / tt.weight.to_matrix().std()) ** (1.0 / len(tt.weight.factors))
        for factor in tt.weight.factors:
            factor.mul_(scale)
        tt.bias.copy_(bt.bias)
    return tt


def weight_parameters(module):
    return sum(p.numel() for name, p in module.named_parameters() if "bias" not in name)


def build(kind, features, rank=None, tt_rank=None):
    """The recurrent layer: ``kind`` in LSTM / BT (ranks ``rank``) / TT (TT rank ``tt_rank``)."""
    if kind == "LSTM":
        return nn.LSTM(features, HIDDEN, batch_first=True)
    rnn = BTLSTM(features, HIDDEN, batch_first=True, ranks=rank or 1, num_blocks=NUM_BLOCKS)
    if kind == "TT":
        rnn.input_projection = tt_projection(rnn.input_projection, tt_rank)
    return rnn


def input_weight_parameters(rnn):
    return rnn.weight_ih_l0.numel() if isinstance(rnn, nn.LSTM) else weight_parameters(rnn.input_projection)


def matched_tt_rank(features, bt_rank):
    """The TT rank whose weight parameter count is nearest to BTLSTM's at ``bt_rank`` (the smaller on a tie)."""
    with torch.random.fork_rng():
        budget = input_weight_parameters(build("BT", features, bt_rank))
        counts = {}
        for r in range(1, 65):
            counts[r] = input_weight_parameters(build("TT", features, tt_rank=r))
            if counts[r] > budget:
                break
    return min(counts, key=lambda r: (abs(counts[r] - budget), r))


def evaluate(model, split):
    x, y = split
    model.eval()
    with torch.no_grad():
        logits = torch.cat([model(xb) for xb in x.split(256)])
    return logits.argmax(1).eq(y).float().mean().item(), nn.functional.cross_entropy(logits, y).item()


def train_run(job):
    """One model trained with early stopping; returns its record (runs in a worker process)."""
    task, kind, rank, tt_rank, seed, max_epochs, patience = job
    torch.set_num_threads(1)
    data = DATA[task]
    x, y = data["train"]
    torch.manual_seed(seed)
    model = Classifier(build(kind, x.shape[-1], rank, tt_rank))
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    order = torch.Generator().manual_seed(seed)  # the same batch order for every model at this seed
    best_acc, best_loss, best_state, last_progress, history = -1.0, math.inf, None, 0, []
    for epoch in range(1, max_epochs + 1):
        model.train()
        start = time.perf_counter()
        for idx in torch.randperm(len(y), generator=order).split(BATCH):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            optimizer.step()
        seconds = time.perf_counter() - start
        val_acc, val_loss = evaluate(model, data["val"])
        history.append({"epoch": epoch, "seconds": seconds, "val_accuracy": val_acc, "val_loss": val_loss})
        if val_acc > best_acc or val_loss < best_loss:  # progress on either: a plateau at chance is not the end
            last_progress = epoch
        if val_acc > best_acc:  # the weights tested are those of the best validation accuracy
            best_acc, best_epoch, best_state = val_acc, epoch, copy.deepcopy(model.state_dict())
        best_loss = min(best_loss, val_loss)
        if epoch - last_progress >= patience:
            break
    model.load_state_dict(best_state)
    test_acc, test_loss = evaluate(model, data["test"])
    return {"task": task, "model": kind, "rank": rank, "seed": seed, "tt_rank": tt_rank,
            "input_weight_parameters": input_weight_parameters(model.rnn),
            "total_parameters": sum(p.numel() for p in model.parameters()),
            "test_accuracy": test_acc, "test_loss": test_loss, "best_val_accuracy": best_acc,
            "best_epoch": best_epoch, "epochs": len(history), "stopped_early": len(history) < max_epochs,
            "seconds_per_epoch": statistics.median(h["seconds"] for h in history), "history": history}


def run_key(run):
    return f"{run['task']}|{run['model']}|{run['rank']}|{run['seed']}"


def code_version():
    git = lambda *a: subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True).stdout.strip()  # noqa: E731
    return {"commit": git("rev-parse", "--short", "HEAD"), "branch": git("rev-parse", "--abbrev-ref", "HEAD"),
            "dirty": bool(git("status", "--porcelain", "--untracked-files=no", "--", ".", ":!experiments/results"))}


def save(results, path):
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=1))
    os.replace(tmp, path)  # atomic: a crash never leaves half a file


def tt_rank_table(args):
    """task -> BT rank -> the TT rank of the same input-weight budget."""
    return {task: {rank: matched_tt_rank(DATA[task]["train"][0].shape[-1], rank) for rank in args.ranks}
            for task in args.tasks}


def train_part(args, results, path):
    config = {"tasks": args.tasks, "ranks": args.ranks, "seeds": args.seeds, "max_epochs": args.max_epochs,
              "patience": args.patience, "hidden": HIDDEN, "batch": BATCH, "lr": LR, "num_blocks": NUM_BLOCKS}
    if results.get("config", config) != config:
        raise SystemExit(f"{path} holds runs of another configuration {results['config']}; use --fresh")
    results["config"] = config
    done = {run_key(r) for r in results.setdefault("runs", [])}
    tt_ranks = tt_rank_table(args)
    jobs = [(task, kind, rank, tt_ranks[task][rank] if kind == "TT" else None, seed, args.max_epochs, args.patience)
            for task in args.tasks for seed in range(args.seeds) for kind in ("LSTM", "BT", "TT")
            for rank in ([None] if kind == "LSTM" else args.ranks)]
    jobs = [j for j in jobs if f"{j[0]}|{j[1]}|{j[2]}|{j[4]}" not in done]
    results.setdefault("train_code", code_version())
    with multiprocessing.get_context("fork").Pool(args.workers, maxtasksperchild=1) as pool:
        for run in tqdm(pool.imap_unordered(train_run, jobs), total=len(jobs), desc="training runs"):
            results["runs"].append(run)
            save(results, path)
            tqdm.write(f"{run['task']:7s} {run['model']:4s} R={run['rank']} seed {run['seed']}: "
                       f"test {run['test_accuracy']:.3f} (val {run['best_val_accuracy']:.3f} at epoch "
                       f"{run['best_epoch']}/{run['epochs']}), {run['seconds_per_epoch']:.2f} s/epoch, "
                       f"input W {run['input_weight_parameters']:,}")


def time_steps(model, x, y, steps):
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    start = time.perf_counter()
    for _ in range(steps):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    return (time.perf_counter() - start) / steps


def time_projection(projection, x, steps):
    """Forward+backward of an input projection alone (all time steps of a batch in one call, as BTLSTM does)."""
    start = time.perf_counter()
    for _ in range(steps):
        projection(x).sum().backward()
    return (time.perf_counter() - start) / steps


def bt_path(projection, rows):
    """The contraction path BTLinear takes for ``rows`` inputs (None for other layers)."""
    return projection.method(rows) if hasattr(projection, "method") else None


def timing_part(args, results, path):
    """Seconds per training step of every model, interleaved (rotating order), on 1 thread; medians."""
    torch.set_num_threads(1)
    timing = results.setdefault("timing", {})  # the latest per task, so a rerun of one task keeps the other's
    timing.update({"threads": 1, "reps": args.reps, "steps": args.steps})
    timing.setdefault("tasks", {})
    history = {"code": code_version(), "reps": args.reps, "steps": args.steps, "tasks": {}}
    results.setdefault("timing_runs", []).append(history)  # every timing run, e.g. before and after a new recurrence
    tt_rank_by_task = tt_rank_table(args)
    for task in args.tasks:
        x, y = DATA[task]["train"]
        xb, yb = x[:BATCH], y[:BATCH]
        tt_ranks = tt_rank_by_task[task]
        torch.manual_seed(0)
        models = {"LSTM": Classifier(build("LSTM", x.shape[-1]))}
        for rank in args.ranks:
            models[f"BT|{rank}"] = Classifier(build("BT", x.shape[-1], rank))
            models[f"TT|{rank}"] = Classifier(build("TT", x.shape[-1], tt_rank=tt_ranks[rank]))
        names = list(models)
        for name in names:
            time_steps(models[name], xb, yb, 2)  # warm-up
        rows = xb.reshape(-1, x.shape[-1])  # the projection's input: every time step of the batch
        samples = {name: [] for name in names}
        projection = {name: [] for name in names if name != "LSTM"}
        for rep in tqdm(range(args.reps), desc=f"timing {task}"):
            for name in names[rep % len(names):] + names[:rep % len(names)]:
                samples[name].append(time_steps(models[name], xb, yb, args.steps))
                if name != "LSTM":
                    projection[name].append(time_projection(models[name].rnn.input_projection, rows, args.steps))
        batches = math.ceil(len(y) / BATCH)
        timing["tasks"][task] = {name: {"step_seconds": statistics.median(s), "samples": s,
                                        "epoch_seconds": statistics.median(s) * batches,
                                        "projection_step_seconds": (statistics.median(projection[name])
                                                                    if name in projection else None),
                                        "bt_path": bt_path(models[name].rnn.input_projection, len(rows))
                                        if name != "LSTM" else None,
                                        "input_weight_parameters": input_weight_parameters(models[name].rnn)}
                                 for name, s in samples.items()}
        timing.setdefault("code", {})[task] = history["code"]
        history["tasks"][task] = timing["tasks"][task]
        for rank in args.ranks:
            bt, tt = (timing["tasks"][task][f"{k}|{rank}"] for k in ("BT", "TT"))
            print(f"{task} R={rank}: BT {bt['epoch_seconds']:.2f} s/epoch, TT {tt['epoch_seconds']:.2f} "
                  f"(BT/TT {bt['step_seconds'] / tt['step_seconds']:.2f}), LSTM "
                  f"{timing['tasks'][task]['LSTM']['epoch_seconds']:.2f}; projection alone: BT "
                  f"{1e3 * bt['projection_step_seconds']:.1f} ms ({bt['bt_path']}), TT "
                  f"{1e3 * tt['projection_step_seconds']:.1f} ms")
        save(results, path)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", default=["train", "timing", "report"],
                        choices=["train", "timing", "report"])
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--ranks", nargs="+", type=int, default=[1, 2, 4], help="BT ranks R (default 1 2 4)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--max-epochs", type=int, default=30)
    parser.add_argument("--patience", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2, help="training processes, 1 thread each")
    parser.add_argument("--reps", type=int, default=7, help="timing: interleaved repetitions")
    parser.add_argument("--steps", type=int, default=10, help="timing: training steps per repetition")
    parser.add_argument("--out", type=Path, default=None,
                        help="results JSON (default: experiments/results/bt_lstm.json; with --smoke, one in /tmp)")
    parser.add_argument("--fresh", action="store_true", help="discard runs already in --out (default: resume)")
    parser.add_argument("--smoke", action="store_true", help="1 seed, 1 rank, 2 epochs, 1 timing rep")
    args = parser.parse_args()
    if args.smoke:
        args.seeds, args.ranks, args.max_epochs, args.reps, args.steps = 1, args.ranks[1:2], 2, 1, 2
        args.out = args.out or Path(tempfile.gettempdir()) / "bt_lstm_smoke.json"
        args.fresh = True
    args.out = args.out or RESULTS / "bt_lstm.json"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    results = {} if args.fresh or not args.out.exists() else json.loads(args.out.read_text())
    if "train" in args.parts or "timing" in args.parts:
        DATA.update({task: TASKS[task]() for task in args.tasks})
    if "train" in args.parts:
        train_part(args, results, args.out)
    if "timing" in args.parts:
        timing_part(args, results, args.out)
    if "report" in args.parts:
        from bt_lstm_report import report

        report(results, args.out.with_suffix(".png"))


if __name__ == "__main__":
    main()
