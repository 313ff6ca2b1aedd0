"""The hand-written LSTM step kernel (``accel/nn/recurrence/_csrc/lstm_step.cpp``), built at first use.

The fused recurrence's LSTM step on CPU is one ``addmm`` plus ~10 small torch ops forward and ~6
backward; this kernel does each step's elementwise work in one pass (``experiments/bt_recurrence.py``
measures the difference). It is compiled with the system C++ compiler (``$CXX``, else ``g++``) into a
per-user cache folder (``$ACCEL_KERNEL_DIR``, else the temp folder) and loaded with ``ctypes``: no torch
headers, so the build takes about a second. Where torch runs on OpenMP (``libgomp``), the kernel is
built with ``-fopenmp`` and shares that runtime, so it splits a step's rows over ``torch.get_num_threads()``
threads. When the source is absent, no compiler is found, the build fails, or ``ACCEL_KERNELS=0`` is set,
:func:`lstm_step` returns ``None`` and the torch-op step (the reference twin) runs; :data:`status`
says why.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

__all__ = ["lstm_step", "status", "SOURCE"]

SOURCE = Path(__file__).resolve().parent / "_csrc" / "lstm_step.cpp"  # package data: ships in the wheel
# no -ffast-math: it links crtfastmath.o, which sets flush-to-zero for the whole process on load; the
# kernel's own exp vectorises without it
FLAGS = ["-std=c++17", "-O3", "-march=native", "-fno-math-errno", "-shared", "-fPIC"]
_SUFFIX = {torch.float32: "f32", torch.float64: "f64"}
_library: ctypes.CDLL | None = None
status = "not built yet"
# whether the kernel splits a step's rows over OpenMP threads (set by the build)
parallel = False


def _shares_torch_openmp() -> bool:
    """Whether a library linked with -fopenmp would use torch's own OpenMP runtime: torch runs on OpenMP and
    a ``libgomp.so.1`` is already loaded, which the dynamic loader then reuses by its soname. Else a second
    runtime would start its own threads beside torch's: the kernel is then built without OpenMP threads."""
    if not sys.platform.startswith("linux") or not torch._C.has_openmp:
        return False
    try:
        return "/libgomp.so.1\n" in Path("/proc/self/maps").read_text()
    except OSError:
        return False


def _build() -> ctypes.CDLL | None:
    global status, parallel
    if os.environ.get("ACCEL_KERNELS", "1") == "0":
        status = "disabled by ACCEL_KERNELS=0"
        return None
    if not SOURCE.exists():
        status = f"source {SOURCE} not found"
        return None
    compiler = shutil.which(os.environ.get("CXX", "g++"))
    if compiler is None:
        status = f"no C++ compiler ({os.environ.get('CXX', 'g++')}) found"
        return None
    threads = _shares_torch_openmp()
    flags = FLAGS + ["-fopenmp" if threads else "-fopenmp-simd"]
    # -march=native: the binary is keyed by the machine as well as by the source and flags
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join(flags + [compiler, platform.node()]).encode()).hexdigest()
    folder = Path(os.environ.get("ACCEL_KERNEL_DIR", Path(tempfile.gettempdir()) / f"accel-kernels-{os.getuid()}"))
    target = folder / f"lstm_step-{key[:16]}.so"
    try:
        if not target.exists():
            folder.mkdir(parents=True, exist_ok=True)
            partial = folder / f"{target.name}.{os.getpid()}.tmp"
            subprocess.run([compiler, *flags, "-o", str(partial), str(SOURCE)], check=True, capture_output=True,
                           text=True, timeout=120)
            os.replace(partial, target)  # atomic: concurrent builders never load a half-written file
        library = ctypes.CDLL(str(target))
    except (OSError, subprocess.SubprocessError) as error:
        detail = getattr(error, "stderr", "") or error
        status = f"build or load failed: {str(detail)[:500]}"
        return None
    for suffix in _SUFFIX.values():
        for name, pointers in (("lstm_forward_step_", 7), ("lstm_backward_step_", 7)):
            function = getattr(library, name + suffix)  # rows, H, blocks, then the tensors
            function.argtypes = [ctypes.c_int64] * 3 + [ctypes.c_void_p] * pointers
            function.restype = None
    parallel = threads
    mode = "rows split over torch's OpenMP threads" if threads else "one thread"
    status = f"built: {target} ({mode})"
    return library


def lstm_step(dtype: torch.dtype):
    """``(forward, backward)`` step functions for ``dtype`` (float32 / float64), or ``None``."""
    global _library
    if dtype not in _SUFFIX:
        return None
    if _library is None and status == "not built yet":
        _library = _build()
    if _library is None:
        return None
    suffix = _SUFFIX[dtype]
    return getattr(_library, "lstm_forward_step_" + suffix), getattr(_library, "lstm_backward_step_" + suffix)


def pointer(tensor: torch.Tensor | None):
    """The address of a contiguous block (``None`` for an absent optional output)."""
    return None if tensor is None else tensor.data_ptr()
