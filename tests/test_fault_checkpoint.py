"""accel.distributed.checkpoint and .watchdog on their own: atomic, verified checkpoints that are never
replaced by corrupt ones; a peer whose heartbeat stops ends the process, a rank that computes long does not."""
from __future__ import annotations

import os
import signal
import sys
import time
from datetime import timedelta

import procs
import pytest
import torch

from accel.distributed import checkpoint
from accel.distributed.watchdog import EXIT_STALLED, CollectiveWatchdog


def _state(seed: int) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return {"weights": torch.randn(5, 3, generator=generator), "epoch": 2, "losses": [0.5, 0.25],
            "rng": torch.get_rng_state(), "nested": {"name": "x", "values": (1, 2.5)}}


def _same(a: dict, b: dict) -> bool:
    return (torch.equal(a["weights"], b["weights"]) and torch.equal(a["rng"], b["rng"])
            and {k: a[k] for k in ("epoch", "losses", "nested")} == {k: b[k] for k in ("epoch", "losses", "nested")})


def test_save_load_round_trip_and_keep_the_newest(tmp_path, seed):
    states = {step: _state(seed + step) for step in (5, 10, 15, 20)}
    for step, state in states.items():
        checkpoint.save(tmp_path, state, epoch=1 + step // 10, step=step, keep=3)
    kept = checkpoint.list_checkpoints(tmp_path)
    assert [p.name for p in kept] == [
        "checkpoint-e00002-s000000010.pt", "checkpoint-e00002-s000000015.pt", "checkpoint-e00003-s000000020.pt"]
    path, loaded = checkpoint.load_latest(tmp_path)
    assert path == kept[-1] and _same(loaded, states[20])
    assert not list(tmp_path.glob("*.tmp"))
    umask = os.umask(0o022)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # as any file this user writes, not mkstemp's 0600


def test_a_crash_mid_write_leaves_the_previous_checkpoint_intact(tmp_path, seed, monkeypatch):
    checkpoint.save(tmp_path, _state(seed), epoch=1, step=5)

    def crash(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", crash)  # the write happened, the rename did not
    with pytest.raises(OSError, match="No space"):
        checkpoint.save(tmp_path, _state(seed + 1), epoch=1, step=10)
    monkeypatch.undo()
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["checkpoint-e00001-s000000005.pt"]
    assert not list(tmp_path.glob("*.tmp"))  # the temporary file was removed
    assert _same(checkpoint.load_latest(tmp_path)[1], _state(seed))


@pytest.mark.parametrize("damage", ["truncate", "flip", "empty", "foreign"])
def test_a_damaged_latest_checkpoint_is_skipped_with_a_message(tmp_path, seed, damage):
    checkpoint.save(tmp_path, _state(seed), epoch=1, step=5)
    latest = checkpoint.save(tmp_path, _state(seed + 1), epoch=1, step=10)
    data = latest.read_bytes()
    if damage == "truncate":
        latest.write_bytes(data[:len(data) // 2])
    elif damage == "flip":
        position = len(data) - 1 - (seed % 200)
        latest.write_bytes(data[:position] + bytes([data[position] ^ 0x10]) + data[position + 1:])
    elif damage == "empty":
        latest.write_bytes(b"")
    else:
        torch.save(_state(seed + 1), latest)  # a plain torch.save file under a checkpoint's name
    messages = []
    path, loaded = checkpoint.load_latest(tmp_path, say=messages.append)
    assert path.name == "checkpoint-e00001-s000000005.pt" and _same(loaded, _state(seed))
    assert len(messages) == 1 and latest.name in messages[0]
    assert ("truncated or corrupt" in messages[0]) or ("not an accel checkpoint" in messages[0])


def test_no_valid_checkpoint_and_remove_all(tmp_path, seed):
    assert checkpoint.load_latest(tmp_path / "missing") is None
    only = checkpoint.save(tmp_path, _state(seed), epoch=1, step=5)
    only.write_bytes(only.read_bytes()[:-3])
    assert checkpoint.load_latest(tmp_path, say=lambda line: None) is None
    (tmp_path / "checkpoint-e00001-s000000009.pt.abc.tmp").write_bytes(b"partial")
    assert checkpoint.remove_all(tmp_path) == 1 and not list(tmp_path.iterdir())
    with pytest.raises(ValueError, match="keep"):
        checkpoint.save(tmp_path, {}, epoch=1, step=1, keep=0)


def test_a_fresh_run_keeps_its_valid_checkpoints_when_every_older_one_is_corrupt(tmp_path, seed):
    """Issue 22.6: corrupt checkpoints with later names made save() delete the new, valid ones."""
    written = [checkpoint.save(tmp_path, _state(seed + step), epoch=1, step=step) for step in (30, 40, 50)]
    for path in written:  # a previous run's checkpoints, all damaged since
        path.write_bytes(path.read_bytes()[:100])
    (tmp_path / "checkpoint-e00001-s000000060.pt.xyz.tmp").write_bytes(b"partial")  # a killed write
    messages = []
    assert checkpoint.recover(tmp_path, say=messages.append) is None  # nothing to resume from
    assert not list(tmp_path.glob("*.tmp"))
    assert sorted(p.name for p in tmp_path.glob("*.corrupt")) == [
        f"checkpoint-e00001-s0000000{step}.pt.corrupt" for step in (30, 40, 50)]
    assert len(messages) == 4 and all("moved aside" in line for line in messages[1:])
    assert "left by a write that did not finish" in messages[0]

    for step in (5, 10, 15, 20):  # the fresh run from scratch
        checkpoint.save(tmp_path, _state(seed + step), epoch=1, step=step, keep=3, say=messages.append)
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == [
        f"checkpoint-e00001-s0000000{step:02d}.pt" for step in (10, 15, 20)]
    path, loaded = checkpoint.recover(tmp_path, say=messages.append)
    assert path.name == "checkpoint-e00001-s000000020.pt" and _same(loaded, _state(seed + 20))


def test_save_never_keeps_a_corrupt_checkpoint_in_place_of_a_valid_one(tmp_path, seed):
    for step in (5, 10, 15):
        checkpoint.save(tmp_path, _state(seed + step), epoch=1, step=step, keep=3)
    middle = tmp_path / "checkpoint-e00001-s000000015.pt"
    middle.write_bytes(b"\0" * 64)  # damaged after it was written
    later = tmp_path / "checkpoint-e00009-s000000900.pt"  # a newer name, not this run's: left alone
    later.write_bytes(b"not a checkpoint")
    messages = []
    checkpoint.save(tmp_path, _state(seed + 20), epoch=1, step=20, keep=3, say=messages.append)
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == [
        "checkpoint-e00001-s000000005.pt", "checkpoint-e00001-s000000010.pt", "checkpoint-e00001-s000000020.pt",
        later.name]
    assert (tmp_path / (middle.name + ".corrupt")).exists()
    assert len(messages) == 1 and middle.name in messages[0] and "moved aside" in messages[0]
    # remove_all (--no-resume) clears moved-aside files too
    assert checkpoint.remove_all(tmp_path) == 4 and not list(tmp_path.iterdir())


# ------------------------------------------------------------------------------------------ watchdog

def _watchdog(store, rank, stalls, timeout=0.6):
    return CollectiveWatchdog(timeout, rank=rank, world_size=2, store=store, interval=0.05,
                              on_stall=stalls.append)


def test_watchdog_never_times_how_long_a_rank_computes():
    """Issue 22.7: the watchdog ended a rank whose step or evaluation computed longer than its timeout."""
    store, stalls = torch.distributed.HashStore(), []
    with _watchdog(store, 0, stalls) as rank0, _watchdog(store, 1, stalls):
        with rank0.waiting("step 1: forward/backward with DDP's gradient all-reduce"):
            time.sleep(2.0)  # more than three timeouts inside one phase; the peer keeps beating
        time.sleep(2.0)  # and outside any phase
    assert stalls == []


def test_watchdog_reports_a_silent_peer_naming_the_collective():
    store, stalls = torch.distributed.HashStore(), []
    with _watchdog(store, 0, stalls) as rank0:  # rank 1 never beats: stopped before its first heartbeat
        with rank0.waiting("step 3: the gradient all-reduce"):
            deadline = time.monotonic() + 60
            while not stalls and time.monotonic() < deadline:
                time.sleep(0.05)
    assert len(stalls) == 1 and stalls[0] == rank0.stalled
    assert "rank 0 of 2: a peer stopped responding: rank 1 sent no heartbeat" in stalls[0]
    assert "while waiting in step 3: the gradient all-reduce" in stalls[0]


def test_watchdog_stops_watching_a_peer_whose_run_ended():
    store, stalls = torch.distributed.HashStore(), []
    with _watchdog(store, 0, stalls):
        with _watchdog(store, 1, stalls):
            time.sleep(0.3)
        time.sleep(2.0)  # rank 1 left its watchdog (its run is over) and beats no more
    assert stalls == []


_STALLS = """
import sys, time
import torch.distributed as dist
from accel.distributed.watchdog import CollectiveWatchdog
store = dist.TCPStore("127.0.0.1", int(sys.argv[1]), is_master=False, timeout=__import__("datetime").timedelta(seconds=30))
with CollectiveWatchdog(1.0, rank=0, world_size=2, store=store) as watchdog:
    with watchdog.waiting("step 3: the gradient all-reduce"):
        time.sleep(120)                            # a peer that never answers
print("not reached")
"""


def test_watchdog_ends_the_process_with_its_status_and_one_line():
    port = procs.free_port()
    server = torch.distributed.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False)
    result = procs.run([sys.executable, "-c", _STALLS, str(port)], timeout=60)
    assert result.returncode == EXIT_STALLED, result.stdout
    assert "rank 0 of 2: a peer stopped responding: rank 1 sent no heartbeat" in result.stdout
    assert "while waiting in step 3: the gradient all-reduce" in result.stdout and "not reached" not in result.stdout
    assert "Traceback" not in result.stdout
    del server


_STORE_SERVER = ("import sys, time, torch.distributed as d; "
                 "server = d.TCPStore('127.0.0.1', int(sys.argv[1]), is_master=True, wait_for_workers=False); "
                 "print('up', flush=True); time.sleep(300)")


def test_watchdog_reports_a_store_that_stopped_answering():
    """Under srun and mpirun rank 0's process serves the store: stopped, every rank's heartbeat blocks."""
    port = procs.free_port()
    server = procs.spawn([sys.executable, "-c", _STORE_SERVER, str(port)])
    try:
        assert server.stdout.readline().strip() == "up"

        def client():
            return torch.distributed.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=60))

        stalls = []
        with _watchdog(client(), 0, stalls, timeout=1.0), _watchdog(client(), 1, stalls, timeout=1.0):
            time.sleep(1.5)  # both beat through the store
            assert stalls == []
            os.kill(server.pid, signal.SIGSTOP)
            deadline = time.monotonic() + 60
            while len(stalls) < 2 and time.monotonic() < deadline:
                time.sleep(0.05)
            procs.kill_tree(server.pid)  # the blocked requests fail now, and the threads end
        assert len(stalls) == 2 and all("the store the ranks share has not answered" in line for line in stalls)
    finally:
        procs.kill_tree(server.pid)
        server.wait(timeout=30)


def test_watchdog_arguments_are_checked():
    store = torch.distributed.HashStore()
    with pytest.raises(ValueError, match="timeout"):
        CollectiveWatchdog(0, rank=0, world_size=2, store=store)
    with pytest.raises(ValueError, match="needs the store"):
        CollectiveWatchdog(5, rank=0, world_size=2, store=None)
    with pytest.raises(ValueError, match="rank 2 of world_size 2"):
        CollectiveWatchdog(5, rank=2, world_size=2, store=store)
    with CollectiveWatchdog(5, rank=0, world_size=1, store=None) as alone:  # nobody to watch
        assert alone.stalled is None
