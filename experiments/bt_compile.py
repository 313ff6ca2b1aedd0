"""torch.compile of BTLinear on each contraction path: first-call time, graph breaks, accuracy, speed.

For every setting and path a fresh process with an empty Inductor cache (so the compile time is the one
a user's very first call sees, Dynamo and Inductor warm-up included) builds the layer, compiles it with
``torch.compile`` (default mode), and records:

- ``default_threads_first_call_s``: the first forward+backward with an empty cache and Inductor's own
  compile workers, wall time: what a user's very first call takes;
- ``first_call_s``: the compiled layer's first forward+backward (tracing and code generation), wall
  time, and ``first_call_cpu_s``: the CPU time it took, the C++ compilers' included (Inductor compiles in
  the process, ``TORCHINDUCTOR_COMPILE_THREADS=1``): on a shared machine the wall time is inflated by other
  jobs, the CPU time much less; ``warm_first_call_s`` / ``_cpu_s``: the same in a second process that
  finds Inductor's cache filled by the first (what every later run of a program sees);
- ``graph_breaks``: Dynamo's graph-break counter after that call (0 means one graph);
- ``dynamic_recompile_s``: the first forward+backward at a second batch size (Dynamo recompiles with a
  symbolic batch), and ``max_relative_difference`` of outputs and weight gradients against eager at
  both batch sizes;
- ``compiled_over_eager``: median compiled forward+backward time over the eager one, from repetitions
  interleaved in one loop (below 1: compiled is faster), wall and process CPU time (``_cpu``: less
  disturbed by other processes on a shared machine). The input needs no gradient (a first layer).

Settings: the paper's UCF11 input layer (57600 = 8x20x20x18 -> 256 = 4x4x4x4, R=4, N=2, batch 16 x 6
frames), a small one (64 = 4x4x4 -> 256 = 4x8x8, R=4, N=2, batch 32) and a BTLSTM (64 -> 256, T=100,
batch 32, its default path), alone (a fixed random gradient on its output sequence) and as a classifier (a linear head on
its last hidden state, as experiments/bt_lstm.py trains it); path ``baseline`` is the torch module BT replaces
(``nn.Linear``, ``nn.LSTM``). ``--ab-runs N`` adds N interleaved A/B runs per row, each in a fresh process:
one run's ratio moves with where the allocator places the step's large buffers (page faults).

    python experiments/bt_compile.py --threads 1   # writes results/bt_compile.json
    python experiments/bt_compile.py --quick    # fewer repetitions
    python experiments/bt_compile.py --settings small --threads 1   # rerun some rows, keeping the others
    python experiments/bt_compile.py --settings "BTLSTM 64 -> 256, T=100" --paths auto --threads 1 --ab-runs 6
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from accel.nn import BTLSTM, BTLinear  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
SETTINGS = {
    # name: in_shape, out_shape, ranks, num_blocks, batch
    "UCF11 input layer": ((8, 20, 20, 18), (4, 4, 4, 4), 4, 2, 16 * 6),
    "small": ((4, 4, 4), (4, 8, 8), 4, 2, 32),
}
RNN_SETTINGS = {  # name: input size, hidden size, batch, sequence length (BTLSTM on its default shapes)
    "BTLSTM 64 -> 256, T=100": (64, 256, 32, 100),
    # the same under a linear head on the last hidden state (experiments/bt_lstm.py's classifier)
    "BTLSTM 64 -> 256, T=100, classifier": (64, 256, 32, 100),
}
CLASSES = 10


class Classifier(nn.Module):
    """An RNN whose last hidden state feeds a linear head, as trained in experiments/bt_lstm.py."""

    def __init__(self, rnn: nn.Module):
        super().__init__()
        self.rnn, self.head = rnn, nn.Linear(rnn.hidden_size, CLASSES)

    def forward(self, x):
        _, (h, _) = self.rnn(x)
        return self.head(h[-1])
# "baseline": the torch module the BT layer replaces (nn.Linear / nn.LSTM), compiled the same way
PATHS = ("auto", "gemm", "dense", "lowrank", "baseline")


def build(setting: str, contraction: str):
    """The module of a row (BT layer on a contraction path, or its torch baseline) and an input batch."""
    torch.manual_seed(0)
    if setting in RNN_SETTINGS:
        input_size, hidden_size, batch, length = RNN_SETTINGS[setting]
        module = (nn.LSTM(input_size, hidden_size, batch_first=True) if contraction == "baseline"
                  else BTLSTM(input_size, hidden_size, batch_first=True))
        module = Classifier(module) if setting.endswith("classifier") else module
        return module, torch.randn(batch, length, input_size)
    in_shape, out_shape, ranks, num_blocks, batch = SETTINGS[setting]
    features = math.prod(in_shape), math.prod(out_shape)
    module = (nn.Linear(*features) if contraction == "baseline" else
              BTLinear(*features, in_shape=in_shape, out_shape=out_shape, ranks=ranks, num_blocks=num_blocks,
                       contraction=contraction))
    return module, torch.randn(batch, features[0])


def eager_path(module, batch: int) -> str:
    module = module.rnn if isinstance(module, Classifier) else module
    layer = module.input_projection if isinstance(module, BTLSTM) else module
    if not isinstance(layer, BTLinear):
        return "torch"
    return layer.method(batch)


@functools.cache
def sequence_gradient(shape: tuple) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(1))


def step(module, x):
    """One forward+backward; returns ((wall, process CPU) seconds, output, weight gradients).

    An RNN's output sequence takes a fixed random gradient, as from a loss on every step (as in
    experiments/bt_recurrence.py); other outputs the gradient of their sum. The sum's gradient of a sequence,
    an expanded scalar, is one a compiled graph first copies into a dense (B, T, H) tangent: with it the
    compiled BTLSTM measured 1.01-1.03x eager (A/B medians), with the fixed random one 1.00."""
    module.zero_grad(set_to_none=True)
    start, cpu = time.perf_counter(), time.process_time()
    y = module(x)
    if isinstance(y, tuple):  # an RNN's (output, state)
        y = y[0]
        y.backward(sequence_gradient(tuple(y.shape)))
    else:
        y.sum().backward()
    return (time.perf_counter() - start, time.process_time() - cpu), y.detach(), [p.grad for p in module.parameters()]


def relative_difference(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def measure(setting: str, contraction: str, repetitions: int, warm_only: bool = False,
            ratio_only: bool = False) -> dict:
    layer, x = build(setting, contraction)
    batch = x.shape[0]
    compiled = torch.compile(layer)
    torch._dynamo.utils.counters.clear()
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    first_call, y_compiled, grads_compiled = step(compiled, x)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    first_call_cpu = first_call[1] + (after.ru_utime + after.ru_stime) - (children.ru_utime + children.ru_stime)
    graph_breaks = sum(torch._dynamo.utils.counters["graph_break"].values())
    if warm_only:
        return {"first_call_s": first_call[0], "first_call_cpu_s": first_call_cpu}
    if ratio_only:  # one more interleaved A/B run (a fresh process): its CPU-time ratio
        return {"compiled_over_eager_cpu": interleaved(layer, compiled, x, repetitions)[1]}
    # a second batch size (an RNN's sequence gets another length too)
    shape = [size // 2 + 1 for size in x.shape[:-1]] + [x.shape[-1]]
    _, y_eager, grads_eager = step(layer, x)
    differences = [relative_difference(y_compiled, y_eager)]
    differences += [relative_difference(a, b) for a, b in zip(grads_compiled, grads_eager)]
    other = torch.randn(shape)  # a second size: Dynamo goes dynamic
    recompile, y_compiled, grads_compiled = step(compiled, other)
    _, y_eager, grads_eager = step(layer, other)
    differences.append(relative_difference(y_compiled, y_eager))
    differences += [relative_difference(a, b) for a, b in zip(grads_compiled, grads_eager)]
    times, _ = interleaved(layer, compiled, x, repetitions)
    repetitions = len(times["eager"])
    medians = {k: statistics.median(wall for wall, _ in v) for k, v in times.items()}
    cpu_medians = {k: statistics.median(cpu for _, cpu in v) for k, v in times.items()}
    return {"setting": setting, "contraction": contraction, "eager_path": eager_path(layer, batch),
            "module": repr(layer), "batch": batch,
            "first_call_s": first_call[0], "first_call_cpu_s": first_call_cpu, "graph_breaks": graph_breaks,
            "dynamic_recompile_s": recompile[0],
            "max_relative_difference": max(differences), "median_s": medians,
            "median_cpu_s": cpu_medians, "compiled_over_eager": medians["compiled"] / medians["eager"],
            "compiled_over_eager_cpu": cpu_medians["compiled"] / cpu_medians["eager"], "repetitions": repetitions,
            "threads": torch.get_num_threads(), "load_average_1min": os.getloadavg()[0]}


def interleaved(layer, compiled, x, repetitions: int):
    """Eager and compiled steps in turn, in ABBA order (load drifts hit both alike, and neither is always the
    step that follows the other): ``({"eager": [(wall, cpu)..], "compiled":
    [..]}, median compiled CPU time / median eager CPU time)``."""
    for _ in range(2):  # warm both
        step(layer, x), step(compiled, x)
    times = {"eager": [], "compiled": []}
    # a millisecond step needs many repetitions to outlast the load spikes of a shared machine: >= 3 s of eager steps
    repetitions = max(repetitions, min(500, int(3.0 / max(step(layer, x)[0][0], 1e-6))))
    for k in range(repetitions):  # ABBA: neither side always runs right after the other
        for name in (("eager", "compiled") if k % 2 == 0 else ("compiled", "eager")):
            times[name].append(step(layer if name == "eager" else compiled, x)[0])
    cpu = {k: statistics.median(cpu for _, cpu in v) for k, v in times.items()}
    return times, cpu["compiled"] / cpu["eager"]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="5 repetitions instead of 11")
    parser.add_argument("--one", nargs=2, metavar=("SETTING", "PATH"), help=argparse.SUPPRESS)
    parser.add_argument("--warm", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--ratio", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--ab-runs", type=int, default=0, metavar="N",
                        help="N more interleaved A/B runs per row, each in a fresh process (warm cache): their "
                             "CPU-time ratios go into the row (ab_runs_compiled_over_eager_cpu) with their median")
    every = list(SETTINGS) + list(RNN_SETTINGS)
    parser.add_argument("--settings", nargs="*", default=every, choices=every)
    parser.add_argument("--paths", nargs="*", default=list(PATHS), choices=PATHS)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch's CPU threads (default: its own); 1 keeps millisecond steps out of thread "
                             "barrier stalls when other jobs share the cores")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    repetitions = 5 if args.quick else 11
    if args.one:
        print(json.dumps(measure(*args.one, repetitions, warm_only=args.warm, ratio_only=args.ratio)))
        return
    RESULTS.mkdir(parents=True, exist_ok=True)
    output = RESULTS / "bt_compile.json"
    # rows of settings and paths not rerun are kept from the previous results
    rows = [row for row in (json.loads(output.read_text())["rows"] if output.exists() else [])
            if row["setting"] not in args.settings or row["contraction"] not in args.paths]
    meta = {"torch": torch.__version__, "cpu_count": os.cpu_count(), "quick": args.quick,
            "note": "2-core machine, possibly shared: see load_average_1min per row"}
    for setting in args.settings:
        # BTLSTM has no contraction option: its projection takes the default path
        for contraction in [p for p in args.paths if setting not in RNN_SETTINGS or p in ("auto", "baseline")]:
            command = [sys.executable, __file__, "--one", setting, contraction] + (["--quick"] if args.quick else [])
            command += ["--threads", str(args.threads)] if args.threads else []
            with tempfile.TemporaryDirectory() as cache:  # a cold Inductor cache: a user's very first call
                # compiling in this process (no worker pool) lets the compilers' CPU time count as children's
                env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache, TORCHINDUCTOR_COMPILE_THREADS="1")
                done = subprocess.run(command, capture_output=True, text=True, check=True, env=env)
                row = json.loads(done.stdout.strip().splitlines()[-1])
                done = subprocess.run(command + ["--warm"], capture_output=True, text=True, check=True, env=env)
                warm = json.loads(done.stdout.strip().splitlines()[-1])  # a later process: the cache is warm
                row["warm_first_call_s"], row["warm_first_call_cpu_s"] = warm["first_call_s"], warm["first_call_cpu_s"]
                ratios = []
                for _ in range(args.ab_runs):  # the ratio of one run moves with the process's heap layout
                    done = subprocess.run(command + ["--ratio"], capture_output=True, text=True, check=True, env=env)
                    ratios.append(json.loads(done.stdout.strip().splitlines()[-1])["compiled_over_eager_cpu"])
                if ratios:
                    row["ab_runs_compiled_over_eager_cpu"] = ratios
                    row["ab_median_compiled_over_eager_cpu"] = statistics.median(ratios)
            with tempfile.TemporaryDirectory() as cache:  # cold again, with Inductor's own compile workers
                env = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_COMPILE_THREADS"}
                done = subprocess.run(command + ["--warm"], capture_output=True, text=True, check=True,
                                      env=dict(env, TORCHINDUCTOR_CACHE_DIR=cache))
                row["default_threads_first_call_s"] = json.loads(done.stdout.strip().splitlines()[-1])["first_call_s"]
            rows.append(row)
            print(f"{setting:18s} {contraction:8s} (eager: {row['eager_path']:6s}) "
                  f"first call {row['first_call_s']:5.1f} s "
                  f"(default compile threads {row['default_threads_first_call_s']:5.1f} s) "
                  f"(CPU {row['first_call_cpu_s']:5.1f} s; warm cache {row['warm_first_call_s']:4.1f} s, CPU "
                  f"{row['warm_first_call_cpu_s']:4.1f} s), "
                  f"breaks {row['graph_breaks']}, dynamic recompile {row['dynamic_recompile_s']:5.1f} s, "
                  f"rel. diff {row['max_relative_difference']:.1e}, compiled/eager {row['compiled_over_eager']:.2f} "
                  f"(CPU time {row['compiled_over_eager_cpu']:.2f}) "
                  f"({row['median_s']['compiled'] * 1e3:.1f} / {row['median_s']['eager'] * 1e3:.1f} ms)"
                  + (f"; A/B runs (CPU) {' '.join(f'{r:.2f}' for r in ratios)}, median "
                     f"{row['ab_median_compiled_over_eager_cpu']:.2f}" if ratios else ""), flush=True)
            output.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))  # after each row: a long run
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
