"""BT-LSTM vs LSTM (and a TT-matrix LSTM from tensorly-torch) on two offline sequence tasks.

1. Moving digits: each sklearn digit (8x8, upscaled to 32x32) wanders (a random walk of one pixel per
   frame, within 6 pixels of the centre) on a 48x48 canvas for 8 frames under heavy pixel noise
   (sigma 1 on [0, 1] pixels), so no single frame is reliable: 2,304 inputs per frame, 10 classes,
   1,297 train / 500 test sequences. (A first version with digits bouncing across a 64x64 canvas
   was left at chance by every model: nothing in them is translation invariant.)
2. MNIST-1D (``mnist1d.make_dataset()``, generated offline): 40 steps x 1 channel, 4,000 / 1,000.
   One input per step: here BT cannot compress anything (the input weight is 1 x 4H); the task checks
   that BTLSTM trains like nn.LSTM on a real sequence set.

Each model: recurrent layer -> last hidden state -> linear classifier; Adam, same schedule for all.
Reported per model: parameters of the input-to-hidden weight and in total, test accuracy and training
time, over several seeds.

    python experiments/bt_lstm.py           # 2 seeds (about 7 minutes on 2 shared cores)
    python experiments/bt_lstm.py --quick   # 1 seed, fewer epochs
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from accel.nn import BTLSTM  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def moving_digits(seed=0, canvas=48, scale=4, frames=8, noise=1.0, drift=6, test=500):
    """Digits drifting near the centre of a noisy canvas: (train_x, train_y, test_x, test_y)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(seed)
    images = np.kron(digits.images / 16.0, np.ones((scale, scale)))  # (n, 32, 32)
    size, n = images.shape[1], len(images)
    centre = (canvas - size) // 2
    x = np.zeros((n, frames, canvas, canvas), dtype=np.float32)
    for i in range(n):
        offset = rng.integers(-drift // 2, drift // 2 + 1, 2)
        for t in range(frames):  # a random walk of one pixel per frame, within +-drift of the centre
            offset = np.clip(offset + rng.integers(-1, 2, 2), -drift, drift)
            r, c = centre + offset
            x[i, t, r:r + size, c:c + size] = images[i]
    x += noise * rng.standard_normal(x.shape).astype(np.float32)
    order = rng.permutation(n)
    x, y = x.reshape(n, frames, canvas * canvas)[order], digits.target[order]
    return (torch.from_numpy(x[test:]), torch.from_numpy(y[test:]), torch.from_numpy(x[:test]),
            torch.from_numpy(y[:test]))


def mnist1d_data():
    from mnist1d.data import get_dataset_args, make_dataset

    data = make_dataset(get_dataset_args())  # generated locally; get_dataset() would download
    to = lambda a, dtype: torch.as_tensor(np.asarray(a), dtype=dtype)  # noqa: E731
    return (to(data["x"], torch.float32).unsqueeze(-1), to(data["y"], torch.long),
            to(data["x_test"], torch.float32).unsqueeze(-1), to(data["y_test"], torch.long))


class Classifier(nn.Module):
    def __init__(self, rnn, hidden, classes=10):
        super().__init__()
        self.rnn, self.head = rnn, nn.Linear(hidden, classes)

    def forward(self, x):
        _, (h, _) = self.rnn(x)
        return self.head(h[-1])


def input_weight_parameters(rnn):
    if isinstance(rnn, nn.LSTM):
        return rnn.weight_ih_l0.numel()
    projection = rnn.input_projection
    return sum(p.numel() for name, p in projection.named_parameters() if "bias" not in name)


def make_models(task):
    """name -> factory(seed) of the recurrent layer."""
    if task["name"] == "moving digits":
        in_shape, hidden_shape, hidden = (8, 8, 6, 6), (4, 4, 2, 2), 64
    else:
        in_shape, hidden_shape, hidden = (1,), (64,), 64
    features = int(np.prod(in_shape))
    models = {
        "LSTM": lambda: nn.LSTM(features, hidden, batch_first=True),
        "BT-LSTM (R=4, N=2)": lambda: BTLSTM(features, hidden, batch_first=True, in_shape=in_shape,
                                             hidden_shape=hidden_shape, ranks=4, num_blocks=2),
    }
    if len(in_shape) > 1:
        try:
            import tltorch

            def tt_lstm():
                rnn = BTLSTM(features, hidden, batch_first=True, in_shape=in_shape, hidden_shape=hidden_shape)
                rnn.input_projection = tltorch.FactorizedLinear(  # same recurrence, TT-matrix input weight
                    in_tensorized_features=in_shape, out_tensorized_features=(4 * hidden_shape[0], *hidden_shape[1:]),
                    factorization="blocktt", rank=4)
                return rnn
            models["TT-LSTM (tltorch, rank 4)"] = tt_lstm
        except ImportError:
            pass
    return models, hidden


def train(task, name, factory, hidden, seed, epochs, batch=32, lr=2e-3):
    torch.manual_seed(seed)
    x, y, x_test, y_test = task["data"]
    model = Classifier(factory(), hidden)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    start = time.perf_counter()
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(len(x)).split(batch):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            optimizer.step()
    seconds = time.perf_counter() - start
    model.eval()
    with torch.no_grad():
        accuracy = torch.cat([model(xb).argmax(1) for xb in x_test.split(256)]).eq(y_test).float().mean().item()
    return {"model": name, "seed": seed, "accuracy": accuracy, "train_seconds": seconds,
            "input_weight_parameters": input_weight_parameters(model.rnn),
            "total_parameters": sum(p.numel() for p in model.parameters())}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 seed and fewer epochs")
    parser.add_argument("--seeds", type=int, default=None, help="number of seeds (default 2; 1 with --quick)")
    args = parser.parse_args()
    seeds = range(args.seeds or (1 if args.quick else 2))
    tasks = [
        {"name": "moving digits", "loader": moving_digits, "epochs": 3 if args.quick else 6},
        {"name": "MNIST-1D", "loader": mnist1d_data, "epochs": 2 if args.quick else 5},
    ]
    runs = []
    for task in tasks:
        task["data"] = task.pop("loader")()
        models, hidden = make_models(task)
        jobs = [(name, factory, seed) for seed in seeds for name, factory in models.items()]
        for name, factory, seed in tqdm(jobs, desc=task["name"]):
            run = train(task, name, factory, hidden, seed, task["epochs"])
            run["task"], run["epochs"] = task["name"], task["epochs"]
            runs.append(run)
            tqdm.write(f"{task['name']:14s} {name:28s} seed {seed}: acc {run['accuracy']:.3f} "
                       f"train {run['train_seconds']:.1f}s input-weight params {run['input_weight_parameters']:,}")
    summary = []
    for task in tasks:
        for name in dict.fromkeys(r["model"] for r in runs if r["task"] == task["name"]):
            rs = [r for r in runs if r["task"] == task["name"] and r["model"] == name]
            acc = [r["accuracy"] for r in rs]
            summary.append({"task": task["name"], "model": name, "seeds": len(rs),
                            "accuracy_mean": statistics.mean(acc),
                            "accuracy_std": statistics.stdev(acc) if len(acc) > 1 else 0.0,
                            "train_seconds_median": statistics.median(r["train_seconds"] for r in rs),
                            "input_weight_parameters": rs[0]["input_weight_parameters"],
                            "total_parameters": rs[0]["total_parameters"], "epochs": rs[0]["epochs"]})
    print(f"\n{'task':14s} {'model':28s} {'input W params':>14s} {'total':>9s} {'accuracy':>15s} {'train s':>8s}")
    for s in summary:
        print(f"{s['task']:14s} {s['model']:28s} {s['input_weight_parameters']:14,d} {s['total_parameters']:9,d} "
              f"{s['accuracy_mean']:.3f} +- {s['accuracy_std']:.3f} {s['train_seconds_median']:8.1f}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "bt_lstm.json").write_text(json.dumps({"quick": args.quick, "threads": torch.get_num_threads(),
                                                       "summary": summary, "runs": runs}, indent=1))
    plot(summary, RESULTS / "bt_lstm.png")
    print(f"wrote {RESULTS / 'bt_lstm.json'} and bt_lstm.png")


def plot(summary, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(s["task"] for s in summary))
    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 3.8))
    for ax, task in zip(np.atleast_1d(axes), tasks):
        rows = [s for s in summary if s["task"] == task]
        for s in rows:
            ax.errorbar(s["input_weight_parameters"], s["accuracy_mean"], yerr=s["accuracy_std"], fmt="o",
                        capsize=3, label=f"{s['model']} ({s['train_seconds_median']:.0f}s)")
        ax.set_xscale("log")
        ax.set_xlabel("input-to-hidden weight parameters")
        ax.set_ylabel("test accuracy")
        ax.set_title(task)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
