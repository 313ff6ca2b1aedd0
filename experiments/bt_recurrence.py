"""Forward+backward time of the BT RNNs' recurrence: fused op vs the Python reference loop vs torch.nn.

For each setting, in one run with interleaved repetitions (median reported): the BT layer with the
fused recurrence (``recurrence="fused"``, the default), the same layer on the reference loop
(``recurrence="loop"``), the matching ``torch.nn`` module of the same sizes, and the BT input
projection alone (forward+backward of ``input_projection`` over all steps). The goal: the BT layer
within 1.1x of ``nn`` + its projection, and, at 64 -> 256, T=100, batch 32, BTLSTM within 1.1x of
``nn.LSTM`` itself. The input requires no grad (an RNN's input layer); the backward starts from a fixed
random output gradient (no loss computation is timed). Wall time and this process's CPU time are both
recorded (the development machine is shared).

``--compile`` also times ``torch.compile`` of a BTLSTM model (first call, then compiled vs eager).

    python experiments/bt_recurrence.py            # full run
    python experiments/bt_recurrence.py --quick    # fewer repetitions
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from accel.nn import BTGRU, BTLSTM, BTRNN
from accel.nn.recurrence import _fused as fused_recurrence
from accel.nn.recurrence import _kernel as recurrence_kernel  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
# name, BT class, nn class, input_size, hidden_size, steps, batch, BT options
SETTINGS = [
    ("LSTM 64->256 T=100 B=32 (goal)", BTLSTM, nn.LSTM, 64, 256, 100, 32, {}),
    ("GRU 64->256 T=100 B=32", BTGRU, nn.GRU, 64, 256, 100, 32, {}),
    ("RNN 64->256 T=100 B=32", BTRNN, nn.RNN, 64, 256, 100, 32, {}),
    ("LSTM 64->256 T=100 B=32 bidirectional, 2 layers", BTLSTM, nn.LSTM, 64, 256, 100, 32,
     {"bidirectional": True, "num_layers": 2}),
    ("LSTM UCF11 57600->256 T=6 B=16", BTLSTM, nn.LSTM, 57600, 256, 6, 16,
     {"in_shape": (8, 20, 20, 18), "hidden_shape": (4, 4, 4, 4)}),
]


def timed(fn) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def step(module, x, grad):
    """Forward, then backward from a fixed random output gradient: only the layer's own work is timed."""
    def run():
        module(x)[0].backward(grad)
    return run


def without_kernel(fn):
    """``fn`` with the LSTM step on torch ops instead of accel/nn/recurrence/_csrc/lstm_step.cpp."""
    def run():
        fused_recurrence.use_kernel = False
        try:
            fn()
        finally:
            fused_recurrence.use_kernel = True
    return run


def measure(setting, repeats: int, skip_loop: bool) -> dict:
    name, bt_class, nn_class, input_size, hidden, steps, batch, options = setting
    torch.manual_seed(0)
    bt = bt_class(input_size, hidden, ranks=4, num_blocks=2, **options)
    loop = bt_class(input_size, hidden, ranks=4, num_blocks=2, recurrence="loop", **options)
    loop.load_state_dict(bt.state_dict())
    dense = nn_class(input_size, hidden, **{k: v for k, v in options.items() if k in ("bidirectional", "num_layers")})
    x = torch.randn(steps, batch, input_size)
    projection = bt.input_projection
    grad = torch.randn(steps, batch, hidden * (2 if options.get("bidirectional") else 1))
    grad_projection = torch.randn(steps, batch, projection.out_features)
    candidates = {"bt_fused": step(bt, x, grad), "nn": step(dense, x, grad),
                  "projection": lambda: projection(x).backward(grad_projection)}
    if not skip_loop:
        candidates["bt_loop"] = step(loop, x, grad)
    if bt.mode == "LSTM" and recurrence_kernel.lstm_step(x.dtype) is not None:
        candidates["bt_fused_torch_ops"] = without_kernel(step(bt, x, grad))  # the kernel's twin
    with torch.no_grad():  # outputs of the fused and loop recurrences agree
        difference = (bt(x)[0] - loop(x)[0]).abs().max().item()
    times = {key: [] for key in candidates}
    for repeat in range(repeats + 1):
        for key, fn in candidates.items():
            wall, cpu = timed(fn)
            if repeat:  # the first round warms up
                times[key].append((wall, cpu))
    wall = {k: statistics.median(w for w, _ in v) for k, v in times.items()}
    cpu = {k: statistics.median(c for _, c in v) for k, v in times.items()}
    result = {"setting": name, "steps": steps, "batch": batch, "input_size": input_size, "hidden_size": hidden,
              "options": {k: list(v) if isinstance(v, tuple) else v for k, v in options.items()},
              "wall_ms": {k: 1000 * v for k, v in wall.items()}, "cpu_ms": {k: 1000 * v for k, v in cpu.items()},
              "fused_vs_loop_max_abs_difference": difference}
    for clock, t in (("wall", wall), ("cpu", cpu)):
        result[f"bt_over_nn_{clock}"] = t["bt_fused"] / t["nn"]
        result[f"bt_over_nn_plus_projection_{clock}"] = t["bt_fused"] / (t["nn"] + t["projection"])
        if "bt_loop" in t:
            result[f"loop_over_fused_{clock}"] = t["bt_loop"] / t["bt_fused"]
        if "bt_fused_torch_ops" in t:
            result[f"torch_ops_over_kernel_{clock}"] = t["bt_fused_torch_ops"] / t["bt_fused"]
    return result


def measure_compile(repeats: int) -> dict:
    """torch.compile of a small BTLSTM classifier's training step: first call, then compiled / eager."""
    torch.manual_seed(0)

    class Classifier(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = BTLSTM(64, 256, batch_first=True)
            self.head = nn.Linear(256, 10)

        def forward(self, x):
            return self.head(self.rnn(x)[0][:, -1])

    model = Classifier()
    x = torch.randn(32, 100, 64)
    compiled = torch.compile(model, fullgraph=True)
    first = timed(step_single(compiled, x))[0]
    fns = {"eager": step_single(model, x), "compiled": step_single(compiled, x)}
    times = {k: [] for k in fns}
    for repeat in range(repeats + 1):
        for key, fn in fns.items():
            wall = timed(fn)[0]
            if repeat:
                times[key].append(wall)
    median = {k: statistics.median(v) for k, v in times.items()}
    return {"setting": "BTLSTM 64->256 + Linear head, batch 32, T=100, fullgraph", "first_call_s": first,
            "eager_ms": 1000 * median["eager"], "compiled_ms": 1000 * median["compiled"],
            "eager_over_compiled": median["eager"] / median["compiled"]}


def step_single(module, x):
    def run():
        module(x).square().mean().backward()
    return run


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 repetitions instead of 9")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile of a BTLSTM model")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--only", default=None, help="run only the settings whose name contains this")
    parser.add_argument("--out", default=str(RESULTS / "bt_recurrence.json"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats = 3 if args.quick else 9
    results = {"torch": torch.__version__, "threads": torch.get_num_threads(), "repeats": repeats,
               "load_average_before": os.getloadavg(), "settings": []}
    for setting in [s for s in SETTINGS if args.only is None or args.only in s[0]]:
        result = measure(setting, repeats, skip_loop=False)
        results["settings"].append(result)
        print(f"{result['setting']}: wall ms " + ", ".join(f"{k} {v:.1f}" for k, v in result["wall_ms"].items())
              + f" | BT/nn {result['bt_over_nn_wall']:.2f}x (cpu {result['bt_over_nn_cpu']:.2f}x), "
              f"BT/(nn+projection) {result['bt_over_nn_plus_projection_wall']:.2f}x "
              f"(cpu {result['bt_over_nn_plus_projection_cpu']:.2f}x), "
              f"loop/fused {result['loop_over_fused_wall']:.2f}x"
              + (f", torch ops/kernel {result['torch_ops_over_kernel_cpu']:.2f}x (cpu)"
                 if "torch_ops_over_kernel_cpu" in result else ""),
              flush=True)
    if args.compile:
        results["compile"] = measure_compile(repeats)
        print(results["compile"])
    results["load_average_after"] = os.getloadavg()
    results["lstm_step_kernel"] = recurrence_kernel.status
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    print("wrote", args.out)


if __name__ == "__main__":
    main()
