"""The hand-written LSTM step kernel (``_csrc/lstm_step.cpp``, package data), built at first use.

The fused recurrence's LSTM step on CPU is one ``mm`` plus about ten small torch ops forward and six backward;
this kernel does each step's elementwise work in one pass. It is compiled with the system C++ compiler
(``$CXX``, else ``g++``) and loaded with ``ctypes``: no torch headers, so the build is short and the same from a
pip install as from the checkout. Where torch runs on OpenMP (``libgomp``), the kernel is built with
``-fopenmp`` and shares that runtime, so it splits a step's rows over ``torch.get_num_threads()`` threads.

What is loaded, and from where:

- The cache folder is ``$ACCEL_KERNEL_DIR``, else ``$XDG_CACHE_HOME/accel/kernels``, else
  ``~/.cache/accel/kernels``. It is created with mode 0700; a folder owned by another user or writable by group
  or others is refused (the kernel is then not used), since anyone who can write there could plant code that
  every accel process runs.
- The library's name carries a SHA-256 of the source, the compiler, the flags and the machine. At build time
  the SHA-256 of the built library is written beside it (``<name>.sha256``); before loading, the library is
  read through one file descriptor that must be a regular file owned by this user, and its digest must match
  the record. A mismatch (a stale, truncated or replaced file), a missing record, or a library without the
  kernel's entry points is rebuilt once.
- A build writes to a unique temporary name in the same folder, loads that file, and publishes it with an
  atomic rename: two processes building at once each load a complete file of their own.

The wrapper checks every argument before the raw pointers reach the C code (:class:`KernelArgumentError`, a
``ValueError`` naming the argument). When the kernel cannot be used (no source, no compiler, a failed build,
an unsafe folder), :func:`lstm_step` returns ``None``, the torch-op step (the reference twin) runs, and the
user is told once, through the ``accel.nn.recurrence`` logger and :func:`warnings.warn`, why and what it costs.
``ACCEL_KERNELS=0`` turns the kernel off without that warning. :func:`kernel_status` says whether the kernel
is in use and why not.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import NamedTuple

import torch

__all__ = ["KernelArgumentError", "KernelStatus", "SOURCE", "kernel_status", "lstm_step", "status"]

logger = logging.getLogger("accel.nn.recurrence")

SOURCE = Path(__file__).resolve().parent / "_csrc" / "lstm_step.cpp"
# no -ffast-math: it links crtfastmath.o, which sets flush-to-zero for the whole process on load; the
# kernel's own exp vectorises without it
FLAGS = ["-std=c++17", "-O3", "-march=native", "-fno-math-errno", "-shared", "-fPIC"]
_SUFFIX = {torch.float32: "f32", torch.float64: "f64"}
_ENTRY_POINTS = [name + suffix for suffix in _SUFFIX.values() for name in ("lstm_forward_step_", "lstm_backward_step_")]
_BUILD_TIMEOUT_S = 300
# temporary files older than this are left over from a killed build (a live build is bounded by the timeout)
_STALE_TEMPORARY_S = 2 * _BUILD_TIMEOUT_S
_COST = ("BTLSTM's CPU recurrence runs its torch-op step instead, which is slower (roughly 1.3x per training "
         "step at 64->256, T=100, batch 32); set ACCEL_KERNELS=0 to choose that path without this warning")

_library: ctypes.CDLL | None = None
_steps: dict[torch.dtype, tuple] = {}
_told = False
_lock = threading.Lock()  # one build per process, whichever thread comes first
status = "not built yet"
# the loaded library's path (None while not in use)
path: Path | None = None
# whether the kernel splits a step's rows over OpenMP threads (set by the build)
parallel = False


class KernelStatus(NamedTuple):
    """Whether the CPU LSTM step kernel is in use; ``reason`` is the loaded library's path when it is, else why
    not."""
    in_use: bool
    reason: str


class KernelArgumentError(ValueError):
    """An argument of the LSTM step kernel that it cannot take (named in the message)."""


def kernel_status() -> KernelStatus:
    """Whether BTLSTM's CPU recurrence runs the hand-written step kernel, building it if not tried yet.

    Returns ``KernelStatus(True, <path of the loaded library>)`` or ``KernelStatus(False, <why not>)``."""
    library = _ensure_loaded()
    return KernelStatus(True, str(path)) if library is not None else KernelStatus(False, status)


def lstm_step(dtype: torch.dtype):
    """``(forward, backward)`` step functions for ``dtype`` (float32 / float64), or ``None`` when the kernel is
    not in use or has no variant for ``dtype``.

    ``forward(rows, H, blocks, inputs, hidden, bias, gates, c_prev, c_out, h_out)`` and
    ``backward(rows, H, blocks, dh, dc, gates, cell, c_prev, grad_gates, grad_bias)`` take CPU tensors of
    ``dtype``, each contiguous, of which the kernel reads or writes the first ``rows`` rows (the first
    ``blocks`` of ``grad_bias``); see ``_csrc/lstm_step.cpp`` for what each holds. A tensor that does not fit
    raises :class:`KernelArgumentError` before the kernel runs."""
    if dtype not in _SUFFIX:
        return None
    steps = _steps.get(dtype)
    if steps is None:
        library = _ensure_loaded()
        if library is None:
            return None
        suffix = _SUFFIX[dtype]
        steps = (_CheckedStep(library["lstm_forward_step_" + suffix], dtype, _FORWARD),
                 _CheckedStep(library["lstm_backward_step_" + suffix], dtype, _BACKWARD))
        _steps[dtype] = steps
    return steps


# ---------------------------------------------------------------------------------------- checked arguments

# each tensor argument: its name, and its shape in units of (rows, H): "rows" a leading dimension of at least
# the running rows, "blocks" at least the row blocks, an int a multiple of H, None no leading dimension
_FORWARD = ("lstm forward step", (("inputs", "rows", 4), ("hidden", "rows", 4), ("bias", None, 4),
                                  ("gates", "rows", 4), ("c_prev", "rows", 1), ("c_out", "rows", 1),
                                  ("h_out", "rows", 1)))
_BACKWARD = ("lstm backward step", (("dh", "rows", 1), ("dc", "rows", 1), ("gates", "rows", 4),
                                    ("cell", "rows", 1), ("c_prev", "rows", 1), ("grad_gates", "rows", 4),
                                    ("grad_bias", "blocks", 4)))


class _CheckedStep:
    """One kernel entry point behind argument checks: the C code trusts every pointer and size it gets."""

    def __init__(self, function, dtype: torch.dtype, signature):
        function.argtypes = [ctypes.c_int64] * 3 + [ctypes.c_void_p] * len(signature[1])
        function.restype = None
        self._function, self._dtype = function, dtype
        self._name, self._tensors = signature
        # per tensor: 1 (leading dimension >= rows), 2 (>= blocks) or 0 (none), and its width in units of H
        self._layout = [({"rows": 1, "blocks": 2, None: 0}[leading], width) for _, leading, width in signature[1]]

    def __call__(self, rows, H, blocks, *tensors):
        # a bool or a float is no size here, hence type() rather than isinstance
        if (type(rows) is not int or type(H) is not int or type(blocks) is not int or rows < 0 or H < 0
                or blocks < 1 or len(tensors) != len(self._layout)):
            self._refuse_sizes(rows, H, blocks, tensors)
        dtype, pointers, bad = self._dtype, [], None
        try:
            for index, (tensor, (leading, width)) in enumerate(zip(tensors, self._layout)):
                if leading:
                    length, columns = tensor.shape
                    fits = length >= (rows if leading == 1 else blocks)
                else:
                    (columns,) = tensor.shape
                    fits = True
                if not (fits and columns == width * H and tensor.dtype is dtype and tensor.is_cpu
                        and tensor.is_contiguous()):
                    bad = index
                    break
                pointers.append(tensor.data_ptr())
        except (AttributeError, TypeError, ValueError):  # not a tensor, or not of the expected number of dimensions
            bad = len(pointers)
        if bad is not None:
            name, leading, width = self._tensors[bad]
            raise KernelArgumentError(self._explain(name, tensors[bad], leading, width, rows, H, blocks))
        self._function(rows, H, blocks, *pointers)

    def _refuse_sizes(self, rows, H, blocks, tensors):
        if len(tensors) != len(self._layout):
            raise KernelArgumentError(f"{self._name}: takes rows, H, blocks and {len(self._layout)} tensors "
                                      f"({', '.join(name for name, _, _ in self._tensors)}), got {len(tensors)}")
        for name, value, least in (("rows", rows, 0), ("H", H, 0), ("blocks", blocks, 1)):
            if type(value) is not int or value < least:
                raise KernelArgumentError(f"{self._name}: argument {name!r} must be an int >= {least}, "
                                          f"got {value!r}")

    def _explain(self, name, tensor, leading, width, rows, H, blocks) -> str:
        columns = f"{width}*H={width * H}" if width > 1 else f"H={H}"
        expected = (f"({columns},)" if leading is None
                    else f"(at least {'rows' if leading == 'rows' else 'blocks'}="
                         f"{rows if leading == 'rows' else blocks}, {columns})")
        prefix = f"{self._name}: argument {name!r}"
        if not isinstance(tensor, torch.Tensor):
            return f"{prefix} must be a torch.Tensor, got {type(tensor).__name__}"
        if tensor.dtype is not self._dtype:
            return f"{prefix} has dtype {tensor.dtype}; every tensor of this call must be {self._dtype}"
        if not tensor.is_cpu:
            return f"{prefix} is on {tensor.device}; the kernel runs on CPU tensors only"
        if not tensor.is_contiguous():
            return f"{prefix} is not contiguous (shape {tuple(tensor.shape)}, strides {tensor.stride()})"
        return f"{prefix} has shape {tuple(tensor.shape)}, expected {expected}"


# ---------------------------------------------------------------------------------------- build and load

def _ensure_loaded() -> ctypes.CDLL | None:
    global _library
    if _library is None and status == "not built yet":
        with _lock:
            if _library is None and status == "not built yet":
                _library = _load()
                if _library is None:
                    _tell_once()
    return _library


def _tell_once() -> None:
    global _told
    if _told or status.startswith("disabled by"):
        return
    _told = True
    message = f"accel: the CPU LSTM step kernel is not in use: {status}. {_COST}."
    logger.warning(message)
    warnings.warn(message, RuntimeWarning, stacklevel=4)


def _shares_torch_openmp() -> bool:
    """Whether a library linked with -fopenmp would use torch's own OpenMP runtime: torch runs on OpenMP and
    a ``libgomp.so.1`` is already loaded, which the dynamic loader then reuses by its soname. Else a second
    runtime would start its own threads beside torch's: the kernel is then built without OpenMP threads."""
    if not sys.platform.startswith("linux") or not torch.backends.openmp.is_available():
        return False
    try:
        return "/libgomp.so.1\n" in Path("/proc/self/maps").read_text()
    except OSError:
        return False


def cache_folder() -> Path:
    """Where the kernel is built: ``$ACCEL_KERNEL_DIR``, else ``$XDG_CACHE_HOME/accel/kernels``, else
    ``~/.cache/accel/kernels`` (the temp folder's ``accel-kernels-<uid>`` where there is no home folder)."""
    configured = os.environ.get("ACCEL_KERNEL_DIR")
    if configured:
        return Path(configured)
    base = os.environ.get("XDG_CACHE_HOME")
    if not base:
        try:
            base = str(Path.home() / ".cache")
        except (KeyError, RuntimeError):
            return Path(tempfile.gettempdir()) / f"accel-kernels-{os.getuid()}"
    return Path(base) / "accel" / "kernels"


def _unsafe_folder(folder: Path) -> str | None:
    """Why ``folder`` may not hold the kernel (``None``: it may), creating it 0700 where it is missing."""
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = os.stat(folder)  # what a symbolic link points to: where the files land
    except OSError as error:
        return f"cannot create the cache folder {folder}: {error}"
    if not stat.S_ISDIR(info.st_mode):
        return f"the cache folder {folder} is not a folder"
    if info.st_uid != os.getuid():
        return (f"the cache folder {folder} is owned by uid {info.st_uid}, not by this user (uid {os.getuid()}); "
                "set ACCEL_KERNEL_DIR to a folder of your own")
    if info.st_mode & 0o022:
        return (f"the cache folder {folder} is writable by group or others (mode {stat.S_IMODE(info.st_mode):o}); "
                "make it 0700 or set ACCEL_KERNEL_DIR to a folder of your own")
    return None


def _own_file_bytes(file: Path) -> bytes:
    """The bytes of ``file``, read through one descriptor that must be a regular file (not a link) owned by this
    user and not writable by group or others; ``OSError`` / ``ValueError`` when not."""
    descriptor = os.open(file, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    with os.fdopen(descriptor, "rb") as handle:
        info = os.fstat(handle.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise ValueError(f"{file} is not a regular file")
        if info.st_uid != os.getuid():
            raise ValueError(f"{file} is owned by uid {info.st_uid}, not by this user")
        if info.st_mode & 0o022:
            raise ValueError(f"{file} is writable by group or others")
        return handle.read()


def _cached_problem(target: Path, record: Path) -> str | None:
    """Why the cached library may not be loaded (``None``: it matches the digest recorded when it was built)."""
    if not target.exists() and not target.is_symlink():
        return "not built yet"
    try:
        digest = hashlib.sha256(_own_file_bytes(target)).hexdigest()
    except (OSError, ValueError) as error:
        return f"cannot be verified ({error})"
    try:
        recorded = _own_file_bytes(record).decode("ascii", "replace").strip()
    except (OSError, ValueError) as error:
        return f"has no usable SHA-256 record ({error})"
    if digest != recorded:
        return "its SHA-256 differs from the one recorded when it was built"
    return None


def _open(file: Path) -> tuple[ctypes.CDLL | None, str | None]:
    """The library at ``file`` with every kernel entry point, or ``None`` and why not."""
    try:
        library = ctypes.CDLL(str(file))
    except OSError as error:
        return None, f"cannot be loaded ({error})"
    missing = [name for name in _ENTRY_POINTS if not hasattr(library, name)]
    if missing:
        return None, f"lacks the kernel's entry points {', '.join(missing)}"
    return library, None


def _write_atomically(file: Path, data: bytes) -> None:
    descriptor, partial = tempfile.mkstemp(prefix=file.name + ".", suffix=".tmp", dir=file.parent)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(partial, file)
    except BaseException:
        Path(partial).unlink(missing_ok=True)
        raise


def _remove_stale_temporaries(folder: Path) -> None:
    """Temporary files of builds that were killed (a live build's are younger than its timeout)."""
    now = time.time()
    for leftover in folder.glob("lstm_step-*.tmp"):
        try:
            if now - leftover.lstat().st_mtime > _STALE_TEMPORARY_S:
                leftover.unlink()
        except OSError:
            pass


def _compile(compiler: str, flags: list[str], target: Path, record: Path) -> tuple[ctypes.CDLL | None, str]:
    """Build into a temporary file beside ``target``, load that file, then publish it and its digest by
    rename; returns the library (or ``None``) and what happened."""
    descriptor, partial_name = tempfile.mkstemp(prefix=target.name + ".", suffix=".tmp", dir=target.parent)
    os.close(descriptor)
    partial = Path(partial_name)
    try:
        try:
            subprocess.run([compiler, *flags, "-o", str(partial), str(SOURCE)], check=True, capture_output=True,
                           text=True, timeout=_BUILD_TIMEOUT_S)
        except subprocess.CalledProcessError as error:
            return None, f"the build failed ({compiler}): {(error.stderr or '').strip()[:500]}"
        except (OSError, subprocess.SubprocessError) as error:
            return None, f"the build failed ({compiler}): {error}"
        try:
            os.chmod(partial, 0o700)  # the linker's mode follows the umask, which may let the group write
            built = _own_file_bytes(partial)
        except (OSError, ValueError) as error:
            return None, f"the built library cannot be read back ({error})"
        library, problem = _open(partial)  # this process's own complete build, whatever others publish
        if library is None:
            return None, f"the freshly built library {problem}"
        try:
            os.replace(partial, target)
            _write_atomically(record, hashlib.sha256(built).hexdigest().encode("ascii") + b"\n")
        except OSError as error:  # in use all the same: only the next process must build again
            logger.warning("accel: the CPU LSTM step kernel could not be cached in %s: %s", target.parent, error)
        return library, "built"
    finally:
        partial.unlink(missing_ok=True)


def _load() -> ctypes.CDLL | None:
    global status, parallel, path
    if os.environ.get("ACCEL_KERNELS", "1") == "0":
        status = "disabled by ACCEL_KERNELS=0"
        return None
    if not hasattr(os, "getuid"):
        status = f"not supported on {sys.platform} (it needs a POSIX system)"
        return None
    if not SOURCE.exists():
        status = f"its source {SOURCE} is missing from the installed package"
        return None
    compiler = shutil.which(os.environ.get("CXX", "g++"))
    if compiler is None:
        status = f"no C++ compiler ({os.environ.get('CXX', 'g++')}) found; install g++ or set CXX"
        return None
    folder = cache_folder()
    unsafe = _unsafe_folder(folder)
    if unsafe is not None:
        status = unsafe
        return None
    threads = _shares_torch_openmp()
    flags = FLAGS + ["-fopenmp" if threads else "-fopenmp-simd"]
    # -march=native: the binary is keyed by the machine as well as by the source and flags
    key = hashlib.sha256(SOURCE.read_bytes() + "\0".join(
        flags + [compiler, platform.node(), platform.machine(), _cpu_flags()]).encode()).hexdigest()
    target = folder / f"lstm_step-{key[:32]}.so"
    record = folder / f"{target.name}.sha256"
    problem = _cached_problem(target, record)
    library = None
    if problem is None:
        library, problem = _open(target)
    if library is None:
        if problem != "not built yet":
            logger.warning("accel: the cached CPU LSTM step kernel %s is not used: it %s; rebuilding it", target,
                           problem)
        _remove_stale_temporaries(folder)
        library, outcome = _compile(compiler, flags, target, record)
        if library is None:
            status = outcome
            return None
    parallel = threads
    path = target
    status = f"in use: {target} ({'rows split over torch OpenMP threads' if threads else 'one thread'})"
    return library


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor()
