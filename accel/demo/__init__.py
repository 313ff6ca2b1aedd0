"""``python -m accel demo``: one model trained with all three techniques under whatever launcher ran it.

A sequence classifier on :func:`accel.demo.datasets.moving_digits` (1,600 inputs per frame):

* a :class:`accel.nn.BTLSTM` encoder, whose input-to-hidden weight is a Block-Term tensor;
* an :class:`accel.nn.OutOfCoreLinear` head, whose weight lives in host memory and whose matmuls run
  through the out-of-core GEMM engine;
* :class:`accel.ISGD` with a cosine LR schedule, data-parallel over every process
  :func:`accel.distributed.init` finds (torchrun, SLURM, mpirun, or ``--nproc N`` which relaunches
  itself through torchrun, with ``--max-restarts K`` elastic restarts).

It checkpoints every epoch and every ``--checkpoint-every`` steps under ``<out>/checkpoints/`` and,
started again with the same ``--out``, resumes from the newest valid checkpoint (the training loop is
in ``accel/demo/_train.py``). SIGUSR1 (SLURM's warning before a time limit) makes it checkpoint and exit
with status 75. It writes ``report.json``, ``control_chart.png`` and ``accuracy.png`` to ``--out``.

With ``--nproc N`` the process you started is a launcher: SIGTERM, SIGINT or SIGHUP sent to it is passed
on to torchrun, which stops the workers; and if the launcher dies without passing it on (SIGKILL), the
kernel signals torchrun (and torchrun's death the workers), so no process of the run outlives it.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
from contextlib import nullcontext
from datetime import timedelta
from pathlib import Path

import torch

from accel import distributed
from accel._optional import require
from accel.demo._train import EXIT_STOPPED, FAULT_VARIABLE, NUM_CLASSES, SLOW_VARIABLE, STOP_MARKER, StopRequest, train
from accel.demo.datasets import require_digits
from accel.distributed.watchdog import EXIT_STALLED, CollectiveWatchdog

__all__ = ["add_arguments", "run", "EXIT_STOPPED", "EXIT_STALLED", "FAULT_VARIABLE", "SLOW_VARIABLE", "STOP_MARKER"]

DEFAULT_TIMEOUT_SECONDS = 60.0
# The process group's own timeout: the backstop for a peer that is alive (its heartbeat goes on) but never
# reaches a collective. Generous, since a live peer may legitimately compute or write for long.
_GROUP_TIMEOUT = timedelta(minutes=10)
# Set by the --nproc launcher for its workers: the launcher's PID (see _die_with_parent).
_LAUNCHER_VARIABLE = "ACCEL_DEMO_LAUNCHER_PID"
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
_FORWARDED_SIGNALS = ("SIGTERM", "SIGINT", "SIGHUP")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--nproc", type=int, default=1,
                        help="processes to train on; > 1 relaunches through torchrun (default: 1, or the "
                             "processes a launcher such as srun or mpiexec started)")
    parser.add_argument("--epochs", type=int, default=None, help="epochs (default: 12, or 3 with --quick)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None,
                        help="default: cuda when a GPU is visible, else cpu")
    parser.add_argument("--out", type=Path, default=Path("runs/demo"),
                        help="directory for the report, plots and checkpoints")
    parser.add_argument("--quick", action="store_true", help="a small, fast run (for tests and a first look)")
    parser.add_argument("--batch-size", type=int, default=64, help="global batch size (default: 64)")
    parser.add_argument("--lr", type=float, default=0.1, help="peak learning rate (default: 0.1)")
    parser.add_argument("--hidden-size", type=int, default=64, help="LSTM hidden size (default: 64)")
    parser.add_argument("--sigma", type=float, default=3.0,
                        help="ISGD control limit in standard deviations (default: 3.0, the paper's)")
    parser.add_argument("--seed", type=int, default=0, help="seed for data and initialisation (default: 0)")
    parser.add_argument("--checkpoint-every", type=int, default=20, metavar="N",
                        help="also checkpoint every N steps, not only at each epoch's end; 0: epochs only "
                             "(default: 20)")
    parser.add_argument("--keep-checkpoints", type=int, default=3, metavar="K",
                        help="checkpoints kept in <out>/checkpoints, newest first (default: 3)")
    parser.add_argument("--no-resume", action="store_true",
                        help="start over, deleting the checkpoints in <out>/checkpoints (default: resume from "
                             "the newest valid one); a launcher's restart of this run still resumes")
    parser.add_argument("--max-restarts", type=int, default=0, metavar="K",
                        help="with --nproc N: torchrun restarts the whole group up to K times after a worker "
                             "fails, and it resumes from the last checkpoint (default: 0)")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_SECONDS, metavar="SECONDS",
                        help="with several processes: a rank whose peer sends no heartbeat for this long (a process "
                             "stopped, hung or lost with its node) exits, naming the collective it waits in; how "
                             f"long a step computes never counts (default: {DEFAULT_TIMEOUT_SECONDS:g})")


def _validate(args: argparse.Namespace) -> None:
    """One-line errors (no traceback) for values that would fail, or silently mislead, later."""
    def fail(message: str) -> None:
        raise SystemExit(f"accel demo: error: {message}")

    cores = os.cpu_count() or 1
    checks = [
        (args.nproc >= 1, f"--nproc must be >= 1, got {args.nproc}"),
        (args.nproc <= 8 * cores, f"--nproc {args.nproc} is more than 8 processes per CPU core ({cores} cores)"),
        (args.epochs is None or args.epochs >= 1, f"--epochs must be >= 1, got {args.epochs}"),
        (args.batch_size >= 1, f"--batch-size must be >= 1, got {args.batch_size}"),
        (math.isfinite(args.lr) and args.lr > 0, f"--lr must be a positive number, got {args.lr}"),
        (args.hidden_size >= 1, f"--hidden-size must be >= 1, got {args.hidden_size}"),
        (math.isfinite(args.sigma) and args.sigma > 0, f"--sigma must be a positive number, got {args.sigma}"),
        (args.seed >= 0, f"--seed must be >= 0, got {args.seed}"),
        (args.checkpoint_every >= 0, f"--checkpoint-every must be >= 0 (0: at epoch ends only), "
                                     f"got {args.checkpoint_every}"),
        (args.keep_checkpoints >= 1, f"--keep-checkpoints must be >= 1, got {args.keep_checkpoints}"),
        (args.max_restarts >= 0, f"--max-restarts must be >= 0, got {args.max_restarts}"),
        (math.isfinite(args.timeout) and args.timeout > 0, f"--timeout must be a positive number of seconds, "
                                                           f"got {args.timeout}"),
    ]
    for ok, message in checks:
        if not ok:
            fail(message)
    require("matplotlib", extra="demo", feature="accel demo (its plots)")
    require_digits()
    if args.device == "cuda" and not torch.cuda.is_available():
        fail("--device cuda asked for, but torch sees no CUDA GPU")
    try:
        launch = distributed.detect()
    except distributed.LaunchError as error:
        fail(str(error))
    if args.max_restarts and not (args.nproc > 1 and launch.launcher == "single"):
        fail("--max-restarts needs --nproc N > 1 (torchrun restarts the group); under srun or sbatch use "
             "slurm/demo.sbatch, which requeues the job")
    world_size = args.nproc if launch.launcher == "single" else launch.world_size
    if args.batch_size % world_size:
        fail(f"--batch-size {args.batch_size} does not split evenly over {world_size} processes")
    _check_writable(args.out, fail)


def _check_writable(out: Path, fail) -> None:
    """Create ``out`` and prove it writable now, not after the whole run."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-"):
            pass
    except OSError as error:
        fail(f"--out {out}: cannot write there ({error.strerror or error})")


def _prctl_pdeathsig():
    """libc's ``prctl`` set up for ``PR_SET_PDEATHSIG``, or ``None`` off Linux."""
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    return prctl


def _parent_of(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return int(stat.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def _die_with_parent() -> None:
    """In a worker the --nproc launcher started through torchrun: end with torchrun.

    torchrun starts each worker in a session of its own, so a signal to the launcher's process group never
    reaches them, and if torchrun is killed outright it cannot stop them. The kernel's parent-death signal
    does; and a worker whose torchrun (or launcher) is already gone by now exits at once.
    """
    launcher = os.environ.get(_LAUNCHER_VARIABLE)
    prctl = _prctl_pdeathsig()
    if launcher is None or prctl is None:
        return
    if prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        return  # not fatal: the launcher's forwarding still stops the run
    if _parent_of(os.getppid()) != int(launcher):
        raise SystemExit("accel demo: the launcher of this worker is gone; exiting")


def _relaunch_through_torchrun(args: argparse.Namespace) -> int:
    """Start ``args.nproc`` copies of this demo under torchrun and wait for them.

    torchrun runs in a process group of its own (a terminal's Ctrl-C reaches it once, through this
    process) with the parent-death signal set, so it stops its workers even when this process is killed.
    """
    forwarded = ["--out", str(args.out), "--batch-size", str(args.batch_size), "--lr", str(args.lr),
                 "--hidden-size", str(args.hidden_size), "--sigma", str(args.sigma), "--seed", str(args.seed),
                 "--checkpoint-every", str(args.checkpoint_every), "--keep-checkpoints", str(args.keep_checkpoints),
                 "--timeout", str(args.timeout)]
    forwarded += ["--epochs", str(args.epochs)] if args.epochs is not None else []
    forwarded += ["--device", args.device] if args.device is not None else []
    forwarded += ["--quick"] if args.quick else []
    forwarded += ["--no-resume"] if args.no_resume else []  # restarted workers resume regardless
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
               f"--max-restarts={args.max_restarts}", "-m", "accel", "demo", *forwarded]
    print("launching:", " ".join(command), flush=True)
    prctl = _prctl_pdeathsig()

    def in_child() -> None:  # between fork and exec: only async-signal-safe work (prctl was looked up before)
        if prctl is not None:
            prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)

    torchrun = subprocess.Popen(command, env={**os.environ, _LAUNCHER_VARIABLE: str(os.getpid())},
                                process_group=0, preexec_fn=in_child)
    received: list[int] = []

    def forward(signum, frame) -> None:
        received.append(signum)
        if torchrun.poll() is None:
            torchrun.send_signal(signum)

    handled = [getattr(signal, name) for name in _FORWARDED_SIGNALS if hasattr(signal, name)]
    previous = {number: signal.signal(number, forward) for number in handled}
    try:
        status = torchrun.wait()
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
    if received:
        print(f"accel demo: {signal.Signals(received[0]).name} passed on to torchrun, which stopped the workers",
              file=sys.stderr, flush=True)
        return 128 + received[0]
    return status


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
        f"over {ooc['calls']} GEMMs, tile-cache hit rate {100 * ooc['cache_hit_rate']:.0f}%"
        + (" (this attempt only: counters are not checkpointed)" if report["resumes"] or report["launcher_restarts"]
           else ""),
        f"  parameters sha256  {report['params_sha256'][:16]}...; resumed {report['resumes']} time(s), "
        f"launcher restarts {report['launcher_restarts']}; checkpoints in {out / 'checkpoints'}",
        f"  wrote {out / 'report.json'}, {out / 'control_chart.png'}, {out / 'accuracy.png'}",
    ]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    _validate(args)
    if args.nproc > 1 and distributed.detect().launcher == "single":
        return _relaunch_through_torchrun(args)
    StopRequest.install()  # early: SIGUSR1's default action would end the process
    _die_with_parent()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    # --device cpu on a GPU machine: gloo and no GPU bound, since nccl cannot reduce host tensors
    timeout = max(_GROUP_TIMEOUT, timedelta(seconds=2 * args.timeout))
    try:
        info = distributed.init(backend="gloo" if args.device == "cpu" else None, timeout=timeout,
                                device=args.device)
    except (distributed.LaunchError, ValueError) as error:
        raise SystemExit(f"accel demo: error: {error}") from None
    with info:
        if info.rank == 0:
            print(f"accel demo: rank 0 of {info.world_size} ({info.launcher}, {info.backend or 'no process group'})",
                  flush=True)
        # started right after the group: every rank beats from the same moment, before data and model
        watchdog = (CollectiveWatchdog(args.timeout, rank=info.rank, world_size=info.world_size, store=info.store)
                    if info.world_size > 1 and info.store is not None else None)
        with watchdog or nullcontext():
            # init() bound this rank's GPU, or the CPU asked for
            report, state = train(args, info, info.device, watchdog)
        if info.rank == 0:
            from accel.optim import plot_control_chart

            (args.out / "report.json").write_text(json.dumps(report, indent=2, default=float))
            plot_control_chart(state.optimizer.history, args.out / "control_chart.png")
            _plot_accuracy(report["history"], args.out / "accuracy.png")
            print(_summary(report, args.out), flush=True)
    return 0
