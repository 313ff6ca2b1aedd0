"""The demo's training loop (see :mod:`accel.demo`), with checkpoints and resume.

Everything that decides the rest of a run is in a checkpoint: the model, ISGD (its control chart
included, through ``state_dict``), the LR scheduler, the data order (the shuffle generator's state at
the start of the epoch, and the next batch), every rank's RNG states, the epoch and step, and the
per-epoch history. So a run resumed from any checkpoint ends with the same parameters, bit for bit
on CPU, as one that was never interrupted.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import signal
import sys
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch import nn

from accel.distributed import checkpoint
from accel.distributed.watchdog import CollectiveWatchdog

NUM_CLASSES = 10
EXIT_STOPPED = 75  # stopped on SIGUSR1 after a checkpoint: run again to resume (EX_TEMPFAIL)
# written next to the checkpoints when SIGUSR1 stopped the run: the batch script's cue to requeue
# (srun's own status may be another rank's, killed by --kill-on-bad-exit after rank 0 exited 75)
STOP_MARKER = "stopped-on-sigusr1"
FAULT_VARIABLE = "ACCEL_DEMO_FAULT"  # test hook: "SIGNAL@STEP[:RANK]", e.g. "KILL@12:1"
SLOW_VARIABLE = "ACCEL_DEMO_SLOW"  # test hook: "SECONDS@FIRST[-LAST][:RANK],...": steps that compute longer
_RESUME_MUST_MATCH = ("epochs", "batch_size", "lr", "hidden_size", "sigma", "seed", "quick", "world_size")


class DemoModel(nn.Module):
    """BT-LSTM encoder -> last hidden state -> out-of-core linear head."""

    def __init__(self, input_size: int, hidden_size: int, *, device: torch.device, memory_limit: int):
        super().__init__()
        from accel.nn import BTLSTM, OutOfCoreLinear

        self.encoder = BTLSTM(input_size, hidden_size, batch_first=True, ranks=8, num_blocks=2, device=device)
        # The head's weight stays in host memory whatever the device; its three matmuls per step run
        # on this rank's device through the out-of-core engine (tile cache included).
        self.head = OutOfCoreLinear(hidden_size, NUM_CLASSES, devices=[str(device)], memory_limit=memory_limit)

    def forward(self, clips: torch.Tensor) -> torch.Tensor:
        _, (hidden, _) = self.encoder(clips)
        return self.head(hidden[-1])


def parameters_sha256(model: nn.Module) -> str:
    """SHA-256 over every entry of ``model.state_dict()``: name, dtype, shape and raw bytes."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def launcher_restarts() -> int:
    """How many times the launcher restarted this job: torchrun's group restarts or SLURM requeues."""
    return sum(int(os.environ.get(name, "0") or 0)
               for name in ("TORCHELASTIC_RESTART_COUNT", "SLURM_RESTART_COUNT"))


def parse_fault(text: str | None) -> tuple[signal.Signals, int, int | None] | None:
    """``"KILL@12:1"`` -> ``(SIGKILL, 12, 1)``: send the signal to itself after global step 12, on rank 1."""
    if not text:
        return None
    try:
        name, _, rest = text.partition("@")
        step, _, rank = rest.partition(":")
        return signal.Signals["SIG" + name.upper().removeprefix("SIG")], int(step), int(rank) if rank else None
    except (KeyError, ValueError):
        raise SystemExit(f"accel demo: {FAULT_VARIABLE}={text!r}: expected SIGNAL@STEP[:RANK], e.g. KILL@12:1") from None


def parse_slow(text: str | None) -> list[tuple[float, int, int, int | None]]:
    """``"3@2-4:1,5@9"`` -> ``[(3.0, 2, 4, 1), (5.0, 9, 9, None)]``: rank 1 spends 3 s more in each of steps
    2 to 4, and every rank 5 s more in step 9."""
    specs = []
    for part in filter(None, (text or "").split(",")):
        try:
            seconds, _, rest = part.partition("@")
            steps, _, rank = rest.partition(":")
            first, _, last = steps.partition("-")
            specs.append((float(seconds), int(first), int(last or first), int(rank) if rank else None))
        except ValueError:
            raise SystemExit(f"accel demo: {SLOW_VARIABLE}={text!r}: expected SECONDS@FIRST[-LAST][:RANK],... e.g. "
                             "3@2-4:1,5@9") from None
    return specs


def _extra_seconds(slow: list[tuple[float, int, int, int | None]], step: int, rank: int) -> float:
    return sum(seconds for seconds, first, last, who in slow if first <= step <= last and who in (None, rank))


class StopRequest:
    """Set by SIGUSR1 (SLURM's warning before a time limit): checkpoint at the next step and stop.

    Install it as early as possible (SIGUSR1's default action ends the process): :func:`accel.demo.run`
    does so before the process group and the data are set up.
    """

    signalled = False

    @classmethod
    def install(cls) -> None:
        if hasattr(signal, "SIGUSR1"):
            signal.signal(signal.SIGUSR1, cls._handle)

    @classmethod
    def _handle(cls, signum, frame) -> None:
        cls.signalled = True


def _say(line: str) -> None:
    print(f"accel demo: {line}", flush=True)


def _shard(count: int, info) -> torch.Tensor:
    return torch.arange(info.rank, count, info.world_size)


def _average_gradients(parameters, group) -> None:
    """Mean of the gradients over the group, for parameters that DDP does not own (the host-side head)."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, group=group)
    flat /= dist.get_world_size(group)
    offset = 0
    for grad in grads:
        grad.copy_(flat[offset:offset + grad.numel()].view_as(grad))
        offset += grad.numel()


@torch.no_grad()
def _accuracy(model: nn.Module, split, indices: torch.Tensor, device, batch_size: int, info) -> float:
    model.eval()
    # on the group's device: nccl reduces only CUDA tensors
    correct = torch.zeros(2, dtype=torch.float64, device=device)
    for start in range(0, len(indices), batch_size):
        idx = indices[start:start + batch_size]
        logits = model(split.inputs[idx].to(device))
        correct[0] += (logits.argmax(1) == split.labels[idx].to(device)).sum()
        correct[1] += len(idx)
    if info.world_size > 1:
        dist.all_reduce(correct)
    model.train()
    return float(correct[0] / correct[1])


class _Run:
    """One attempt at the run: the model, optimizer and data, and where in the run it stands."""

    def __init__(self, args: argparse.Namespace, info, device: torch.device):
        from accel.demo.datasets import moving_digits
        from accel.optim import ISGD

        self.args, self.info, self.device = args, info, device
        self.epochs = args.epochs if args.epochs is not None else (3 if args.quick else 12)
        self.per_rank_batch = args.batch_size // info.world_size
        torch.manual_seed(args.seed)  # identical initial weights on every rank
        self.train, self.test = moving_digits(sequences_per_image=1 if args.quick else 2, seed=args.seed)
        self.model = DemoModel(self.train.inputs.shape[-1], args.hidden_size, device=device, memory_limit=64 << 20)
        self.train_indices = _shard(len(self.train), info)
        self.batches_per_epoch = -(-len(self.train_indices) // self.per_rank_batch)
        # the paper's window: one epoch of batch losses
        self.optimizer = ISGD(self.model.parameters(), lr=args.lr, momentum=0.9, sigma=args.sigma,
                              window=self.batches_per_epoch, max_chase=3, history=info.rank == 0)
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, T_max=self.epochs)
        self.generator = torch.Generator().manual_seed(args.seed)  # the same shuffle on every rank
        self.directory = args.out / "checkpoints"
        self.config = {name: getattr(args, name, None) for name in _RESUME_MUST_MATCH}
        self.config.update(epochs=self.epochs, world_size=info.world_size)
        # where the run stands: the next (epoch, batch), finished epochs, this epoch's losses so far
        self.epoch, self.batch, self.history, self.losses = 1, 0, [], []
        self.elapsed_before, self.resumed_from, self.saved = 0.0, [], 0
        self.epoch_generator_state = self.generator.get_state()

    @property
    def global_step(self) -> int:
        return (self.epoch - 1) * self.batches_per_epoch + self.batch

    # ------------------------------------------------------------------------------ checkpoints

    def _rng_states(self) -> dict:
        states = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            states["cuda"] = torch.cuda.get_rng_state(self.device)
        return states

    def save(self, elapsed: float) -> None:
        """Every rank joins (their RNG states are gathered); rank 0 writes the file."""
        rng = [self._rng_states()]
        if self.info.world_size > 1:
            rng = [None] * self.info.world_size
            dist.all_gather_object(rng, self._rng_states())
        if self.info.rank == 0:
            state = {"config": self.config, "epoch": self.epoch, "batch": self.batch,
                     "history": self.history, "losses": self.losses, "elapsed": elapsed,
                     "resumed_from": self.resumed_from, "rng": rng,
                     "generator": self.epoch_generator_state, "model": self.model.state_dict(),
                     "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}
            checkpoint.save(self.directory, state, epoch=self.epoch, step=self.global_step,
                            keep=self.args.keep_checkpoints, say=_say)
        if self.info.world_size > 1:
            dist.barrier()  # nobody exits (on SIGUSR1) while rank 0 is still writing
        self.saved += 1

    def resume(self) -> None:
        """Rank 0 finds the newest valid checkpoint and broadcasts it; every rank restores it."""
        found = None
        if self.info.rank == 0:
            found = checkpoint.recover(self.directory, say=_say)
            found = None if found is None else (found[0].name, found[1])
        if self.info.world_size > 1:
            box = [found]
            dist.broadcast_object_list(box, src=0)
            found = box[0]
        if found is None:
            return
        name, state = found
        mismatched = [f"--{key.replace('_', '-')} {state['config'].get(key)} (this run: {value})"
                      for key, value in self.config.items() if state["config"].get(key) != value]
        if mismatched:
            raise SystemExit(f"accel demo: checkpoint {self.directory / name} belongs to a different run: "
                             f"{', '.join(mismatched)}. Use the same options to resume, or --no-resume to start over")
        self.model.load_state_dict(state["model"])
        optimizer_state = state["optimizer"]
        if self.info.rank != 0:  # only rank 0 keeps the per-step history (for the control chart)
            optimizer_state["chase"]["history"] = None
        self.optimizer.load_state_dict(optimizer_state)
        self.scheduler.load_state_dict(state["scheduler"])
        self.generator.set_state(state["generator"])
        self.epoch_generator_state = state["generator"]
        rng = state["rng"][self.info.rank]
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and self.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], self.device)
        self.epoch, self.batch = state["epoch"], state["batch"]
        self.history, self.losses = state["history"], state["losses"]
        self.elapsed_before = state["elapsed"]
        self.resumed_from = state["resumed_from"] + [name]
        if self.info.rank == 0:
            print(f"accel demo: resumed from {self.directory / name} (epoch {self.epoch}, step {self.global_step})",
                  flush=True)


def train(args: argparse.Namespace, info, device: torch.device,
          watchdog: CollectiveWatchdog | None = None) -> tuple[dict, _Run]:
    """Train (resuming when a checkpoint is there and ``--no-resume`` is not given); the report and the run.

    ``watchdog`` (running around the call) is told which collective each phase waits in, for its message.

    Raises SystemExit(:data:`EXIT_STOPPED`) after a checkpoint when SIGUSR1 asked to stop.
    """
    from tqdm import tqdm

    run = _Run(args, info, device)
    restarts = launcher_restarts()
    if info.rank == 0:
        (run.directory / STOP_MARKER).unlink(missing_ok=True)
    if args.no_resume and restarts == 0:
        if info.rank == 0:
            removed = checkpoint.remove_all(run.directory)
            if removed:
                print(f"accel demo: --no-resume: removed {removed} checkpoint(s) from {run.directory}", flush=True)
    else:  # a launcher's restart always resumes: --no-resume meant the first start
        run.resume()
    model, info = run.model, run.info
    encoder, head_group = model.encoder, None
    if info.world_size > 1:
        encoder = nn.parallel.DistributedDataParallel(
            model.encoder, device_ids=[device.index] if device.type == "cuda" else None)
        # the head's parameters live in host memory: average them over a gloo group even under nccl
        head_group = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else dist.group.WORLD
    fault = parse_fault(os.environ.get(FAULT_VARIABLE)) if not run.resumed_from and restarts == 0 else None
    StopRequest.install()
    loss_fn = nn.CrossEntropyLoss()
    waiting = watchdog.waiting if watchdog is not None else (lambda description: nullcontext())
    slow = parse_slow(os.environ.get(SLOW_VARIABLE))
    start = time.perf_counter()

    while run.epoch <= run.epochs:
        epoch = run.epoch
        run.generator.set_state(run.epoch_generator_state)
        order = run.train_indices[torch.randperm(len(run.train_indices), generator=run.generator)]
        bar = tqdm(range(run.batch, run.batches_per_epoch), desc=f"epoch {epoch}/{run.epochs}",
                   disable=info.rank != 0, file=sys.stdout, dynamic_ncols=True,
                   initial=run.batch, total=run.batches_per_epoch,
                   mininterval=0.1 if sys.stdout.isatty() else 5.0)
        for b in bar:
            idx = order[b * run.per_rank_batch:(b + 1) * run.per_rank_batch]
            clips, labels = run.train.inputs[idx].to(device), run.train.labels[idx].to(device)

            def closure(clips=clips, labels=labels):
                run.optimizer.zero_grad()
                with waiting(f"step {run.global_step + 1}: forward/backward with DDP's gradient all-reduce"):
                    if slow:
                        time.sleep(_extra_seconds(slow, run.global_step + 1, info.rank))  # test hook
                    _, (hidden, _) = encoder(clips)
                    loss = loss_fn(model.head(hidden[-1]), labels)
                    loss.backward()
                if head_group is not None:
                    with waiting(f"step {run.global_step + 1}: the head's gradient all-reduce"):
                        _average_gradients(model.head.parameters(), head_group)
                return loss

            with waiting(f"step {run.global_step + 1}: ISGD's loss all-reduce"):
                loss = run.optimizer.step(closure)
                run.losses.append(loss.item())
            run.batch = b + 1
            bar.set_postfix(loss=f"{run.losses[-1]:.3f}", chased=run.optimizer.stats["chased_batches"],
                            refresh=False)
            if fault is not None and fault[1] == run.global_step and fault[2] in (None, info.rank):
                os.kill(os.getpid(), fault[0])
            with waiting(f"step {run.global_step}: the stop-request all-reduce"):
                stopping = _agree(StopRequest.signalled, info, device)
            if stopping or (args.checkpoint_every and run.global_step % args.checkpoint_every == 0
                            and run.batch < run.batches_per_epoch):
                with waiting(f"the checkpoint after step {run.global_step}"):
                    run.save(run.elapsed_before + time.perf_counter() - start)
            if stopping:
                if info.rank == 0:
                    (run.directory / STOP_MARKER).write_text(f"step {run.global_step}\n")
                    print(f"\naccel demo: stopped on SIGUSR1 after step {run.global_step}; checkpoint saved in "
                          f"{run.directory}. Run the same command again to resume.", flush=True)
                raise SystemExit(EXIT_STOPPED)
        bar.close()
        run.scheduler.step()
        with waiting(f"the evaluation all-reduce of epoch {epoch}"):
            accuracy = _accuracy(model, run.test, _shard(len(run.test), info), device, 256, info)
        run.history.append({"epoch": epoch, "train_loss": sum(run.losses) / len(run.losses),
                            "test_accuracy": accuracy,
                            "seconds": run.elapsed_before + time.perf_counter() - start})
        if info.rank == 0:
            print(f"epoch {epoch}: train loss {run.history[-1]['train_loss']:.3f}, "
                  f"test accuracy {100 * accuracy:.1f}%", flush=True)
        run.epoch, run.batch, run.losses = epoch + 1, 0, []
        run.epoch_generator_state = run.generator.get_state()
        with waiting(f"the checkpoint after epoch {epoch}"):
            run.save(run.elapsed_before + time.perf_counter() - start)
    return _report(run, device, time.perf_counter() - start, restarts), run


def _agree(flag: bool, info, device: torch.device) -> bool:
    """True on every rank when any rank's ``flag`` is set (one tiny all-reduce on the group's device)."""
    if info.world_size == 1:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def _report(run: _Run, device: torch.device, seconds: float, restarts: int) -> dict:
    bt = run.model.encoder.input_projection
    info = run.info
    return {
        "launcher": info.launcher, "world_size": info.world_size, "backend": info.backend,
        "device": str(device), "epochs": run.epochs, "global_batch_size": run.per_rank_batch * info.world_size,
        "train_sequences": len(run.train), "test_sequences": len(run.test),
        "features_per_frame": run.train.inputs.shape[-1],
        "test_accuracy": run.history[-1]["test_accuracy"], "chance_accuracy": 1 / NUM_CLASSES,
        "history": run.history, "wall_seconds": seconds,
        "params_sha256": parameters_sha256(run.model),
        "resumes": len(run.resumed_from), "resumed_from": run.resumed_from, "launcher_restarts": restarts,
        "checkpoints": {"directory": str(run.directory), "saved_by_this_attempt": run.saved,
                        "every_steps": run.args.checkpoint_every, "kept": run.args.keep_checkpoints},
        "isgd": dict(run.optimizer.stats.items()),
        "out_of_core": run.model.head.engine.totals.as_dict(),  # this attempt's GEMMs
        "block_term": {"parameters": bt.num_weight_parameters, "dense_parameters": bt.in_features * bt.out_features,
                       "compression_ratio": bt.compression_ratio},
    }
