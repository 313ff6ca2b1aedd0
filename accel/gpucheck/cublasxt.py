"""A small ctypes wrapper over NVIDIA cuBLAS-XT (``cublasXt*`` in libcublas), the out-of-core baseline that
``gpucheck``'s gemm part and ``experiments/gemm_bench.py`` measure against.

cuBLAS-XT tiles host matrices over GPUs with a static round-robin and no cache across calls; it handles
fp32/fp64/complex only. Following FACTS.md we pin the host memory ourselves and set the block size
explicitly (the benchmark sweeps it). cuBLAS is column-major, so the row-major ``C = A @ B`` is computed
as ``C^T = B^T @ A^T`` with the same buffers.

    >>> xt = CublasXt(devices=[0], block_dim=4096)
    >>> xt.gemm(A, B, C)     # A, B, C: row-major host torch tensors (float32/float64), C overwritten
    >>> xt.close()
"""
from __future__ import annotations

import ctypes
import ctypes.util
import glob
import os
import site
import sys

import torch

_OP_N = 0  # CUBLAS_OP_N
_PINNING_DISABLED = 0  # CUBLASXT_PINNING_DISABLED: the caller pins (we do)
_MAJORS = ("13", "12", "11")


def _site_directories() -> list[str]:
    """Where pip puts packages: beside torch first, then every site and sys.path directory."""
    found = [os.path.dirname(os.path.dirname(torch.__file__))]
    try:
        found += site.getsitepackages() + [site.getusersitepackages()]
    except AttributeError:  # pragma: no cover - virtualenvs without site.getsitepackages
        pass
    found += [entry for entry in sys.path if entry.endswith("-packages")]
    return list(dict.fromkeys(os.path.abspath(entry) for entry in found))


def _toolkit_directories() -> list[str]:
    roots = [os.environ.get(name) for name in ("CUDA_HOME", "CUDA_PATH")] + ["/usr/local/cuda"]
    roots += sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    found = [os.path.join(root, sub) for root in filter(None, roots) for sub in ("lib64", "lib", "targets/x86_64-linux/lib")]
    return found + ["/usr/lib/x86_64-linux-gnu", "/usr/lib64", "/usr/lib"]


def library_candidates(cuda_major: str | None, site_directories, toolkit_directories) -> list[str]:
    """libcublas files and sonames to try, torch's CUDA major first: the CUDA 13 wheel
    (``nvidia/cu13/lib/libcublas.so.13``), the CUDA 12/11 wheels (``nvidia/cublas/lib``), the sonames
    (a library torch already loaded is found by its soname), then the CUDA toolkit."""
    majors = sorted(_MAJORS, key=lambda major: major != cuda_major)
    candidates = []
    for directory in site_directories:
        for major in majors:
            candidates += [os.path.join(directory, "nvidia", f"cu{major}", "lib", f"libcublas.so.{major}"),
                           os.path.join(directory, "nvidia", "cublas", "lib", f"libcublas.so.{major}")]
    candidates += [f"libcublas.so.{major}" for major in majors] + ["libcublas.so"]
    for directory in toolkit_directories:
        candidates += [os.path.join(directory, f"libcublas.so.{major}") for major in majors]
        candidates.append(os.path.join(directory, "libcublas.so"))
    found = ctypes.util.find_library("cublas")
    if found:
        candidates.append(found)
    # a path is worth trying only if the file is there; a bare soname goes to the dynamic loader
    return list(dict.fromkeys(c for c in candidates if os.path.basename(c) == c or os.path.exists(c)))


def _torch_libcublas() -> list[str]:
    """The libcublas this process already loaded (torch's), read from /proc/self/maps."""
    try:
        for line in open("/proc/self/maps").read().splitlines():
            path = line.split()[-1]
            if "/libcublas.so" in path:
                return [path]
    except OSError:
        pass
    return []


def load_libcublas() -> ctypes.CDLL:
    """The first libcublas that loads and exports cuBLAS-XT (the one torch loaded last); OSError naming every
    place looked in."""
    cuda_major = (torch.version.cuda or "").split(".")[0] or None
    sites, toolkits = _site_directories(), _toolkit_directories()
    errors = []
    for name in library_candidates(cuda_major, sites, toolkits) + _torch_libcublas():
        try:
            library = ctypes.CDLL(name)
        except OSError as error:
            errors.append(f"{name}: {error}")
            continue
        if hasattr(library, "cublasXtCreate"):
            return library
        errors.append(f"{name}: loads but has no cublasXtCreate")
    raise OSError(f"no libcublas with cuBLAS-XT found (torch's CUDA: {torch.version.cuda}). Looked for "
                  f"nvidia/cu{{13,12,11}}/lib and nvidia/cublas/lib under {sites}, the sonames "
                  f"libcublas.so.{{13,12,11}}, and the toolkit directories {toolkits}; tried: "
                  + ("; ".join(errors) if errors else "nothing existed"))


class CublasXt:
    """cuBLAS-XT handle bound to ``devices`` with a fixed ``block_dim``.

    Args:
        devices (list[int]): CUDA device ids.
        block_dim (int): cuBLAS-XT tile side (``cublasXtSetBlockDim``).
    """

    def __init__(self, devices=(0,), block_dim: int = 4096):
        self.lib = load_libcublas()
        self.handle = ctypes.c_void_p()
        self._check(self.lib.cublasXtCreate(ctypes.byref(self.handle)), "cublasXtCreate")
        ids = (ctypes.c_int * len(devices))(*devices)
        self._check(self.lib.cublasXtDeviceSelect(self.handle, ctypes.c_int(len(devices)), ids), "cublasXtDeviceSelect")
        self._check(self.lib.cublasXtSetBlockDim(self.handle, ctypes.c_int(block_dim)), "cublasXtSetBlockDim")
        self._check(self.lib.cublasXtSetPinningMemMode(self.handle, ctypes.c_int(_PINNING_DISABLED)),
                    "cublasXtSetPinningMemMode")
        self.block_dim = block_dim

    @staticmethod
    def _check(status: int, what: str) -> None:
        if status != 0:
            raise RuntimeError(f"{what} failed with cublasStatus_t {status}")

    def gemm(self, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, alpha: float = 1.0, beta: float = 0.0):
        """``C = alpha * A @ B + beta * C`` on contiguous row-major host tensors (C is overwritten)."""
        if not (A.is_contiguous() and B.is_contiguous() and C.is_contiguous()):
            raise ValueError("cuBLAS-XT wrapper needs contiguous row-major A, B, C")
        if not (A.dtype == B.dtype == C.dtype) or A.dtype not in (torch.float32, torch.float64):
            raise TypeError(f"cuBLAS-XT handles float32/float64, got {A.dtype}, {B.dtype}, {C.dtype}")
        (m, k), (_, n) = A.shape, B.shape
        scalar = ctypes.c_float if A.dtype == torch.float32 else ctypes.c_double
        function = self.lib.cublasXtSgemm if A.dtype == torch.float32 else self.lib.cublasXtDgemm
        size = ctypes.c_size_t
        a, b = scalar(alpha), scalar(beta)
        # column-major view: C^T (n x m) = B^T (n x k) @ A^T (k x m)
        status = function(self.handle, ctypes.c_int(_OP_N), ctypes.c_int(_OP_N), size(n), size(m), size(k),
                          ctypes.byref(a), ctypes.c_void_p(B.data_ptr()), size(n), ctypes.c_void_p(A.data_ptr()),
                          size(k), ctypes.byref(b), ctypes.c_void_p(C.data_ptr()), size(n))
        self._check(status, "cublasXtSgemm" if A.dtype == torch.float32 else "cublasXtDgemm")
        return C

    def close(self) -> None:
        if self.handle:
            self.lib.cublasXtDestroy(self.handle)
            self.handle = ctypes.c_void_p()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False
