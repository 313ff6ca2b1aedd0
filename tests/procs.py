"""Run child processes from tests with a hard time limit, killing only what the test started.

Every multi-process test (torchrun, mpiexec, srun) goes through :func:`run`: the child gets its own
process group, and on timeout the whole group -- and nothing else -- is killed.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(**overrides: str) -> dict[str, str]:
    """The test's environment with the checkout importable and launcher variables cleared."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "OMPI_", "PMI_", "PMIX_", "MPI_LOCAL"))
           and k not in {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE",
                         "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK", "TORCHELASTIC_RUN_ID"}}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env.setdefault("OMP_NUM_THREADS", "1")
    env.update(overrides)
    return env


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (torchrun puts its workers in sessions of their own, so the
    process group alone does not reach them)."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parent = int(stat.rsplit(")", 1)[1].split()[1])
            parents.setdefault(parent, []).append(int(entry.name))
    found, frontier = [], [pid]
    while frontier:
        children = parents.get(frontier.pop(), [])
        found += children
        frontier += children
    return found


def _kill_tree(pid: int) -> None:
    """SIGKILL ``pid``'s process group and every descendant: only what this test started."""
    victims = descendants(pid)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for victim in victims:
        try:
            os.kill(victim, signal.SIGKILL)
        except ProcessLookupError:
            pass


def start_time(pid: int) -> int | None:
    """The kernel's start time of ``pid`` (clock ticks since boot), or ``None`` once it is gone or a zombie:
    with the PID it names one process, even if the PID is later reused."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] in ("Z", "X") else int(fields[19])


def snapshot(pid: int) -> dict[int, int]:
    """``pid`` and every live process below it, as ``{pid: start time}`` (see :func:`survivors`)."""
    found = {}
    for member in [pid, *descendants(pid)]:
        started = start_time(member)
        if started is not None:
            found[member] = started
    return found


def survivors(processes: dict[int, int]) -> list[int]:
    """The processes of a :func:`snapshot` still running (not zombies, and their PID not reused)."""
    return [pid for pid, started in processes.items() if start_time(pid) == started]


def kill_processes(processes: dict[int, int]) -> None:
    """SIGKILL the survivors of a :func:`snapshot`: what the test started, even once orphaned."""
    for pid in survivors(processes):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def spawn(cmd: list[str], *, env: dict[str, str] | None = None, output: Path | None = None) -> subprocess.Popen:
    """Start ``cmd`` in a session of its own (for :func:`kill_tree`), its output to ``output`` or a pipe.

    For tests that must act on a running child (stop it, signal it); pair with ``kill_tree(proc.pid)``
    in a ``finally``.
    """
    stream = open(output, "w") if output is not None else subprocess.PIPE
    try:
        return subprocess.Popen(cmd, stdout=stream, stderr=subprocess.STDOUT, text=True,
                                env=env if env is not None else child_env(), cwd=REPO_ROOT,
                                start_new_session=True)
    finally:
        if output is not None:
            stream.close()


def kill_tree(pid: int) -> None:
    """SIGKILL what ``pid`` started (see :func:`spawn`); harmless if it already ended."""
    _kill_tree(pid)


def run(cmd: list[str], *, timeout: float, env: dict[str, str] | None = None,
        cwd: str | Path | None = None) -> subprocess.CompletedProcess:
    """Run ``cmd`` to completion; on timeout kill its process group and raise with its output."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env if env is not None else child_env(), cwd=cwd or REPO_ROOT,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_tree(proc.pid)
        try:
            out, _ = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:  # a grandchild we could not see still holds the pipe
            out = "(output unavailable: the pipe is still held open)"
        raise AssertionError(f"{' '.join(map(str, cmd))} did not finish in {timeout}s; output:\n{out}") from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, None)


def torchrun(script: str | Path, *args: str, nproc: int = 2, timeout: float = 120,
             env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node=nproc script args`` with a hard limit."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", str(script), *args]
    return run(cmd, timeout=timeout, env=env)


def check(result: subprocess.CompletedProcess) -> str:
    """Assert a finished child succeeded; return its output."""
    assert result.returncode == 0, (
        f"{' '.join(map(str, result.args))} exited {result.returncode}; output:\n{result.stdout}")
    return result.stdout
