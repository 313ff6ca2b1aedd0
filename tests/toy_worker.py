"""A toy worker type in one file, as a new accelerator's would be: device type ``privateuseone``, its
"device memory" host tensors, products done in float64 whatever the storage dtype (a different machine).

Registering it is all it takes for ``Engine(["privateuseone:0"])`` and ``accel.gemm(...,
devices=["privateuseone:0", "privateuseone:1"])`` to run on it: the engine and the plan name no device.
"""
import contextlib

import torch

from accel.ooc.cache import Tile
from accel.ooc.plan import DeviceProfile
from accel.ooc.workers import register_worker
from accel.ooc.workers.base import Worker, epilogue

TOY_DEVICES = 2
compute_modes_entered = []  # what the compute_mode hook saw, for the test


@register_worker
class ToyWorker(Worker):
    kind = "privateuseone"
    default_priority = -1  # never chosen by default over the CPU

    @classmethod
    def default_devices(cls):
        return [f"privateuseone:{i}" for i in range(TOY_DEVICES)]

    @classmethod
    def check_device(cls, device):
        index = device.index or 0
        if index >= TOY_DEVICES:
            raise ValueError(f"device {str(device)!r} does not exist: {TOY_DEVICES} toy devices")
        return torch.device(cls.kind, index)

    @classmethod
    def is_out_of_memory(cls, error):
        return super().is_out_of_memory(error) or "TOY_OOM" in str(error)

    @classmethod
    @contextlib.contextmanager
    def compute_mode(cls, problem):
        compute_modes_entered.append(problem.allow_tf32)
        yield

    @property
    def profile(self):
        return DeviceProfile({"float32": 1e10}, 1e9, min_block=16, blocks_per_worker=2, min_slabs=2)

    def default_memory_limit(self):
        return 1 << 20

    def storage_size(self, storage_dtype, accumulator_dtype):
        return 8

    def allocate(self, shape, dtype):
        return torch.empty(shape, dtype=dtype)

    def load_tile(self, view, key, nbytes, problem):
        return Tile(key, view.to(problem.storage_dtype).to(torch.float64), nbytes)

    def multiply_accumulate(self, acc, a, b, accumulate, problem):
        product = (a.tensor @ b.tensor).to(acc.dtype)
        acc.add_(product) if accumulate else acc.copy_(product)

    def write_block(self, problem, block, acc):
        (r0, r1), (c0, c1) = block.rows, block.cols
        c_tile = problem.c[r0:r1, c0:c1].to(acc.dtype) if problem.c is not None else None
        epilogue(acc, c_tile, problem.alpha, problem.beta)
        problem.out[r0:r1, c0:c1] = acc
        self.bytes_to_host += acc.numel() * problem.out.element_size()
