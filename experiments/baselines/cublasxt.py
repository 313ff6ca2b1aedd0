"""A small ctypes wrapper over NVIDIA cuBLAS-XT (``cublasXt*`` in libcublas), the out-of-core baseline.

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

import torch

_OP_N = 0  # CUBLAS_OP_N
_PINNING_DISABLED = 0  # CUBLASXT_PINNING_DISABLED: the caller pins (we do)


def load_libcublas() -> ctypes.CDLL:
    """libcublas from the system, the CUDA toolkit, or the nvidia-cublas wheel torch depends on."""
    candidates = ["libcublas.so", "libcublas.so.12", "libcublas.so.11", ctypes.util.find_library("cublas")]
    for base in [os.path.dirname(torch.__file__), *(os.environ.get("CUDA_HOME", "/usr/local/cuda"),)]:
        candidates += glob.glob(os.path.join(base, "..", "nvidia", "cublas", "lib", "libcublas.so*"))
        candidates += glob.glob(os.path.join(base, "lib64", "libcublas.so*"))
    errors = []
    for name in filter(None, candidates):
        try:
            return ctypes.CDLL(name)
        except OSError as error:
            errors.append(f"{name}: {error}")
    raise OSError("libcublas not found; tried " + "; ".join(errors or candidates))


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
