"""The host worker: computes tiles with torch on the host, so the whole engine (plan, cache, memory limit,
scheduling) runs and is tested without a GPU.

Host memory is its own memory: it reads a tile in place when no dtype conversion is needed (else copies it,
rounded, into a buffer of the accumulator dtype), reads C and accumulates straight into the host result.
Its account is charged as a GPU's would be.
"""
from __future__ import annotations

import os

import torch

from accel.ooc.cache import Tile
from accel.ooc.plan import DeviceProfile
from accel.ooc.workers.base import Worker, epilogue

#: Host worker: copies into its tile buffers run at memory speed, so transfers are never the bottleneck,
#: and it is synchronous, so neither extra blocks nor extra slabs buy any overlap.
CPU_PROFILE = DeviceProfile({"float64": 5e10, "float32": 1e11, "tf32": 1e11, "half": 5e10}, 1e10, 256,
                            blocks_per_worker=1, min_slabs=1, min_slab=64)


class CPUWorker(Worker):
    """Computes tiles with torch on the host (uses torch's intra-op threads).

    Tiles are the host views themselves when the operand is already in the accumulator dtype (fp32 or
    fp64 products); otherwise copies in the accumulator dtype holding values already rounded to the
    compute dtype, so a bfloat16/float16 product is exact and accumulated in float32, as on a GPU. TF32
    has no CPU counterpart: ``"tf32"`` computes in exact float32 here.
    """

    kind = "cpu"
    needs_output_tile = False  # C is read and the result written straight from host memory

    @classmethod
    def default_devices(cls) -> list[str]:
        return ["cpu"]

    @classmethod
    def check_device(cls, device: torch.device) -> torch.device:
        if device.index not in (None, 0):
            raise ValueError(f"device {str(device)!r} does not exist: the host is 'cpu'")
        return torch.device("cpu")

    @property
    def profile(self) -> DeviceProfile:
        return CPU_PROFILE

    def default_memory_limit(self) -> int:
        try:
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
            available = 8 << 30
        return max(available // 4, 64 << 20)  # the operands themselves live in the same memory

    def storage_size(self, storage_dtype, accumulator_dtype) -> int:
        return torch.empty((), dtype=accumulator_dtype).element_size()

    def load_tile(self, view, key, nbytes, problem) -> Tile:
        if view.dtype == problem.storage_dtype == problem.accumulator_dtype and 1 in view.stride():
            return Tile(key, view, nbytes)  # host memory is this worker's memory: BLAS reads the view in place
        tile = torch.empty(view.shape, dtype=problem.accumulator_dtype)
        if view.dtype != problem.storage_dtype:  # round to the compute dtype first (narrowing compute_dtype)
            view = view.to(problem.storage_dtype)
        tile.copy_(view)
        return Tile(key, tile, nbytes)

    def accumulator(self, problem, block) -> torch.Tensor:
        destination = problem.out[block.rows[0]:block.rows[1], block.cols[0]:block.cols[1]]
        if destination.dtype == problem.accumulator_dtype and destination.stride(1) == 1:
            return destination  # host memory is this worker's memory: accumulate in the result itself
        return super().accumulator(problem, block)

    def multiply_accumulate(self, acc, a, b, accumulate, problem) -> None:
        if accumulate:
            acc.addmm_(a.tensor, b.tensor)
        else:
            torch.mm(a.tensor, b.tensor, out=acc)

    def write_block(self, problem, block, acc) -> None:
        (r0, r1), (c0, c1) = block.rows, block.cols
        c_tile = None
        if problem.c is not None:  # read from host memory, which is this worker's memory (counted as read)
            c_tile = problem.c[r0:r1, c0:c1]
            self.bytes_to_device += c_tile.numel() * c_tile.element_size()
        epilogue(acc, c_tile, problem.alpha, problem.beta)
        destination = problem.out[r0:r1, c0:c1]
        if acc.data_ptr() != destination.data_ptr():
            destination.copy_(acc)
        self.bytes_to_host += acc.numel() * problem.out.element_size()
