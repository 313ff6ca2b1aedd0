"""The cuBLAS-XT baseline ships with the package (``accel.gpucheck.cublasxt``, which gpucheck runs from a pip install);
this name stays for the experiment scripts that import ``baselines.cublasxt``."""
from accel.gpucheck.cublasxt import CublasXt, library_candidates, load_libcublas

__all__ = ["CublasXt", "library_candidates", "load_libcublas"]
