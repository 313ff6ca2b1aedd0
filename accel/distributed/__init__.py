"""Launch anywhere: detect how this process was started and set up ``torch.distributed``.

One call works under ``torchrun``, SLURM (``srun`` / ``sbatch``), MPI (``mpirun`` / ``mpiexec``) or a
plain ``python train.py``::

    import accel

    with accel.distributed.init() as info:      # torch.distributed is ready (unless world size 1)
        model = model.to(info.device)
        if info.world_size > 1:
            model = torch.nn.parallel.DistributedDataParallel(model)
        ...                                      # the process group is destroyed on exit

This package is the launcher layer: everything after :func:`init` is plain ``torch.distributed``.
:func:`detect` reads the environment without side effects; :func:`init` validates it, picks the
backend and device, and joins the process group. A bad environment raises :class:`LaunchError`
naming the variable and its value before any network wait, rather than hanging.

Submodules: :mod:`accel.distributed.launchers` (reading the launch environment),
:mod:`accel.distributed.checkpoint` (atomic, verified checkpoints) and :mod:`accel.distributed.watchdog`
(ending a rank whose peer stopped responding).
"""
from __future__ import annotations

import atexit
import gc
import os
import socket
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from accel._optional import require
from accel.distributed.launchers import Launch, LaunchError, detect, expand_hostlist, expand_tasks_per_node, slurm_port

__all__ = ["DistInfo", "Launch", "LaunchError", "detect", "init", "shutdown", "is_initialized",
           "get_info", "available_backends", "choose_backend", "cuda_device_index",
           "expand_hostlist", "expand_tasks_per_node", "slurm_port"]

DEFAULT_TIMEOUT = timedelta(minutes=5)


@dataclass(frozen=True)
class DistInfo:
    """The result of :func:`init`; use it as a context manager to :func:`shutdown` on exit.

    Attributes:
        rank, world_size, local_rank, local_world_size: as in :class:`Launch`.
        launcher: how the processes were started (see :class:`Launch`).
        backend: the ``torch.distributed`` backend, or ``None`` for a single process without a group.
        device: where this rank's tensors belong (``cuda:<i>`` or ``cpu``).
        store: the key-value store the process group rendezvoused through (every rank reaches it), or
            ``None`` with one process or a group made elsewhere; :class:`~accel.distributed.watchdog.CollectiveWatchdog`
            sends its heartbeats through it.
    """

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    launcher: str
    backend: str | None
    device: torch.device
    store: dist.Store | None = field(default=None, repr=False, compare=False)

    @property
    def is_main(self) -> bool:
        """True on global rank 0 (the process that should log and save)."""
        return self.rank == 0

    def __enter__(self) -> DistInfo:
        return self

    def __exit__(self, exc_type, *exc_info) -> None:
        shutdown(synchronize=exc_type is None)


# ----------------------------------------------------------------------------- process group

_info: DistInfo | None = None
_exit_hook_registered = False
_LOCAL_RANK_VARIABLES = ("LOCAL_RANK", "SLURM_LOCALID", "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID")


def init(backend: str | None = None, timeout: timedelta = DEFAULT_TIMEOUT, device: str | None = None) -> DistInfo:
    """Detect the launcher, pick backend and device, and join the ``torch.distributed`` group.

    With one process no group is created (``backend`` is ``None`` in the result): there is nobody
    to talk to, and code can test ``info.world_size > 1``. Calling :func:`init` again returns the
    same record; a group made elsewhere is adopted if its rank and size agree with the environment.

    Args:
        backend: ``"nccl"``, ``"gloo"``, ... or ``None``: the ``ACCEL_BACKEND`` environment variable if set,
            else ``nccl`` when this rank uses a GPU, else ``gloo``.
        timeout: how long collectives (and the rendezvous) may wait for the other ranks.
        device: ``"cpu"`` (no GPU is bound, even where CUDA is available: several CPU ranks on a
            one-GPU machine), ``"cuda"`` (a GPU is required), or ``None``: the ``ACCEL_DEVICE``
            environment variable if set, else ``cuda`` when CUDA is available.

    Returns:
        A :class:`DistInfo`; ``with init() as info:`` calls :func:`shutdown` at the end of the block.

    Raises:
        LaunchError: a bad launch environment (see :func:`detect`), a local rank beyond the visible
            GPUs, or a master address that does not resolve.
        ValueError: an unavailable backend or device (``ACCEL_BACKEND`` / ``ACCEL_DEVICE`` named when
            they gave it), or a different backend than an existing initialisation.
        TypeError: ``timeout`` is not a ``timedelta``.
        accel._optional.MissingDependency: an MPI launch without ``MASTER_ADDR``/``MASTER_PORT`` and without
            mpi4py (the message names the extra to install).
    """
    global _info, _exit_hook_registered
    if not isinstance(timeout, timedelta):
        raise TypeError(f"timeout must be a datetime.timedelta, got {type(timeout).__name__}")
    if timeout <= timedelta(0):
        raise ValueError(f"timeout must be positive, got {timeout}")
    cuda = _wants_cuda(device if device is not None else os.environ.get("ACCEL_DEVICE"),
                       "device" if device is not None else "ACCEL_DEVICE")
    if backend is None and os.environ.get("ACCEL_BACKEND"):
        try:
            backend = choose_backend(os.environ["ACCEL_BACKEND"], cuda)
        except ValueError as error:
            raise ValueError(f"ACCEL_BACKEND={os.environ['ACCEL_BACKEND']!r}: {error}") from None
    chosen = choose_backend(backend, cuda)
    if _info is not None:
        if backend is not None and _info.backend is not None and chosen != _info.backend:
            raise ValueError(f"already initialised with backend {_info.backend!r}; call shutdown() "
                             f"before init(backend={backend!r})")
        return _info

    launch = detect()
    device = torch.device("cpu")
    if cuda:
        index = cuda_device_index(launch, torch.cuda.device_count())
        torch.cuda.set_device(index)
        device = torch.device("cuda", index)

    store = None
    if dist.is_initialized():  # somebody else made the group: adopt it if it is the same world
        if (dist.get_rank(), dist.get_world_size()) != (launch.rank, launch.world_size):
            raise LaunchError(f"torch.distributed is already initialised as rank {dist.get_rank()} of "
                              f"{dist.get_world_size()}, but the environment says rank {launch.rank} of "
                              f"{launch.world_size} ({_describe(launch)})")
        chosen = dist.get_backend()
    elif launch.world_size == 1:
        chosen = None
    else:
        store = _store(launch, timeout)  # resolves the master address first, for every launcher
        dist.init_process_group(chosen, store=store, rank=launch.rank, world_size=launch.world_size,
                                timeout=timeout)

    _info = DistInfo(launch.rank, launch.world_size, launch.local_rank, launch.local_world_size,
                     launch.launcher, chosen, device, store)
    if not _exit_hook_registered:  # destroying the group at exit avoids NCCL's teardown warnings
        atexit.register(shutdown)
        _exit_hook_registered = True
    return _info


def _wants_cuda(device: str | None, source: str) -> bool:
    """Whether this rank binds a GPU: ``device`` validated (``source`` names where it came from)."""
    available = torch.cuda.is_available()
    if device is None or device == "":
        return available
    if device not in ("cpu", "cuda"):
        raise ValueError(f"{source}={device!r}: expected 'cpu' or 'cuda'")
    if device == "cuda" and not available:
        raise ValueError(f"{source}='cuda' but torch.cuda.is_available() is False")
    return device == "cuda"


def shutdown(synchronize: bool = False) -> None:
    """Destroy the default process group if there is one; safe to call any number of times.

    ``synchronize`` (every rank got here, no error): first a barrier, so that no rank tears its connections
    down while a peer's gloo threads still use them (a rank then aborted at exit with "terminate called
    without an active exception", twice in CI runs). With gloo a monitored barrier that gives up after 60 s
    if a peer never arrives; nothing waits at exit after an error.
    """
    global _info
    if dist.is_available() and dist.is_initialized():
        if synchronize and dist.get_world_size() > 1:
            gc.collect()  # DDP reducers (reference cycles) holding the group's work go first
            try:
                if dist.get_backend() == "gloo":
                    dist.monitored_barrier(timeout=timedelta(seconds=60))
                else:
                    dist.barrier()
            except RuntimeError:  # a peer gone: destroy anyway
                pass
        dist.destroy_process_group()
    _info = None


def is_initialized() -> bool:
    """True between :func:`init` and :func:`shutdown`."""
    return _info is not None


def get_info() -> DistInfo | None:
    """The record :func:`init` returned, or ``None`` outside ``init()``/``shutdown()``."""
    return _info


def available_backends() -> list[str]:
    """The ``torch.distributed`` backends this torch build can use here."""
    if not dist.is_available():
        return []
    if hasattr(dist, "is_backend_available"):
        return [name for name in ("gloo", "nccl", "mpi", "ucc", "xccl") if dist.is_backend_available(name)]
    checks = {"gloo": dist.is_gloo_available, "nccl": dist.is_nccl_available, "mpi": dist.is_mpi_available}
    return [name for name, check in checks.items() if check()]


def choose_backend(requested: str | None, cuda: bool) -> str:
    """``requested`` validated, or the default: ``nccl`` with CUDA, else ``gloo``.

    Args:
        requested: a backend name, a torch device-to-backend map such as ``"cpu:gloo,cuda:nccl"``, or ``None``.
        cuda: whether CUDA devices are usable.
    """
    available = available_backends()
    if requested is None:
        return "nccl" if cuda and "nccl" in available else "gloo"
    if not isinstance(requested, str):
        raise TypeError(f"backend must be a string or None, got {type(requested).__name__}")
    name = requested.strip().lower()
    for part in name.split(","):  # "cpu:gloo,cuda:nccl" names one backend per device type
        single = part.rpartition(":")[2]
        if single not in available:
            raise ValueError(f"backend {requested!r}: {single!r} is not available in this torch build "
                             f"(available: {', '.join(available) or 'none'})")
        if single == "nccl" and not cuda:
            raise ValueError(f"backend {requested!r} needs a CUDA GPU, but torch.cuda.is_available() is False; "
                             "use 'gloo'")
    return name


def cuda_device_index(launch: Launch, device_count: int) -> int:
    """The CUDA device this rank should use: its local rank among the visible devices.

    When the launcher binds one GPU per task (``srun --gpus-per-task=1``, so each process sees one
    device), every rank uses device 0.

    Raises:
        LaunchError: the local rank is beyond the visible devices (too many processes per node).
    """
    if device_count < 1:
        raise LaunchError("CUDA is available but no device is visible "
                          f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r})")
    if launch.local_rank < device_count:
        return launch.local_rank
    if device_count == 1 and launch.local_world_size > 1 and "CUDA_VISIBLE_DEVICES" in os.environ:
        return 0
    variables = dict(launch.variables)
    source = next((f"{name}={variables[name]}" for name in _LOCAL_RANK_VARIABLES if name in variables),
                  f"local rank {launch.local_rank}")
    raise LaunchError(f"{source} but only {device_count} CUDA device(s) are visible "
                      f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}); "
                      f"start at most {device_count} process(es) per node")


def _describe(launch: Launch) -> str:
    return " ".join(f"{name}={value}" for name, value in launch.variables) or launch.launcher


def _store(launch: Launch, timeout: timedelta) -> dist.Store:
    """The rendezvous store, made here (not by an ``init_method`` URL) so that :class:`DistInfo` can hand it on.

    Rank 0 serves it, as torch's ``tcp://`` rendezvous does, except under torchrun (see :func:`_torchrun_store`).
    """
    addr, port = _rendezvous_endpoint(launch)
    if launch.launcher == "torchrun":
        return _torchrun_store(launch, timeout)
    store = dist.TCPStore(addr, port, launch.world_size, is_master=launch.rank == 0, timeout=timeout,
                          multi_tenant=True)
    return dist.PrefixStore("accel", store)


def _rendezvous_endpoint(launch: Launch) -> tuple[str, int]:
    """The store's address and port, checked to resolve (for MPI without them: rank 0's, broadcast)."""
    addr, port = launch.master_addr, launch.master_port
    names = dict(launch.variables)
    origin = "MASTER_ADDR" if "MASTER_ADDR" in names else "the first host of the SLURM nodelist"
    if addr is None or port is None:
        addr, port = _master_from_mpi(launch, addr, port)
        origin = "rank 0's host name, broadcast with mpi4py"
    # Checked for every launcher (torchrun's too): an address that does not resolve would otherwise
    # make the store client retry for the whole timeout.
    try:
        socket.getaddrinfo(addr, port, type=socket.SOCK_STREAM)
    except OSError as error:
        raise LaunchError(f"master address {addr!r} ({origin}) does not resolve ({error}); "
                          "set MASTER_ADDR to an address of rank 0's host") from None
    return addr, port


def _torchrun_store(launch: Launch, timeout: timedelta) -> dist.Store:
    """The rendezvous store under torchrun, with a key prefix for each restart of the group.

    torchrun's agent serves one store for the whole job; after an elastic restart the keys of the
    previous attempt's gloo/nccl rendezvous are still there, and the new workers would dial the dead
    ones' addresses (torch's ``env://`` adds no prefix). ``TORCHELASTIC_RESTART_COUNT`` separates them.
    """
    agent_serves = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(launch.master_addr, launch.master_port, launch.world_size,
                          is_master=not agent_serves and launch.rank == 0, timeout=timeout)
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return dist.PrefixStore(f"accel/attempt_{attempt}", store)


def _master_from_mpi(launch: Launch, addr: str | None, port: int | None) -> tuple[str, int]:
    """Rank 0 picks its host name and a free port; MPI broadcasts them to everyone."""
    require("mpi4py", extra="mpi", feature=f"an MPI launch ({_describe(launch)}) without MASTER_ADDR and "
                                           "MASTER_PORT (set both, or install mpi4py to share rank 0's address)")
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    if (comm.Get_rank(), comm.Get_size()) != (launch.rank, launch.world_size):
        raise LaunchError(f"mpi4py sees rank {comm.Get_rank()} of {comm.Get_size()}, but the environment says "
                          f"rank {launch.rank} of {launch.world_size} ({_describe(launch)}): the MPI under mpi4py did "
                          "not launch this process (mpi4py built for another MPI, or variables set by hand)")
    if comm.Get_rank() == 0:
        if addr is None:
            addr = socket.gethostname()
            if launch.local_world_size == launch.world_size and not _resolves(addr):
                addr = "127.0.0.1"  # all ranks on this node: loopback will do
        if port is None:
            with socket.socket() as probe:
                probe.bind(("", 0))
                port = probe.getsockname()[1]
    return comm.bcast((addr, port), root=0)


def _resolves(host: str) -> bool:
    try:
        socket.getaddrinfo(host, None)
        return True
    except OSError:
        return False
