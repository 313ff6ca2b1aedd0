"""``python -m accel <command>``: ``info``, ``check``, ``demo`` (the training job in :mod:`accel.demo`) and ``gpucheck``.

Each command is a :class:`Command`: a help line, a function that adds its arguments to an
``argparse`` parser, and a function that runs it and returns the exit status.
"""
from __future__ import annotations

import argparse
import copy
import importlib.metadata
import os
import platform
import shutil
import socket
import sys
from datetime import timedelta
from typing import Callable, NamedTuple

import torch
import torch.distributed as dist

from accel import __version__, demo, distributed, gpucheck
from accel._optional import MissingDependency


class Command(NamedTuple):
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


# ------------------------------------------------------------------------------------- info

_PACKAGES = ("numpy", "tensorly", "opt_einsum", "mpi4py", "mpich", "cupy-cuda13x", "cupy-cuda12x", "triton",
             "matplotlib", "lightning", "accelerate")
_EXECUTABLES = ("torchrun", "srun", "sbatch", "mpiexec", "mpirun")


def _no_arguments(parser: argparse.ArgumentParser) -> None:
    pass


def _package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _device_lines() -> list[str]:
    if torch.cuda.is_available():
        lines = [f"CUDA {torch.version.cuda}, {torch.cuda.device_count()} GPU(s):"]
        for index in range(torch.cuda.device_count()):
            properties = torch.cuda.get_device_properties(index)
            lines.append(f"  cuda:{index}  {properties.name}  {properties.total_memory / 2**30:.1f} GiB")
        return lines
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return [f"no CUDA GPU; CPU: {os.cpu_count()} cores ({usable} usable by this process), "
            f"torch uses {torch.get_num_threads()} threads"]


def _detection_lines() -> list[str]:
    try:
        launch = distributed.detect()
    except distributed.LaunchError as error:
        return [f"init() would fail: {error}"]
    lines = [f"launcher {launch.launcher}: rank {launch.rank} of {launch.world_size}, "
             f"local rank {launch.local_rank} of {launch.local_world_size}"]
    if launch.variables:
        lines.append("  from " + " ".join(f"{name}={value}" for name, value in launch.variables))
    if launch.world_size > 1:
        endpoint = (f"{launch.master_addr}:{launch.master_port}" if launch.master_port is not None
                    else "rank 0's host and a free port, broadcast with mpi4py")
        lines.append(f"  rendezvous at {endpoint}")
    cuda = torch.cuda.is_available()
    try:
        backend = distributed.choose_backend(None, cuda) if launch.world_size > 1 else "none (one process)"
        device = f"cuda:{distributed.cuda_device_index(launch, torch.cuda.device_count())}" if cuda else "cpu"
    except (distributed.LaunchError, ValueError) as error:
        return lines + [f"init() would fail: {error}"]
    lines.append(f"  backend {backend}, device {device}")
    return lines


def _kernel_line() -> str:
    from accel.nn.recurrence import kernel_status
    status = kernel_status()
    return f"cpu lstm kernel: {'in use (' + status.reason + ')' if status.in_use else 'not in use: ' + status.reason}"


def run_info(args: argparse.Namespace) -> int:
    """Print versions, devices, available launchers and backends, and what init() would detect."""
    sections = {
        "versions": [f"accel {__version__}, python {platform.python_version()}, torch {torch.__version__}"
                     + (f" (CUDA {torch.version.cuda})" if torch.version.cuda else " (CPU build)"),
                     ", ".join(f"{name} {_package_version(name)}" for name in _PACKAGES)],
        "devices": _device_lines(),
        "torch.distributed backends": [", ".join(
            f"{name} {'yes' if name in distributed.available_backends() else 'no'}"
            for name in ("gloo", "nccl", "mpi"))],
        "launchers": [", ".join(f"{name} {shutil.which(name) or 'not found'}" for name in _EXECUTABLES)],
        "this process (accel.distributed.detect)": _detection_lines(),
        "kernels": [_kernel_line()],
    }
    print(f"host {socket.gethostname()}")
    for title, lines in sections.items():
        print(f"{title}:")
        for line in lines:
            print(f"  {line}")
    return 0


# ------------------------------------------------------------------------------------ check

def _check_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backend", default=None,
                        help="torch.distributed backend (default: nccl with CUDA, else gloo)")
    parser.add_argument("--timeout", type=float, default=120.0,
                        help="seconds to wait for the other ranks before failing (default: 120)")


def replica_difference(module: torch.nn.Module) -> float:
    """Largest absolute difference between this rank's parameters and any other rank's (0 if identical)."""
    flat = torch.cat([parameter.detach().reshape(-1) for parameter in module.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    return max((other - flat).abs().max().item() for other in gathered)


def _ddp_step(device: torch.device, rank: int, learning_rate: float = 0.1) -> tuple[float, float]:
    """One DDP step on a tiny model, against the same step taken by hand on the whole global batch.

    Returns ``(largest difference from the reference, largest difference between replicas)``.
    """
    torch.manual_seed(rank)  # a different start on every rank: DDP must broadcast rank 0's weights
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1)).to(device)
    ddp = torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None)
    reference = copy.deepcopy(model)  # rank 0's weights, now on every rank

    generator = torch.Generator().manual_seed(1000 + rank)  # each rank its own shard of the batch
    inputs = torch.randn(4, 8, generator=generator).to(device)
    targets = torch.randn(4, 1, generator=generator).to(device)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=learning_rate)
    torch.nn.functional.mse_loss(ddp(inputs), targets).backward()
    optimizer.step()

    # Averaging the shard gradients equals the gradient of the mean loss over the whole batch.
    all_inputs = [torch.empty_like(inputs) for _ in range(dist.get_world_size())]
    all_targets = [torch.empty_like(targets) for _ in range(dist.get_world_size())]
    dist.all_gather(all_inputs, inputs)
    dist.all_gather(all_targets, targets)
    torch.nn.functional.mse_loss(reference(torch.cat(all_inputs)), torch.cat(all_targets)).backward()
    with torch.no_grad():
        for parameter in reference.parameters():
            parameter -= learning_rate * parameter.grad
        reference_difference = max((mine - theirs).abs().max().item()
                                   for mine, theirs in zip(model.parameters(), reference.parameters()))
    return reference_difference, replica_difference(model)


def _say(line: str) -> None:
    # One write per line: ranks share the launcher's pipe, and print() writes the newline
    # separately, so with unbuffered output two ranks' lines could interleave.
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def run_check(args: argparse.Namespace) -> int:
    """Launcher self-check: init(), an all_reduce, one DDP step; one line per rank; 0 if all agree."""
    info = distributed.init(backend=args.backend, timeout=timedelta(seconds=args.timeout))
    own_group = not dist.is_initialized()
    agreed = False
    if own_group:  # one process: init() made no group, but DDP needs one, so make a private one
        dist.init_process_group(distributed.choose_backend(args.backend, torch.cuda.is_available()),
                                store=dist.HashStore(), rank=0, world_size=1)
    try:
        total = torch.tensor([float(info.rank + 1)], device=info.device)
        dist.all_reduce(total)
        expected = info.world_size * (info.world_size + 1) / 2
        reference_difference, replica_diff = _ddp_step(info.device, info.rank)
        ok = total.item() == expected and reference_difference < 1e-5 and replica_diff == 0.0
        everyone = torch.tensor([1.0 if ok else 0.0], device=info.device)
        dist.all_reduce(everyone, op=dist.ReduceOp.MIN)  # every rank exits with the same status
        agreed = True  # every rank got here: shutdown meets at a barrier before tearing down
        _say(f"rank {info.rank}/{info.world_size} local {info.local_rank}/{info.local_world_size} "
              f"on {socket.gethostname()}: launcher {info.launcher}, backend {dist.get_backend()}, "
              f"device {info.device}; all_reduce {total.item():g} (expected {expected:g}); "
              f"DDP step vs full-batch reference: max diff {reference_difference:.1e}; "
              f"replicas identical: {'yes' if replica_diff == 0.0 else f'no (max diff {replica_diff:.1e})'}; "
              f"{'ok' if ok else 'FAILED'}")
        passed = everyone.item() == 1.0
        if info.is_main:
            _say(f"check {'passed' if passed else 'FAILED'} on {info.world_size} process(es)")
        return 0 if passed else 1
    finally:
        if own_group:
            dist.destroy_process_group()
        distributed.shutdown(synchronize=agreed)


# -------------------------------------------------------------------------------------- main

COMMANDS: dict[str, Command] = {
    "info": Command("print versions, devices, launchers and backends, and what init() would detect",
                    _no_arguments, run_info),
    "check": Command("launcher self-check: init(), an all_reduce and one DDP step on every rank",
                     _check_arguments, run_check),
    "demo": Command("train a BT-LSTM + out-of-core head with ISGD, data-parallel under any launcher",
                    demo.add_arguments, demo.run),
    "gpucheck": Command("measure every GPU path in parts with time budgets (a dry run without a GPU)",
                        gpucheck.add_arguments, gpucheck.run),
    # "bench": a later command; the same three parts plug in here.
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m accel", description="accel: faster multi-GPU training.")
    parser.add_argument("--version", action="version", version=f"accel {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, command in COMMANDS.items():
        subparser = subparsers.add_parser(name, help=command.help, description=command.help)
        command.add_arguments(subparser)
        subparser.set_defaults(run=command.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``), run the command, return its exit status."""
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return args.run(args)
    except MissingDependency as error:  # one line naming the extra to install, no traceback
        print(f"accel {args.command}: {error}", file=sys.stderr, flush=True)
        return 2
