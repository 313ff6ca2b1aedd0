"""Builders and utilities shared by test modules (test modules never import each other)."""
from __future__ import annotations

import os

DEFAULT_SEED = 20261207


def chosen_seed() -> int:
    """The seed tests draw their random inputs from.

    Fixed by default, so every run tests the same inputs. ``ACCEL_TEST_SEED=<int>`` picks another one and
    ``ACCEL_TEST_SEED=random`` a fresh one; either is printed so a failure can be replayed.
    """
    requested = os.environ.get("ACCEL_TEST_SEED", "").strip()
    if not requested:
        return DEFAULT_SEED
    value = int.from_bytes(os.urandom(4), "little") if requested == "random" else int(requested)
    print(f"ACCEL_TEST_SEED={value}")
    return value
