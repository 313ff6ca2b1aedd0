"""SGD vs ISGD: same model, data order, lr, momentum and batch size; several seeds; two offline data sets.

ISGD runs in four variants beside SGD (same seeds, same data order): the paper's Shewhart chart (``isgd``), the
residual chart around the loss trend (``isgd-residual``), and each with the full Polyak chase step
(``isgd-polyak``, ``isgd-residual-polyak``): the two levers, what the chart flags and how far a chase moves.

(a) MNIST-1D generated offline by ``mnist1d.data.make_dataset`` (4,000 train / 1,000 test signals of length 40)
    with the CNN of the MNIST-1D paper (three stride-2 Conv1d layers of 25 channels, a linear head);
(b) scikit-learn's ``load_digits`` (1,797 8x8 images, 80/20 split) with a 64-128-10 MLP.

Batches follow the paper's fixed-cycle sampling: one permutation per seed, replayed every epoch, so every batch
recurs once per epoch; ISGD's window is one epoch of batch losses. Reports, per data set: epochs and training
seconds to a target test accuracy (median and min-max over seeds), final accuracy, ISGD's extra forward/backward
passes as a fraction of batches, and ISGD's per-step overhead when nothing is chased (sigma so large the chart never
fires, timed against SGD in interleaved blocks). Writes experiments/results/isgd_vs_sgd.json and .png.

    python experiments/isgd_vs_sgd.py            # the committed run
    python experiments/isgd_vs_sgd.py --quick    # a smoke run (2 seeds, few epochs)
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from accel.optim import ISGD  # noqa: E402
from accel.optim.charts import make_chart  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


# -- data and models --------------------------------------------------------------------------------
def load_mnist1d():
    from mnist1d.data import get_dataset_args, make_dataset  # make_dataset generates offline; get_dataset downloads
    data = make_dataset(get_dataset_args())
    as_x = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
    as_y = lambda a: torch.tensor(a, dtype=torch.long)  # noqa: E731
    return as_x(data["x"]), as_y(data["y"]), as_x(data["x_test"]), as_y(data["y_test"])


def load_digits_split():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(x / 16.0, y, test_size=0.2, random_state=0, stratify=y)
    return (torch.tensor(x_train, dtype=torch.float32), torch.tensor(y_train), torch.tensor(x_test, dtype=torch.float32),
            torch.tensor(y_test))


class MNIST1DConvNet(nn.Module):
    """The CNN of the MNIST-1D paper (greydanus/mnist1d ``ConvBase``): 40 -> 19 -> 10 -> 5 steps, 25 channels."""

    def __init__(self, channels: int = 25, classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv1d(1, channels, 5, stride=2, padding=1)
        self.conv2 = nn.Conv1d(channels, channels, 3, stride=2, padding=1)
        self.conv3 = nn.Conv1d(channels, channels, 3, stride=2, padding=1)
        self.linear = nn.Linear(channels * 5, classes)

    def forward(self, x):
        h = x.view(-1, 1, x.shape[-1])
        h = torch.relu(self.conv3(torch.relu(self.conv2(torch.relu(self.conv1(h))))))
        return self.linear(h.flatten(1))


DATASETS = {
    "mnist1d": dict(load=load_mnist1d, model=MNIST1DConvNet, lr=0.05, batch_size=100, epochs=60, target=0.90),
    "digits": dict(load=load_digits_split, model=lambda: nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10)),
                   lr=0.05, batch_size=32, epochs=40, target=0.96),
}


VARIANTS = {"sgd": None,
            "isgd": dict(chart="shewhart", chase_step="gradient"),
            "isgd-residual": dict(chart="residual", chase_step="gradient"),
            "isgd-polyak": dict(chart="shewhart", chase_step="polyak"),
            "isgd-residual-polyak": dict(chart="residual", chase_step="polyak")}


# -- one training run ----------------------------------------------------------------------------------
@torch.no_grad()
def accuracy(model, x, y):
    return float((model(x).argmax(1) == y).float().mean())


def fixed_cycle_batches(n, batch_size, seed):
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return [order[i:i + batch_size] for i in range(0, n - batch_size + 1, batch_size)]


def make_optimizer(name, model, spec, args, n_batches, history=False, sigma=None):
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=spec["lr"], momentum=args.momentum)
    return ISGD(model.parameters(), lr=spec["lr"], momentum=args.momentum, sigma=sigma or args.sigma,
                window=n_batches, max_chase=args.max_chase, epsilon=args.epsilon, history=history,
                **VARIANTS[name])


def train_run(name, dataset, data, spec, args, seed, epochs, history=False):
    x_train, y_train, x_test, y_test = data
    torch.manual_seed(seed)
    model = spec["model"]()
    batches = fixed_cycle_batches(len(y_train), spec["batch_size"], seed)
    optimizer = make_optimizer(name, model, spec, args, len(batches), history=history)
    loss_fn = nn.CrossEntropyLoss()
    curve = [{"epoch": 0, "seconds": 0.0, "accuracy": accuracy(model, x_test, y_test)}]
    seconds = 0.0
    for epoch in tqdm(range(1, epochs + 1), desc=f"{dataset} {name} seed {seed}", leave=False):
        start = time.perf_counter()
        for index in batches:
            x, y = x_train[index], y_train[index]

            def closure(x=x, y=y):
                optimizer.zero_grad()
                loss = loss_fn(model(x), y)
                loss.backward()
                return loss
            optimizer.step(closure)
        seconds += time.perf_counter() - start  # training time only; evaluation is not charged
        curve.append({"epoch": epoch, "seconds": seconds, "accuracy": accuracy(model, x_test, y_test)})
    reached = next((point for point in curve if point["accuracy"] >= spec["target"]), None)
    run = {"optimizer": name, "seed": seed, "curve": curve, "final_accuracy": curve[-1]["accuracy"],
           "epochs_to_target": reached and reached["epoch"], "seconds_to_target": reached and reached["seconds"],
           "train_seconds": seconds}
    if name != "sgd":
        run["stats"] = optimizer.stats
        if history:
            run["history"] = optimizer.history
    return run


# -- overhead when nothing is chased -------------------------------------------------------------------
def step_overhead(dataset, data, spec, args, blocks, steps_per_block):
    """Median per-step time of ISGD (each chart) with a chart that never fires over SGD's, in interleaved blocks."""
    x_train, y_train, *_ = data
    batches = fixed_cycle_batches(len(y_train), spec["batch_size"], 0)
    loss_fn = nn.CrossEntropyLoss()
    runners = {}
    names = ("sgd", "isgd", "isgd-residual")
    for name in names:
        torch.manual_seed(0)
        model = spec["model"]()
        runners[name] = (model, make_optimizer(name, model, spec, args, len(batches), sigma=1e30))
    times = {name: [] for name in names}
    for block in tqdm(range(blocks + 1), desc=f"{dataset} overhead", leave=False):
        for name in (names if block % 2 else names[::-1]):
            model, optimizer = runners[name]
            start = time.perf_counter()
            for step in range(steps_per_block):
                index = batches[step % len(batches)]

                def closure(model=model, optimizer=optimizer, index=index):
                    optimizer.zero_grad()
                    loss = loss_fn(model(x_train[index]), y_train[index])
                    loss.backward()
                    return loss
                optimizer.step(closure)
            if block:  # block 0 warms up
                times[name].append((time.perf_counter() - start) / steps_per_block)
    assert all(runners[name][1].stats["chased_batches"] == 0 for name in names[1:])
    sgd, isgd, residual = (statistics.median(times[name]) for name in names)
    bookkeeping = {chart: bookkeeping_seconds(len(batches), chart) for chart in ("shewhart", "residual")}
    return {"sgd_step_ms": 1e3 * sgd, "isgd_step_ms": 1e3 * isgd, "overhead": isgd / sgd - 1.0,
            "isgd_residual_step_ms": 1e3 * residual, "residual_overhead": residual / sgd - 1.0,
            "bookkeeping_us": 1e6 * bookkeeping["shewhart"], "residual_bookkeeping_us": 1e6 * bookkeeping["residual"],
            "bookkeeping_fraction_of_sgd_step": bookkeeping["shewhart"] / sgd,
            "blocks": blocks, "steps_per_block": steps_per_block}


def bookkeeping_seconds(window, chart, steps=20000, repeats=5):
    """ISGD's own cost per step, free of the model: step(closure) on a constant loss and a parameter without grad,
    minus the same call on torch.optim.SGD. Timing noise from shared cores hardly touches a loop this tight."""
    loss = torch.tensor(1.0)
    costs = {}
    for name in ("sgd", "isgd"):
        parameter = nn.Parameter(torch.zeros(1))
        optimizer = (torch.optim.SGD([parameter], lr=0.1) if name == "sgd"
                     else ISGD([parameter], lr=0.1, sigma=1e30, window=window, chart=chart))
        closure = lambda: loss  # noqa: E731
        samples = []
        for _ in range(repeats):
            start = time.perf_counter()
            for _ in range(steps):
                optimizer.step(closure)
            samples.append((time.perf_counter() - start) / steps)
        costs[name] = min(samples)
    return costs["isgd"] - costs["sgd"]


# -- summary and plot ----------------------------------------------------------------------------------
def spread(values):
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def summarize(runs, seeds, names):
    summary = {}
    sgd_runs = {r["seed"]: r for r in runs if r["optimizer"] == "sgd"}
    for name in names:
        mine = [r for r in runs if r["optimizer"] == name]
        entry = {"reached_target": f"{sum(r['epochs_to_target'] is not None for r in mine)}/{len(seeds)}",
                 "epochs_to_target": spread([r["epochs_to_target"] for r in mine]),
                 "seconds_to_target": spread([r["seconds_to_target"] for r in mine]),
                 "final_accuracy": spread([r["final_accuracy"] for r in mine]),
                 "seconds_per_epoch": spread([r["train_seconds"] / (len(r["curve"]) - 1) for r in mine])}
        if name != "sgd":
            entry["extra_pass_fraction"] = spread([r["stats"]["extra_pass_fraction"] for r in mine])
            entry["chased_batch_fraction"] = spread([r["stats"]["chased_batches"] / r["stats"]["batches"]
                                                     for r in mine])
            # paired by seed: same initialisation and data order as SGD's run
            pairs = [(sgd_runs[r["seed"]], r) for r in mine
                     if sgd_runs[r["seed"]]["seconds_to_target"] and r["seconds_to_target"]]
            entry["over_sgd_seconds_to_target"] = spread([i["seconds_to_target"] / s["seconds_to_target"]
                                                          for s, i in pairs])
            entry["over_sgd_epochs_to_target"] = spread([i["epochs_to_target"] / s["epochs_to_target"]
                                                         for s, i in pairs])
            entry["fewer_epochs_than_sgd"] = f"{sum(i['epochs_to_target'] < s['epochs_to_target'] for s, i in pairs)}" \
                                             f"/{len(pairs)}"
        summary[name] = entry
    return summary


def replay_charts(history, window, sigma):
    """Both charts' limits over one run's batch losses, each judged before the loss enters its window."""
    charts = {kind: make_chart(kind, window=window, sigma=sigma, warmup=None) for kind in ("shewhart", "residual")}
    limits = {kind: [] for kind in charts}
    for record in history:
        for kind, chart in charts.items():
            limits[kind].append(chart.limit if chart.warm else math.nan)
            if math.isfinite(record["loss"]):
                chart.observe(record["loss"])
    return limits


COLORS = {"sgd": "tab:blue", "isgd": "tab:red", "isgd-residual": "tab:green", "isgd-polyak": "tab:orange",
          "isgd-residual-polyak": "tab:purple"}


def plot(results, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = list(results["datasets"])
    figure, axes = plt.subplots(1, len(names) + 1, figsize=(6 * (len(names) + 1), 4.4))
    for ax, dataset in zip(axes, names):
        entry = results["datasets"][dataset]
        for run in entry["runs"]:
            label = run["optimizer"] if run["seed"] == entry["runs"][0]["seed"] else None
            ax.plot([p["seconds"] for p in run["curve"]], [p["accuracy"] for p in run["curve"]],
                    color=COLORS[run["optimizer"]], alpha=0.55, lw=1, label=label)
        ax.axhline(entry["target"], color="gray", ls=":", lw=1, label=f"target {entry['target']:.0%}")
        ax.set_xlabel("training seconds (1 CPU thread)")
        ax.set_ylabel("test accuracy")
        ax.set_title(f"{dataset}: accuracy vs time, {len(entry['seeds'])} seeds")
        ax.set_ylim(max(0.0, entry["target"] - 0.35), 1.0)
        ax.legend(loc="lower right", fontsize=7)
    entry = results["datasets"][names[0]]
    chart_run = next((r for r in entry["runs"] if "history" in r), None)
    if chart_run is not None:
        history = chart_run["history"]
        limits = replay_charts(history, entry["window"], results["settings"]["sigma"])
        ax = axes[-1]
        steps = [r["step"] for r in history]
        ax.plot(steps, [r["loss"] for r in history], lw=0.5, color="tab:blue", label="batch loss")
        ax.plot(steps, limits["shewhart"], lw=1.1, ls="--", color="tab:red", label="Shewhart limit (paper)")
        ax.plot(steps, limits["residual"], lw=1.1, ls="--", color="tab:green", label="residual limit (trend)")
        chased = [r for r in history if r["chased"]]
        ax.scatter([r["step"] for r in chased], [r["loss"] for r in chased], s=12, color="black", zorder=3,
                   label=f"chased by {chart_run['optimizer']} ({len(chased)})")
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.set_title(f"both charts on one run: {names[0]} {chart_run['optimizer']} seed {chart_run['seed']}")
        ax.legend(loc="upper right", fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--seeds", type=int, default=5, help="number of seeds (0..N-1)")
    parser.add_argument("--epochs", type=int, default=None, help="epochs per run (default: per data set)")
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--sigma", type=float, default=3.0)
    parser.add_argument("--max-chase", type=int, default=5)
    parser.add_argument("--epsilon", type=float, default=0.1)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (timings are per thread count)")
    parser.add_argument("--overhead-blocks", type=int, default=20)
    parser.add_argument("--chart-run", default="isgd-residual", help="variant whose seed-0 run the chart panel shows")
    parser.add_argument("--quick", action="store_true", help="2 seeds, 5 epochs, short overhead timing")
    parser.add_argument("--out", type=Path, default=RESULTS / "isgd_vs_sgd.json")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.epochs, args.overhead_blocks = 2, args.epochs or 5, 2
    names = ["sgd"] + [name for name in args.variants if name != "sgd"]
    torch.set_num_threads(args.threads)
    seeds = list(range(args.seeds))
    results = {"command": "python experiments/" + Path(__file__).name + " " + " ".join(argv or sys.argv[1:]),
               "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
               "threads": args.threads, "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
               "datasets": {}}
    for dataset in args.datasets:
        spec = DATASETS[dataset]
        data = spec["load"]()
        epochs = args.epochs or spec["epochs"]
        runs = []
        for seed in tqdm(seeds, desc=dataset):
            for name in names:
                runs.append(train_run(name, dataset, data, spec, args, seed, epochs,
                                      history=(name == args.chart_run and seed == seeds[0])))
        overhead = step_overhead(dataset, data, spec, args, args.overhead_blocks, 2 * len(data[1]) // spec["batch_size"])
        entry = {"target": spec["target"], "lr": spec["lr"], "batch_size": spec["batch_size"], "epochs": epochs,
                 "window": len(data[1]) // spec["batch_size"], "seeds": seeds, "train_size": len(data[1]),
                 "test_size": len(data[3]), "summary": summarize(runs, seeds, names), "overhead_no_chase": overhead,
                 "runs": runs}
        results["datasets"][dataset] = entry
        print_summary(dataset, spec, entry, names)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    plot(results, args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")


def print_summary(dataset, spec, entry, names):
    s, overhead = entry["summary"], entry["overhead_no_chase"]
    print(f"\n{dataset}: target {spec['target']:.0%}")
    for name in names:
        e, t, a = s[name]["epochs_to_target"], s[name]["seconds_to_target"], s[name]["final_accuracy"]
        line = (f"  {name:21s} reached {s[name]['reached_target']}  epochs {e and e['median']} "
                f"[{e and e['min']}-{e and e['max']}]  seconds {t and round(t['median'], 2)} "
                f"[{t and round(t['min'], 2)}-{t and round(t['max'], 2)}]  final acc {a['median']:.4f} "
                f"[{a['min']:.4f}-{a['max']:.4f}]")
        if name != "sgd":
            ratio, chased = s[name]["over_sgd_epochs_to_target"], s[name]["chased_batch_fraction"]
            line += (f"  chased {chased['median']:.2%}  extra passes {s[name]['extra_pass_fraction']['median']:.2%}"
                     f"  epochs/SGD {ratio and round(ratio['median'], 3)}  fewer epochs than SGD in "
                     f"{s[name]['fewer_epochs_than_sgd']} seeds")
        print(line)
    print(f"  per-step overhead with nothing chased: Shewhart {overhead['overhead']:+.2%}, residual "
          f"{overhead['residual_overhead']:+.2%} (SGD step {overhead['sgd_step_ms']:.3f} ms); bookkeeping "
          f"{overhead['bookkeeping_us']:.1f} / {overhead['residual_bookkeeping_us']:.1f} us per step")


if __name__ == "__main__":
    main()
