"""accel.checkpoint and accel.watchdog on their own: atomic, verified checkpoints; a stalled phase ends the process."""
from __future__ import annotations

import os
import sys
import time

import pytest
import torch

import procs
from accel import checkpoint
from accel.watchdog import EXIT_STALLED, CollectiveWatchdog


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


_STALLS = """
import time
from accel.watchdog import CollectiveWatchdog
with CollectiveWatchdog(0.6, rank=1, world_size=2, poll=0.05) as watchdog:
    for step in range(3):                          # phases that finish in time are fine
        with watchdog.waiting(f"step {step}: quick"):
            time.sleep(0.3)
    with watchdog.waiting("step 3: the gradient all-reduce"):
        time.sleep(60)                             # a peer that never answers
print("not reached")
"""


def test_watchdog_ends_a_stalled_phase_naming_it():
    start = time.monotonic()
    result = procs.run([sys.executable, "-c", _STALLS], timeout=60)
    elapsed = time.monotonic() - start
    assert result.returncode == EXIT_STALLED, result.stdout
    assert "rank 1 of 2: a peer stopped responding" in result.stdout
    assert "while waiting in step 3: the gradient all-reduce" in result.stdout and "not reached" not in result.stdout
    assert elapsed < 30  # 0.9 s of quick phases plus 0.6 s, and interpreter start-up


def test_watchdog_progress_inside_a_phase_restarts_its_clock():
    with CollectiveWatchdog(0.5, rank=0, world_size=2, poll=0.02) as watchdog:
        with watchdog.waiting("outer"):
            for _ in range(4):  # 1.2 s in the outer phase, but never 0.5 s without progress
                with watchdog.waiting("inner"):
                    time.sleep(0.3)
    with pytest.raises(ValueError, match="timeout"):
        CollectiveWatchdog(0, rank=0, world_size=1)
