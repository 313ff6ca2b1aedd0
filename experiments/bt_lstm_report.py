"""Summary table and accuracy-vs-parameters plot of ``experiments/bt_lstm.py``'s results JSON."""
from __future__ import annotations

import statistics

import numpy as np

TASK_TITLES = {"moving": "moving digits (1,600 inputs x 8 frames)", "rows": "digits by rows (8 inputs x 8 steps)"}
STYLE = {"LSTM": ("k", "*"), "BT": ("tab:blue", "o"), "TT": ("tab:orange", "s")}


def summarize(results):
    """One row per (task, model, BT rank): accuracy over seeds, parameters, epochs, seconds per epoch."""
    groups: dict = {}
    for run in results.get("runs", []):
        groups.setdefault((run["task"], run["model"], run["rank"]), []).append(run)
    timing = results.get("timing", {}).get("tasks", {})
    order = {"LSTM": 0, "BT": 1, "TT": 2}
    rows = []
    for (task, model, rank), runs in sorted(groups.items(), key=lambda kv: (kv[0][0], order[kv[0][1]], kv[0][2] or 0)):
        acc = [r["test_accuracy"] for r in runs]
        timed = timing.get(task, {}).get("LSTM" if model == "LSTM" else f"{model}|{rank}")
        rows.append({"task": task, "model": model, "rank": rank, "tt_rank": runs[0]["tt_rank"], "seeds": len(runs),
                     "accuracy_mean": statistics.mean(acc), "accuracy_std": statistics.stdev(acc) if len(acc) > 1 else 0.0,
                     "input_weight_parameters": runs[0]["input_weight_parameters"],
                     "total_parameters": runs[0]["total_parameters"],
                     "epochs_median": statistics.median(r["epochs"] for r in runs),
                     "stopped_early": sum(r["stopped_early"] for r in runs),
                     "seconds_per_epoch": statistics.median(r["seconds_per_epoch"] for r in runs),
                     "timed_seconds_per_epoch": timed["epoch_seconds"] if timed else None})
    return rows


def label(row):
    if row["model"] == "LSTM":
        return "nn.LSTM"
    if row["model"] == "BT":
        return f"BT-LSTM R={row['rank']}, N=2"
    return f"TT-LSTM rank {row['tt_rank']} (budget of BT R={row['rank']})"


def markdown_table(rows):
    lines = ["| task | model | input-weight params | total params | test accuracy | epochs, median (stopped by "
             "patience) | s/epoch in training | s/epoch timed |", "|---|---|---|---|---|---|---|---|"]
    previous = None
    for r in rows:
        timed = f"{r['timed_seconds_per_epoch']:.2f}" if r["timed_seconds_per_epoch"] is not None else "-"
        lines.append(f"| {r['task'] if r['task'] != previous else ''} | {label(r)} | {r['input_weight_parameters']:,} "
                     f"| {r['total_parameters']:,} | {r['accuracy_mean']:.3f} +- {r['accuracy_std']:.3f} "
                     f"| {r['epochs_median']:g} ({r['stopped_early']}/{r['seeds']}) | {r['seconds_per_epoch']:.2f} "
                     f"| {timed} |")
        previous = r["task"]
    return "\n".join(lines)


def plot(rows, path, results_code):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(r["task"] for r in rows))
    fig, axes = plt.subplots(2, len(tasks), figsize=(5.5 * len(tasks), 7), squeeze=False)
    for column, task in enumerate(tasks):
        top, bottom = axes[0, column], axes[1, column]
        for model, (colour, marker) in STYLE.items():
            rs = sorted((r for r in rows if r["task"] == task and r["model"] == model),
                        key=lambda r: r["input_weight_parameters"])
            if not rs:
                continue
            params = [r["input_weight_parameters"] for r in rs]
            name = {"LSTM": "nn.LSTM", "BT": "BT-LSTM (R=" + ",".join(str(r["rank"]) for r in rs) + ")",
                    "TT": "TT-LSTM (rank " + ",".join(str(r["tt_rank"]) for r in rs) + ")"}[model]
            top.errorbar(params, [r["accuracy_mean"] for r in rs], yerr=[r["accuracy_std"] for r in rs],
                         color=colour, marker=marker, capsize=3, label=name)
            timed = [r["timed_seconds_per_epoch"] for r in rs]
            seconds = timed if all(t is not None for t in timed) else [r["seconds_per_epoch"] for r in rs]
            bottom.plot(params, seconds, color=colour, marker=marker, label=name)
        top.set_title(TASK_TITLES.get(task, task), fontsize=10)
        top.set_ylabel(f"test accuracy (mean +- std, {rows[0]['seeds']} seeds)")
        code = results_code.get(task, {}).get("commit", "?")
        bottom.set_ylabel(f"s per training epoch (1 thread, timed\ninterleaved alone; code {code})")
        for ax in (top, bottom):
            ax.set_xscale("log")
            ax.set_xlabel("input-to-hidden weight parameters")
            ax.grid(alpha=0.3)
        top.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def report(results, png_path):
    rows = summarize(results)
    if not rows:
        raise SystemExit("no training runs in the results: run the train part first")
    print(markdown_table(rows))
    timing = results.get("timing", {})
    for task, models in timing.get("tasks", {}).items():
        ratios = [models[k]["step_seconds"] / models["TT" + k[2:]]["step_seconds"] for k in models if k.startswith("BT|")]
        print(f"{task}: BT / TT seconds per step at equal budgets: " + ", ".join(f"{r:.2f}" for r in ratios)
              + f" (geometric mean {float(np.exp(np.mean(np.log(ratios)))):.2f}; code {timing['code'][task]})")
    plot(rows, png_path, timing.get("code", {}))
    print(f"wrote {png_path}")
