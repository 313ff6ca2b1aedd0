"""What every part of ``gpucheck`` shares: the machine's description, the GPU's short name for file names,
the JSON record a part writes as it goes, and the timers.

A part's record is rewritten (atomically) after every measurement, so a part stopped at its budget still
leaves everything it measured behind.
"""
from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable

import torch

from accel import __version__

DRY_RUN_NAME = "dryrun"  # the "GPU name" in file names when no GPU was measured
_VENDOR_WORDS = {"nvidia", "geforce", "tesla", "quadro", "amd", "radeon"}
_MEMORY_WORDS = re.compile(r"^(\d+gb|hbm\d*e?|pcie|sxm\d*|nvl|gddr\d*x?)$")


def gpu_slug(name: str | None) -> str:
    """A short lower-case name for file names: ``'NVIDIA H200'`` -> ``'h200'``,
    ``'NVIDIA H100 80GB HBM3'`` -> ``'h100'``, ``'NVIDIA GeForce RTX 4090'`` -> ``'rtx-4090'``."""
    if not name:
        return DRY_RUN_NAME
    words = [word for word in re.split(r"[^0-9a-z]+", name.lower()) if word]
    kept = [word for word in words if word not in _VENDOR_WORDS and not _MEMORY_WORDS.match(word)]
    return "-".join(kept) or "gpu"


def _driver_version() -> str | None:
    if shutil.which("nvidia-smi"):
        try:
            result = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                    capture_output=True, text=True, timeout=20)
            if result.returncode == 0 and result.stdout.strip():
                return result.stdout.strip().splitlines()[0]
        except (OSError, subprocess.TimeoutExpired):
            pass
    try:  # nvidia-ml-py, where nvidia-smi is missing
        import pynvml

        pynvml.nvmlInit()
        version = pynvml.nvmlSystemGetDriverVersion()
        return version.decode() if isinstance(version, bytes) else version
    except Exception:  # noqa: BLE001 - the driver version is informative only
        return None


def _package_version(name: str) -> str | None:
    import importlib.metadata

    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment(dry_run: bool) -> dict:
    """The machine a record was made on: GPU name, driver, CUDA, torch and the rest."""
    gpu = None
    if not dry_run:
        try:
            properties = torch.cuda.get_device_properties(0)
            gpu = {"name": properties.name, "memory_gib": round(properties.total_memory / 2 ** 30, 1),
                   "multiprocessors": properties.multi_processor_count,
                   "capability": f"{properties.major}.{properties.minor}", "count": torch.cuda.device_count()}
        except Exception as error:  # noqa: BLE001 - a broken CUDA setup is reported by the parts, not hidden
            gpu = {"name": None, "error": f"{type(error).__name__}: {error}"}
    cupy = next((version for name in ("cupy-cuda13x", "cupy-cuda12x", "cupy") if (version := _package_version(name))),
                None)
    return {
        "dry_run": dry_run,
        "gpu": gpu,
        "gpu_name": gpu["name"] if gpu else None,
        "driver": _driver_version() if gpu else None,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if gpu and gpu["name"] else None,
        "torch": torch.__version__,
        "cupy": cupy,
        "accel": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "host": platform.node(),
        "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
    }


class Recorder:
    """A part's JSON record, rewritten atomically on every change.

    ``data["results"]`` holds named results, ``data["rows"]`` one dict per measurement; ``status`` is
    ``"running"`` until the part ends (``"ok"``, ``"failed"``; the runner writes ``"timed out"``).
    """

    def __init__(self, path: Path, part: str, environment: dict, budget_s: float):
        self.path = Path(path)
        self.data = {"part": part, "status": "running", "budget_s": budget_s, "elapsed_s": None, "error": None,
                     "environment": environment, "results": {}, "rows": [], "notes": []}
        self._start = time.monotonic()
        self.flush()

    def set(self, key: str, value) -> None:
        self.data["results"][key] = value
        self.flush()

    def row(self, **row) -> dict:
        self.data["rows"].append(row)
        self.flush()
        return row

    def note(self, text: str) -> None:
        print(f"  note: {text}", flush=True)
        self.data["notes"].append(text)
        self.flush()

    def finish(self, status: str, error: str | None = None) -> None:
        self.data.update(status=status, error=error, elapsed_s=round(time.monotonic() - self._start, 2))
        self.flush()

    def flush(self) -> None:
        write_json(self.path, self.data)


def write_json(path: Path, data) -> None:
    """Write ``data`` to ``path`` through a temporary file, so a reader never sees half a file."""
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(data, indent=1, default=str))
    os.replace(temporary, path)


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def median_seconds(function: Callable[[], object], repeats: int, device: torch.device, warmup: int = 1) -> float:
    """Median wall time of ``function`` over ``repeats`` runs after ``warmup`` runs, the device
    synchronized around each run (so asynchronous GPU work is counted)."""
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        function()
    synchronize()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        synchronize()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def interleaved_seconds(functions: dict[str, Callable[[], object]], repeats: int, device: torch.device,
                        warmup: int = 1) -> dict[str, float]:
    """Median wall time of each function, runs interleaved (a, b, a, b, ...) after ``warmup`` runs each,
    so drifting clocks or load hit every contender alike."""
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for function in functions.values():
        for _ in range(warmup):
            function()
    synchronize()
    samples: dict[str, list[float]] = {name: [] for name in functions}
    for _ in range(repeats):
        for name, function in functions.items():
            start = time.perf_counter()
            function()
            synchronize()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in samples.items()}


@contextlib.contextmanager
def float32_precision(tf32: bool, cudnn: bool = False):
    """TF32 on or off for CUDA matmuls (and cuDNN's convolutions and RNNs with ``cudnn``), put back as found
    afterwards. torch >= 2.9 has ``fp32_precision``, and reading the legacy ``allow_tf32`` after the new switch
    was set raises ("mix of the legacy and new APIs"); the engine uses the new one, so this must too."""
    saved = []
    try:
        for switch in (torch.backends.cuda.matmul, *((torch.backends.cudnn,) if cudnn else ())):
            name = "fp32_precision" if hasattr(switch, "fp32_precision") else "allow_tf32"
            saved.append((switch, name, getattr(switch, name)))
            setattr(switch, name, ("tf32" if tf32 else "ieee") if name == "fp32_precision" else tf32)
        yield
    finally:
        for switch, name, value in reversed(saved):
            setattr(switch, name, value)
