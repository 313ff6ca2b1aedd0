"""SGD vs ISGD: same model, data order, lr, momentum and batch size; several seeds; two offline data sets.

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
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from accel.optim import ISGD, plot_control_chart  # noqa: E402

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
                window=n_batches, max_chase=args.max_chase, epsilon=args.epsilon, history=history)


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

            def closure():
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
    if name == "isgd":
        run["stats"] = optimizer.stats
        if history:
            run["history"] = optimizer.history
    return run


# -- overhead when nothing is chased -------------------------------------------------------------------
def step_overhead(dataset, data, spec, args, blocks, steps_per_block):
    """Median per-step time of ISGD with a chart that never fires over SGD's, timed in interleaved blocks."""
    x_train, y_train, *_ = data
    batches = fixed_cycle_batches(len(y_train), spec["batch_size"], 0)
    loss_fn = nn.CrossEntropyLoss()
    runners = {}
    for name in ("sgd", "isgd"):
        torch.manual_seed(0)
        model = spec["model"]()
        runners[name] = (model, make_optimizer(name, model, spec, args, len(batches), sigma=1e30))
    times = {"sgd": [], "isgd": []}
    for block in tqdm(range(blocks + 1), desc=f"{dataset} overhead", leave=False):
        for name in (("sgd", "isgd") if block % 2 else ("isgd", "sgd")):
            model, optimizer = runners[name]
            start = time.perf_counter()
            for step in range(steps_per_block):
                index = batches[step % len(batches)]

                def closure():
                    optimizer.zero_grad()
                    loss = loss_fn(model(x_train[index]), y_train[index])
                    loss.backward()
                    return loss
                optimizer.step(closure)
            if block:  # block 0 warms up
                times[name].append((time.perf_counter() - start) / steps_per_block)
    assert runners["isgd"][1].stats["chased_batches"] == 0
    sgd, isgd = statistics.median(times["sgd"]), statistics.median(times["isgd"])
    bookkeeping = bookkeeping_seconds(len(batches))
    return {"sgd_step_ms": 1e3 * sgd, "isgd_step_ms": 1e3 * isgd, "overhead": isgd / sgd - 1.0,
            "bookkeeping_us": 1e6 * bookkeeping, "bookkeeping_fraction_of_sgd_step": bookkeeping / sgd,
            "blocks": blocks, "steps_per_block": steps_per_block}


def bookkeeping_seconds(window, steps=20000, repeats=5):
    """ISGD's own cost per step, free of the model: step(closure) on a constant loss and a parameter without grad,
    minus the same call on torch.optim.SGD. Timing noise from shared cores hardly touches a loop this tight."""
    loss = torch.tensor(1.0)
    costs = {}
    for name in ("sgd", "isgd"):
        parameter = nn.Parameter(torch.zeros(1))
        optimizer = (torch.optim.SGD([parameter], lr=0.1) if name == "sgd"
                     else ISGD([parameter], lr=0.1, sigma=1e30, window=window))
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


def summarize(runs, seeds):
    summary = {}
    for name in ("sgd", "isgd"):
        mine = [r for r in runs if r["optimizer"] == name]
        summary[name] = {"reached_target": f"{sum(r['epochs_to_target'] is not None for r in mine)}/{len(seeds)}",
                         "epochs_to_target": spread([r["epochs_to_target"] for r in mine]),
                         "seconds_to_target": spread([r["seconds_to_target"] for r in mine]),
                         "final_accuracy": spread([r["final_accuracy"] for r in mine]),
                         "seconds_per_epoch": spread([r["train_seconds"] / (len(r["curve"]) - 1) for r in mine])}
    isgd_runs = [r for r in runs if r["optimizer"] == "isgd"]
    summary["isgd"]["extra_pass_fraction"] = spread([r["stats"]["extra_pass_fraction"] for r in isgd_runs])
    summary["isgd"]["chased_batch_fraction"] = spread([r["stats"]["chased_batches"] / r["stats"]["batches"]
                                                       for r in isgd_runs])
    # paired by seed: same initialisation and data order for both optimizers
    pairs = [(s, i) for s in runs if s["optimizer"] == "sgd" for i in isgd_runs
             if i["seed"] == s["seed"] and s["seconds_to_target"] and i["seconds_to_target"]]
    summary["isgd_over_sgd_seconds_to_target"] = spread([i["seconds_to_target"] / s["seconds_to_target"]
                                                         for s, i in pairs])
    summary["isgd_over_sgd_epochs_to_target"] = spread([i["epochs_to_target"] / s["epochs_to_target"]
                                                        for s, i in pairs])
    return summary


def plot(results, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = list(results["datasets"])
    figure, axes = plt.subplots(1, len(names) + 1, figsize=(6 * (len(names) + 1), 4.2))
    colors = {"sgd": "tab:blue", "isgd": "tab:red"}
    for ax, dataset in zip(axes, names):
        entry = results["datasets"][dataset]
        for run in entry["runs"]:
            label = run["optimizer"].upper() if run["seed"] == entry["runs"][0]["seed"] else None
            ax.plot([p["seconds"] for p in run["curve"]], [p["accuracy"] for p in run["curve"]],
                    color=colors[run["optimizer"]], alpha=0.6, lw=1, label=label)
        ax.axhline(entry["target"], color="gray", ls=":", lw=1, label=f"target {entry['target']:.0%}")
        ax.set_xlabel("training seconds (1 CPU thread)")
        ax.set_ylabel("test accuracy")
        ax.set_title(f"{dataset}: accuracy vs time, {len(entry['seeds'])} seeds")
        ax.set_ylim(max(0.0, entry["target"] - 0.35), 1.0)
        ax.legend(loc="lower right", fontsize=8)
    chart_run = next(r for r in results["datasets"][names[0]]["runs"] if "history" in r)
    plot_control_chart(chart_run["history"], ax=axes[-1],
                       title=f"ISGD control chart, {names[0]} seed {chart_run['seed']}")
    axes[-1].set_yscale("log")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--seeds", type=int, default=5, help="number of seeds (0..N-1)")
    parser.add_argument("--epochs", type=int, default=None, help="epochs per run (default: per data set)")
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--sigma", type=float, default=3.0)
    parser.add_argument("--max-chase", type=int, default=5)
    parser.add_argument("--epsilon", type=float, default=0.1)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (timings are per thread count)")
    parser.add_argument("--overhead-blocks", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="2 seeds, 5 epochs, short overhead timing")
    parser.add_argument("--out", type=Path, default=RESULTS / "isgd_vs_sgd.json")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.epochs, args.overhead_blocks = 2, args.epochs or 5, 2
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
            for name in ("sgd", "isgd"):
                runs.append(train_run(name, dataset, data, spec, args, seed, epochs,
                                      history=(name == "isgd" and seed == seeds[0])))
        overhead = step_overhead(dataset, data, spec, args, args.overhead_blocks, 2 * len(data[1]) // spec["batch_size"])
        entry = {"target": spec["target"], "lr": spec["lr"], "batch_size": spec["batch_size"], "epochs": epochs,
                 "seeds": seeds, "train_size": len(data[1]), "test_size": len(data[3]),
                 "summary": summarize(runs, seeds), "overhead_no_chase": overhead, "runs": runs}
        results["datasets"][dataset] = entry
        s = entry["summary"]
        print(f"\n{dataset}: target {spec['target']:.0%}  SGD reached {s['sgd']['reached_target']}, "
              f"ISGD reached {s['isgd']['reached_target']}")
        for name in ("sgd", "isgd"):
            e, t, a = s[name]["epochs_to_target"], s[name]["seconds_to_target"], s[name]["final_accuracy"]
            print(f"  {name:5s} epochs to target {e and e['median']} [{e and e['min']}-{e and e['max']}]  "
                  f"seconds {t and round(t['median'], 2)} [{t and round(t['min'], 2)}-{t and round(t['max'], 2)}]  "
                  f"final acc {a['median']:.4f} [{a['min']:.4f}-{a['max']:.4f}]")
        ratio = s["isgd_over_sgd_seconds_to_target"]
        print(f"  ISGD/SGD seconds to target (paired by seed): {ratio and round(ratio['median'], 3)} "
              f"[{ratio and round(ratio['min'], 3)}-{ratio and round(ratio['max'], 3)}]; extra passes "
              f"{s['isgd']['extra_pass_fraction']['median']:.2%} of batches; per-step overhead with nothing chased "
              f"{overhead['overhead']:+.2%} ({overhead['isgd_step_ms']:.3f} vs {overhead['sgd_step_ms']:.3f} ms); "
              f"ISGD bookkeeping {overhead['bookkeeping_us']:.1f} us/step = "
              f"{overhead['bookkeeping_fraction_of_sgd_step']:.2%} of an SGD step")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    plot(results, args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
