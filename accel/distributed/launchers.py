"""Read how this process was launched -- torchrun, SLURM, MPI or nothing -- from its environment.

Pure parsing, no side effects and no torch: :func:`detect` returns a :class:`Launch` record that
:func:`accel.distributed.init` turns into a process group. Also the SLURM syntaxes this needs:
hostlists (``node[01-03,7]``) and tasks-per-node (``2(x3),1``), expanded without ``scontrol``.
Bad values raise :class:`LaunchError` naming the variable and its value.
"""
from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass

__all__ = ["Launch", "LaunchError", "detect", "expand_hostlist", "expand_tasks_per_node", "slurm_port"]

# More hosts than any SLURM cluster has: a nodelist asking for more is a typo (node[1-99999999999]), and
# expanding it would exhaust memory long before any error. Counted before anything is built.
MAX_HOSTS = 65536

# A port in 20000-29999 derived from the job and step ids, so that every srun step of every job
# gets its own rendezvous port without anyone choosing one (MASTER_PORT overrides it).
_SLURM_PORT_BASE, _SLURM_PORT_SPAN = 20000, 10000


class LaunchError(ValueError):
    """The launch environment is incomplete or inconsistent (the message names the variable)."""


@dataclass(frozen=True)
class Launch:
    """What :func:`detect` read from the environment.

    Attributes:
        launcher: ``"torchrun"``, ``"slurm"``, ``"mpi"`` or ``"single"``.
        rank, world_size: this process's global rank and the number of processes.
        local_rank, local_world_size: rank and process count on this node.
        master_addr, master_port: rendezvous endpoint, or ``None`` when :func:`init` must find it
            (MPI broadcasts rank 0's address; a single process needs none).
        variables: the ``(name, value)`` environment pairs the decision rests on.
    """

    launcher: str
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str | None = None
    master_port: int | None = None
    variables: tuple[tuple[str, str], ...] = ()


# ----------------------------------------------------------------------------------- parsing

def expand_hostlist(hostlist: str) -> list[str]:
    """Expand a SLURM hostlist such as ``"node[01-03,7],gpu-a[1-2]"`` without ``scontrol``.

    Ranges keep their zero padding (``01-03`` gives ``01, 02, 03``); several bracket groups in one
    name expand to their product (``r[1-2]n[1-2]``), as SLURM does.

    Args:
        hostlist: the value of ``SLURM_JOB_NODELIST`` or ``SLURM_STEP_NODELIST``.

    Returns:
        The host names in order.

    Raises:
        LaunchError: on an empty list, unbalanced or nested brackets, a malformed range, or more than
            :data:`MAX_HOSTS` hosts in all (counted before anything is expanded).
    """
    names, depth, start = [], 0, 0
    for position, char in enumerate(hostlist):
        if char == "[":
            depth += 1
            if depth > 1:
                raise LaunchError(f"nested '[' at position {position} in hostlist {hostlist!r}")
        elif char == "]":
            depth -= 1
            if depth < 0:
                raise LaunchError(f"unmatched ']' at position {position} in hostlist {hostlist!r}")
        elif char == "," and depth == 0:
            names.append(hostlist[start:position])
            start = position + 1
    if depth:
        raise LaunchError(f"unclosed '[' in hostlist {hostlist!r}")
    names.append(hostlist[start:])
    total = 0
    for name in names:
        if not name.strip():
            raise LaunchError(f"empty host name in hostlist {hostlist!r}")
        total += _count_hosts(name.strip(), hostlist)
        if total > MAX_HOSTS:
            raise LaunchError(f"hostlist {hostlist!r} names more than {MAX_HOSTS:,} hosts "
                              f"(accel.distributed.launchers.MAX_HOSTS); is a range mistyped?")
    return [host for name in names for host in _expand_name(name.strip(), hostlist)]


def _count_hosts(name: str, hostlist: str) -> int:
    """How many hosts ``name`` expands to, from the range bounds alone (nothing is built)."""
    count, rest = 1, name
    while "[" in rest:
        open_at = rest.index("[")
        close_at = rest.index("]", open_at)
        count *= sum(high - low + 1 for _, low, high in
                     (_range_bounds(part, hostlist) for part in rest[open_at + 1:close_at].split(",")))
        rest = rest[close_at + 1:]
    return count


def _expand_name(name: str, hostlist: str) -> list[str]:
    open_at = name.find("[")
    if open_at < 0:
        return [name]
    close_at = name.index("]", open_at)
    prefix, body, rest = name[:open_at], name[open_at + 1:close_at], name[close_at + 1:]
    suffixes = _expand_name(rest, hostlist) if rest else [""]
    return [prefix + item + suffix for item in _expand_ranges(body, hostlist) for suffix in suffixes]


def _range_bounds(part: str, hostlist: str) -> tuple[str, int, int]:
    """``"01-03"`` -> ``("01", 1, 3)``; ``"7"`` -> ``("7", 7, 7)``."""
    low, dash, high = part.partition("-")
    if not low.isdigit() or (dash and not high.isdigit()):
        raise LaunchError(f"bad range {part!r} in hostlist {hostlist!r} (expected N or N-M)")
    if len(low) > 64 or len(high) > 64:  # int() of thousands of digits is itself slow, then refused
        raise LaunchError(f"range {part!r} in hostlist {hostlist!r} has numbers of more than 64 digits")
    if dash and int(high) < int(low):
        raise LaunchError(f"descending range {part!r} in hostlist {hostlist!r}")
    return low, int(low), int(high) if dash else int(low)


def _expand_ranges(body: str, hostlist: str) -> list[str]:
    items = []
    for part in body.split(","):
        low_text, low, high = _range_bounds(part, hostlist)
        if low == high and "-" not in part:
            items.append(low_text)
            continue
        width = len(low_text)  # "01-10" pads to the width of the low end, as SLURM does
        items.extend(str(number).zfill(width) for number in range(low, high + 1))
    return items


def expand_tasks_per_node(spec: str) -> list[int]:
    """Expand SLURM's ``SLURM_TASKS_PER_NODE`` syntax: ``"2(x3),1"`` is ``[2, 2, 2, 1]``.

    Args:
        spec: the value of ``SLURM_STEP_TASKS_PER_NODE`` or ``SLURM_TASKS_PER_NODE``.

    Raises:
        LaunchError: if a part is neither ``N`` nor ``N(xM)``.
    """
    counts = []
    for part in spec.split(","):
        count, marker, repeat = part.partition("(x")
        if not count.isdigit() or (marker and not (repeat.endswith(")") and repeat[:-1].isdigit())):
            raise LaunchError(f"bad part {part!r} in tasks-per-node {spec!r} (expected N or N(xM))")
        counts.extend([int(count)] * (int(repeat[:-1]) if repeat else 1))
    return counts


def slurm_port(job_id: int, step_id: int = 0) -> int:
    """The rendezvous port :func:`init` uses for a SLURM job step when ``MASTER_PORT`` is unset."""
    return _SLURM_PORT_BASE + (10 * job_id + step_id) % _SLURM_PORT_SPAN


class _Reader:
    """Reads integer variables from an environment, remembering which ones it used."""

    def __init__(self, environ: Mapping[str, str]):
        self.environ = environ
        self.used: dict[str, str] = {}

    def has(self, name: str) -> bool:
        return name in self.environ

    def text(self, name: str) -> str:
        self.used[name] = self.environ[name]
        return self.environ[name]

    def integer(self, name: str, minimum: int = 0) -> int:
        value = self.text(name)
        try:
            number = int(value.strip())
        except ValueError:
            raise LaunchError(f"{name}={value!r} is not an integer") from None
        if number < minimum:
            raise LaunchError(f"{name}={value!r} must be >= {minimum}")
        return number

    def first(self, *names: str) -> str | None:
        return next((name for name in names if name in self.environ), None)

    def port(self, name: str) -> int:
        port = self.integer(name, minimum=1)
        if port > 65535:
            raise LaunchError(f"{name}={self.environ[name]!r} is not a TCP port (1-65535)")
        return port

    def launch(self, launcher: str, rank: int, world_size: int, local_rank: int, local_world_size: int, *,
               names: tuple[str, str, str, str], master_addr: str | None = None,
               master_port: int | None = None) -> Launch:
        """Check the numbers against each other; ``names`` are (rank, world, local, local world) variables."""
        rank_name, world_name, local_name, local_world_name = names
        if rank >= world_size:
            raise LaunchError(f"{rank_name}={rank} is not below {world_name}={world_size}")
        if local_world_size > world_size:
            raise LaunchError(f"{local_world_name}={local_world_size} exceeds {world_name}={world_size}")
        if local_rank >= local_world_size:
            raise LaunchError(f"{local_name}={local_rank} is not below {local_world_name}={local_world_size}")
        return Launch(launcher, rank, world_size, local_rank, local_world_size, master_addr,
                      master_port, tuple(self.used.items()))


# --------------------------------------------------------------------------------- detection

def detect(environ: Mapping[str, str] | None = None) -> Launch:
    """Work out how this process was launched, from environment variables only (no side effects).

    Precedence: torchrun-style ``RANK``/``WORLD_SIZE`` (also set by torchrun inside ``srun``), then
    MPI (Open MPI's ``OMPI_COMM_WORLD_*``, MPICH/Intel MPI's ``PMI_RANK``/``PMI_SIZE``), then a SLURM
    job step (``srun``; an ``srun --mpi=pmi2`` step whose PMI ranks match counts as SLURM), else a
    single process. A batch script outside ``srun`` is a single process (with a warning when the job
    asked for more tasks), so it never waits for peers that were not started.

    Args:
        environ: the environment to read; ``os.environ`` by default.

    Returns:
        A :class:`Launch` record.

    Raises:
        LaunchError: when variables are missing, not integers, or inconsistent (rank >= world size),
            or a SLURM nodelist cannot be parsed. The message names the variable and its value.
    """
    env = _Reader(os.environ if environ is None else environ)
    if env.has("RANK") or env.has("WORLD_SIZE"):
        return _from_torchrun(env)
    mpi = _from_mpi(_Reader(env.environ))
    in_slurm_step = env.has("SLURM_PROCID") and env.first("SLURM_STEP_ID", "SLURM_STEPID") is not None
    if in_slurm_step:
        slurm = _from_slurm(env)
        if mpi is None or (mpi.rank, mpi.world_size) == (slurm.rank, slurm.world_size):
            return slurm
    if mpi is not None:
        return mpi
    if env.has("SLURM_JOB_ID") and env.environ.get("SLURM_NTASKS", "1") not in ("", "1"):
        warnings.warn(f"running in the batch script of SLURM job {env.environ['SLURM_JOB_ID']}, which "
                      f"asked for SLURM_NTASKS={env.environ['SLURM_NTASKS']} tasks, but outside srun: "
                      "this is one process. Start the tasks with `srun python ...`.", stacklevel=2)
    return Launch("single", 0, 1, 0, 1)


def _from_torchrun(env: _Reader) -> Launch:
    for present, missing in (("RANK", "WORLD_SIZE"), ("WORLD_SIZE", "RANK")):
        if env.has(present) and not env.has(missing):
            raise LaunchError(f"{present}={env.environ[present]!r} is set but {missing} is not; "
                              "set both (torchrun does), or neither for a single process")
    rank, world = env.integer("RANK"), env.integer("WORLD_SIZE", minimum=1)
    # Without LOCAL_* (variables set by hand) assume one node: the local view is the global one.
    local_rank = env.integer("LOCAL_RANK") if env.has("LOCAL_RANK") else rank
    local_world = env.integer("LOCAL_WORLD_SIZE", minimum=1) if env.has("LOCAL_WORLD_SIZE") else world
    addr = port = None
    if world > 1:
        for name in ("MASTER_ADDR", "MASTER_PORT"):
            if not env.has(name):
                raise LaunchError(f"WORLD_SIZE={world} but {name} is not set; launch with torchrun, "
                                  "or set MASTER_ADDR and MASTER_PORT to rank 0's host and a free port")
        addr, port = env.text("MASTER_ADDR"), env.port("MASTER_PORT")
    return env.launch("torchrun", rank, world, local_rank, local_world, master_addr=addr,
                      master_port=port, names=("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"))


_MPI_FLAVOURS = (  # (rank, size, local rank, local size) variables of each MPI family
    ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE"),
    ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS"),
)


def _from_mpi(env: _Reader) -> Launch | None:
    for names in _MPI_FLAVOURS:
        rank_name, size_name, local_name, local_size_name = names
        if not (env.has(rank_name) or env.has(size_name)):
            continue
        missing = size_name if env.has(rank_name) else rank_name
        if not env.has(missing):
            present = rank_name if missing == size_name else size_name
            raise LaunchError(f"{present}={env.environ[present]!r} is set but {missing} is not")
        rank, world = env.integer(rank_name), env.integer(size_name, minimum=1)
        local_rank = env.integer(local_name) if env.has(local_name) else rank
        local_world = env.integer(local_size_name, minimum=1) if env.has(local_size_name) else world
        addr = env.text("MASTER_ADDR") if env.has("MASTER_ADDR") else None
        port = env.port("MASTER_PORT") if env.has("MASTER_PORT") else None
        return env.launch("mpi", rank, world, local_rank, local_world, master_addr=addr,
                          master_port=port, names=names)
    return None


def _from_slurm(env: _Reader) -> Launch:
    rank = env.integer("SLURM_PROCID")
    world_name = env.first("SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "SLURM_NPROCS")
    if world_name is None:
        raise LaunchError(f"SLURM_PROCID={env.environ['SLURM_PROCID']!r} is set but none of "
                          "SLURM_STEP_NUM_TASKS, SLURM_NTASKS is")
    world = env.integer(world_name, minimum=1)
    if not env.has("SLURM_LOCALID"):
        raise LaunchError(f"SLURM_PROCID={env.environ['SLURM_PROCID']!r} is set but SLURM_LOCALID is not")
    local_rank = env.integer("SLURM_LOCALID")

    nodelist_name = env.first("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST")
    if nodelist_name is None:
        raise LaunchError(f"{world_name}={world} but no SLURM_STEP_NODELIST or SLURM_JOB_NODELIST is set")
    nodelist = env.text(nodelist_name)
    try:
        hosts = expand_hostlist(nodelist)
    except LaunchError as error:
        raise LaunchError(f"{nodelist_name}={nodelist!r} cannot be parsed: {error}") from None

    # Tasks on this node: this node's entry of the tasks-per-node list, found by its name in the
    # step's node list (SLURM_NODEID counts nodes of the job, which may differ from the step's).
    tasks_name = env.first("SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE")
    local_world = world
    if tasks_name is not None:
        tasks_spec = env.text(tasks_name)
        try:
            counts = expand_tasks_per_node(tasks_spec)
        except LaunchError as error:
            raise LaunchError(f"{tasks_name}={tasks_spec!r} cannot be parsed: {error}") from None
        node = env.environ.get("SLURMD_NODENAME")
        if node in hosts:
            index = hosts.index(node)
        elif env.has("SLURM_NODEID"):
            index = env.integer("SLURM_NODEID")
        else:
            index = 0
        if index >= len(counts):
            raise LaunchError(f"node index {index} is beyond {tasks_name}={tasks_spec!r} ({len(counts)} nodes)")
        local_world = counts[index]
    local_world_name = tasks_name or world_name

    addr = env.text("MASTER_ADDR") if env.has("MASTER_ADDR") else hosts[0]
    if env.has("MASTER_PORT"):
        port = env.port("MASTER_PORT")
    elif not env.has("SLURM_JOB_ID"):
        raise LaunchError("neither MASTER_PORT nor SLURM_JOB_ID is set; cannot choose a rendezvous port")
    else:
        step_name = env.first("SLURM_STEP_ID", "SLURM_STEPID")
        port = slurm_port(env.integer("SLURM_JOB_ID"), env.integer(step_name) if step_name else 0)
    return env.launch("slurm", rank, world, local_rank, local_world, master_addr=addr, master_port=port,
                      names=("SLURM_PROCID", world_name, "SLURM_LOCALID", local_world_name))
