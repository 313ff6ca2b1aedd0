"""Workers and their registry: which :class:`~accel.ooc.workers.base.Worker` class serves which device type.

A worker type is one file: a ``Worker`` subclass with a ``kind`` (the :class:`torch.device` type it
serves, e.g. ``"cuda"``) and its class-level hooks (see :mod:`accel.ooc.workers.base`), registered with
:func:`register_worker`. The engine and the plan name no device type: they ask this registry.

The built-in types are registered lazily by module path, so ``accel.ooc`` imports no device module
until a device of that type is asked for (and ``base.py`` / ``cpu.py`` never import ``cuda.py``).
"""
from __future__ import annotations

import importlib
import threading

import torch

from accel.ooc.workers.base import Worker
from accel.ooc.workers.cpu import CPUWorker

__all__ = ["Worker", "CPUWorker", "register_worker", "unregister_worker", "worker_class", "worker_classes",
           "check_device", "default_devices", "make_worker"]

#: device type -> "module:Class" of the built-in worker types, imported on first use
_BUILTIN = {"cpu": "accel.ooc.workers.cpu:CPUWorker", "cuda": "accel.ooc.workers.cuda:CUDAWorker"}
_registered: dict = {}
_lock = threading.Lock()


def register_worker(cls):
    """Register ``cls`` (a :class:`~accel.ooc.workers.base.Worker` subclass) for devices of type ``cls.kind``.

    Usable as a class decorator. A later registration of the same kind replaces the earlier one.

    Raises:
        TypeError: ``cls`` is not a Worker subclass.
        ValueError: ``cls.kind`` is not a device type torch knows (``torch.device(kind)`` fails).
    """
    if not (isinstance(cls, type) and issubclass(cls, Worker)):
        raise TypeError(f"register_worker expects a Worker subclass, got {cls!r}")
    try:
        torch.device(cls.kind)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"{cls.__name__}.kind = {cls.kind!r} is not a torch device type") from error
    with _lock:
        _registered[cls.kind] = cls
    return cls


def unregister_worker(kind: str) -> None:
    """Forget the worker type registered for ``kind`` (a built-in one comes back on next use)."""
    with _lock:
        _registered.pop(kind, None)


def worker_class(kind: str):
    """The Worker subclass for device type ``kind``.

    Raises:
        ValueError: no worker type serves ``kind`` (names the supported types).
    """
    with _lock:
        cls = _registered.get(kind)
    if cls is not None:
        return cls
    if kind in _BUILTIN:
        module, name = _BUILTIN[kind].split(":")
        cls = getattr(importlib.import_module(module), name)
        with _lock:
            return _registered.setdefault(kind, cls)
    raise ValueError(f"unsupported device type {kind!r}: supported {sorted(set(_BUILTIN) | set(_registered))}")


def worker_classes() -> list:
    """Every registered worker type (the built-in ones included), highest ``default_priority`` first."""
    for kind in _BUILTIN:
        worker_class(kind)
    with _lock:
        classes = list(_registered.values())
    return sorted(classes, key=lambda cls: -cls.default_priority)


def check_device(device) -> torch.device:
    """``device`` as a normalised :class:`torch.device`, validated by its worker type.

    Raises:
        ValueError: not a device name, an unsupported device type, or a device that does not exist here.
    """
    if isinstance(device, bool) or not isinstance(device, (str, torch.device, int)):
        raise ValueError(f"a device must be a name such as 'cpu' or 'cuda:0' or a torch.device, got {device!r}")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"unknown device {device!r}") from error
    return worker_class(device.type).check_device(device)


def default_devices() -> list[str]:
    """The devices of the highest-priority worker type that finds any (every visible GPU, else the CPU)."""
    for cls in worker_classes():
        found = cls.default_devices()
        if found:
            return list(found)
    return ["cpu"]


def make_worker(device, memory_limit: int | None = None):
    """A worker for ``device`` (a name or a :class:`torch.device`), of its registered type."""
    device = check_device(device)
    return worker_class(device.type)(device, memory_limit)
