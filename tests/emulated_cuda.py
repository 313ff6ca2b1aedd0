"""A CPU stand-in for the CUDA runtime, strict where the real one is strict (used by test_gemm_cuda.py).

"Device" memory is host memory; copies and kernels run at once. What it checks, as CUDA and torch would:

* ``cudaMemcpy2DAsync``: pitches at least the row width and at most ``MAX_PITCH`` (else
  ``cudaErrorInvalidPitchValue``).
* ``mm``/``addmm`` with ``out_dtype``: the checks of torch's CUDA kernels (``aten/src/ATen/native/cuda/
  Blas.cpp``): same operand dtypes, ``out_dtype`` equal to theirs or float32 for half operands, ``out`` of
  that dtype, and ``addmm``'s ``self`` of the operands' dtype (torch before pytorch#167931,
  ``wider_self=False``) or also of ``out_dtype`` (after). CPU torch has no kernel for these overloads.
* Streams and events as vector clocks. A device operation touching bytes another stream's queued
  operation touches (one of them writing) must be ordered after it through ``wait_event`` on an event
  recorded after it; a host op must come after the host waited for it (``event.synchronize()``,
  ``stream.synchronize()``). So a staging buffer reused before its event, a tile multiplied before its
  copy, or an output tile overwritten while the previous block's copy-out reads it raises AssertionError.
* Device memory: what the worker allocates, any tensor a kernel creates on a stream, and torch's cuBLAS
  workspace, allocated on the first matmul of each (thread, stream) and never freed, as torch does.
* The worker's engine thread (``accel-ooc-*``) never copies into the host result or reads C on the host:
  those block-sized host copies belong to the worker's host thread.
"""
from __future__ import annotations

import contextlib
import ctypes
import itertools
import threading
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import accel.ooc.workers._cuda_runtime as cuda_runtime
import accel.ooc.workers.cuda as cuda_module

aten = torch.ops.aten
_MATMULS = (aten.mm, aten.addmm, aten.addmm_)
_HALF = (torch.float16, torch.bfloat16)


def byte_extent(tensor: torch.Tensor) -> tuple[int, int]:
    """Byte range [start, end) a strided tensor reads or writes."""
    if tensor.numel() == 0:
        return tensor.data_ptr(), tensor.data_ptr()
    span = sum((size - 1) * stride for size, stride in zip(tensor.shape, tensor.stride()) if size > 0) + 1
    return tensor.data_ptr(), tensor.data_ptr() + span * tensor.element_size()


def _overlaps(a, b) -> bool:
    return a[0] < b[1] and b[0] < a[1]


class FakeStream:
    """A stream as a vector clock: ``clock[s]`` is the last operation of stream ``s`` this stream's next
    operation is ordered after (its own, and others' through ``wait_event``)."""

    def __init__(self, runtime):
        self.runtime = runtime
        self.cuda_stream = next(runtime.ids)
        self.clock: dict[int, int] = {}
        runtime.streams[self.cuda_stream] = self

    def enqueue(self) -> int:
        position = self.clock.get(self.cuda_stream, 0) + 1
        self.clock[self.cuda_stream] = position
        return position

    def wait_event(self, event) -> None:
        _merge(self.clock, event.clock)

    def synchronize(self) -> None:
        self.runtime.host_knows(self.clock)


class FakeEvent:
    def __init__(self, runtime):
        self.runtime, self.clock = runtime, {}

    def record(self, stream=None) -> None:
        stream = stream or self.runtime.current_stream() or self.runtime.default_stream
        stream.enqueue()
        self.clock = dict(stream.clock)

    def synchronize(self) -> None:  # an event never recorded is complete: its clock is empty
        self.runtime.host_knows(self.clock)


def _merge(clock: dict, other: dict) -> None:
    for stream, position in other.items():
        clock[stream] = max(clock.get(stream, 0), position)


class DeviceMemory:
    """Live and peak "device" bytes of one worker, counted independently of the engine's account."""

    def __init__(self):
        self.live = self.peak = 0
        self._lock = threading.Lock()

    def charge(self, nbytes: int) -> None:
        with self._lock:
            self.live += nbytes
            self.peak = max(self.peak, self.live)

    def refund(self, nbytes: int) -> None:
        with self._lock:
            self.live -= nbytes

    def track(self, tensor: torch.Tensor, runtime: "Runtime | None" = None) -> torch.Tensor:
        storage = tensor.untyped_storage()
        nbytes, extent = storage.nbytes(), (storage.data_ptr(), storage.data_ptr() + storage.nbytes())
        self.charge(nbytes)
        weakref.finalize(tensor, self._free, nbytes, runtime, extent)
        return tensor

    def _free(self, nbytes, runtime, extent) -> None:
        self.refund(nbytes)
        if runtime is not None:  # the caching allocator reuses freed memory only after its streams' work
            runtime.forget(extent)


class Runtime:
    """Streams, events, pinned buffers and the device accesses not yet known to be ordered, of one device.

    Every access of a device operation is recorded as (bytes, stream, position, writes). A later device
    operation on another stream touching the same bytes (one of the two writing) must be ordered after it
    by ``wait_event``; a host op touching them must come after the host waited for it
    (``event.synchronize()``). Otherwise: AssertionError naming both.
    """

    def __init__(self, wider_self: bool = True):
        self.wider_self = wider_self
        self.ids = itertools.count(1)
        self.streams: dict[int, FakeStream] = {}
        self.default_stream = FakeStream(self)
        self.host_clock: dict[int, int] = {}
        self.accesses: list[tuple[tuple[int, int], int, int, bool]] = []  # (bytes, stream, position, writes)
        self.host_only: list[tuple[int, int]] = []  # the host result and C: not for the worker's engine thread
        self.workspaces: set = set()
        self._local = threading.local()
        self._lock = threading.RLock()
        self.memcpy2DAsync = self._memcpy_2d
        self.memcpyHostToDevice = 1

    # -- torch.cuda stand-ins ---------------------------------------------------------------------------------
    def current_stream(self) -> FakeStream | None:
        return getattr(self._local, "stream", None)

    @contextlib.contextmanager
    def stream(self, stream):
        previous, self._local.stream = self.current_stream(), stream
        try:
            yield stream
        finally:
            self._local.stream = previous

    def pinned_bytes(self, nbytes: int) -> torch.Tensor:
        buffer = torch.empty(nbytes, dtype=torch.uint8)
        self.pin(buffer)
        return buffer

    def pin(self, tensor: torch.Tensor) -> None:
        """Count ``tensor``'s memory as pinned host memory (forgotten when it is freed)."""
        storage = tensor.untyped_storage()
        weakref.finalize(tensor, self.forget, (storage.data_ptr(), storage.data_ptr() + storage.nbytes()))

    def forget(self, extent) -> None:
        with self._lock:
            self.accesses = [access for access in self.accesses if not _overlaps(access[0], extent)]

    def host_knows(self, clock: dict) -> None:
        """The host waited for these operations: later work of any stream comes after them."""
        with self._lock:
            _merge(self.host_clock, clock)
            self.accesses = [access for access in self.accesses if access[2] > self.host_clock.get(access[1], 0)]

    # -- accesses -----------------------------------------------------------------------------------------------
    def _conflicts(self, extent, writes, ordered):
        for other, stream, position, other_writes in self.accesses:
            if (writes or other_writes) and _overlaps(extent, other) and not ordered(stream, position):
                return stream, position, other_writes
        return None

    def device_access(self, stream: FakeStream, accesses) -> None:
        """A device operation on ``stream`` reading/writing these byte ranges."""
        with self._lock:
            for extent, writes in accesses:
                conflict = self._conflicts(extent, writes, lambda other, position: other == stream.cuda_stream or
                                           stream.clock.get(other, 0) >= position)
                if conflict:
                    raise AssertionError(
                        f"stream {stream.cuda_stream} {'writes' if writes else 'reads'} bytes {extent} that stream "
                        f"{conflict[0]} {'writes' if conflict[2] else 'reads'} in its operation {conflict[1]}, "
                        f"without waiting for an event recorded after it")
            position = stream.enqueue()
            self.accesses += [(extent, stream.cuda_stream, position, writes) for extent, writes in accesses]

    def host_access(self, accesses) -> None:
        with self._lock:
            for extent, writes in accesses:
                conflict = self._conflicts(extent, writes, lambda other, position: False)
                if conflict:
                    raise AssertionError(
                        f"the host {'wrote' if writes else 'read'} bytes {extent} while a device operation queued "
                        f"on stream {conflict[0]} (operation {conflict[1]}, {'writing' if conflict[2] else 'reading'}"
                        f" them) was not waited for: synchronize its event before reusing a staging buffer")
        if threading.current_thread().name.startswith("accel-ooc-"):
            for extent, _writes in accesses:
                if any(_overlaps(extent, region) for region in self.host_only):
                    raise AssertionError("the worker's engine thread copied the host result or C on the host: "
                                         "that stalls its tile pipeline at every block")

    def _memcpy_2d(self, dst, dpitch, src, spitch, width, height, kind, stream):
        """cudaMemcpy2DAsync: ``height`` rows of ``width`` bytes, pitches checked as CUDA does."""
        if not (width <= dpitch <= cuda_module.MAX_PITCH and width <= spitch <= cuda_module.MAX_PITCH):
            raise RuntimeError(f"cudaErrorInvalidPitchValue: dpitch {dpitch}, spitch {spitch}, width {width}")
        self.device_access(self.streams[stream], [((src, src + spitch * (height - 1) + width), False),
                                                  ((dst, dst + dpitch * (height - 1) + width), True)])
        for row in range(height):
            ctypes.memmove(dst + row * dpitch, src + row * spitch, width)


# -- the CUDA kernels CPU torch lacks, with CUDA's checks ---------------------------------------------------------
def _check(condition: bool, message: str) -> None:
    if not condition:
        raise RuntimeError(message)


def _check_out_dtype(mat1, mat2, out_dtype, out) -> None:
    _check(mat1.dtype == mat2.dtype, f"mat1 and mat2 must have the same dtype, but got {mat1.dtype} and {mat2.dtype}")
    _check(out_dtype == mat1.dtype or (out_dtype == torch.float32 and mat1.dtype in _HALF),
           "out_dtype must be the same as input dtype or fp32 for fp16/bf16 inputs")
    _check(out is None or out.dtype == out_dtype, "out_dtype must be the same as the dtype of the provided out tensor")


def _product(mat1, mat2, out_dtype):
    return torch.mm(mat1.to(out_dtype), mat2.to(out_dtype))  # exact products, out_dtype accumulation


def _mm_dtype(runtime, self_, mat2, out_dtype, out=None):
    _check_out_dtype(self_, mat2, out_dtype, out)
    result = _product(self_, mat2, out_dtype)
    return result if out is None else out.copy_(result)


def _addmm_dtype(runtime, self_, mat1, mat2, out_dtype, beta=1, alpha=1, out=None):
    if runtime.wider_self:
        _check(self_.dtype in (out_dtype, mat1.dtype), "self dtype must match either out_dtype or mat1 dtype")
    else:
        _check(self_.dtype == mat2.dtype, f"self and mat2 must have the same dtype, but got {self_.dtype} and "
                                          f"{mat2.dtype}")
    _check_out_dtype(mat1, mat2, out_dtype, out)
    result = beta * self_.to(out_dtype) + alpha * _product(mat1, mat2, out_dtype)
    return result if out is None else out.copy_(result)


_KERNELS = {aten.mm.dtype: _mm_dtype, aten.mm.dtype_out: _mm_dtype,
            aten.addmm.dtype: _addmm_dtype, aten.addmm.dtype_out: _addmm_dtype}


class Checks(TorchDispatchMode):
    """Watches every torch op a worker runs (entered on each thread the worker uses)."""

    def __init__(self, runtime: Runtime, memory: DeviceMemory):
        super().__init__()
        self.runtime, self.memory = runtime, memory

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        schema = func._schema
        returns_view = any(r.alias_info is not None and not r.alias_info.is_write for r in schema.returns)
        stream = self.runtime.current_stream()
        named = dict(zip((a.name for a in schema.arguments), args)) | kwargs
        if not returns_view:  # a view touches no data
            accesses = []
            for argument in schema.arguments:
                value = named.get(argument.name)
                if isinstance(value, torch.Tensor):
                    writes = argument.alias_info is not None and argument.alias_info.is_write
                    accesses.append((byte_extent(value), writes))
            if stream is None:
                self.runtime.host_access(accesses)
            else:
                self.runtime.device_access(stream, accesses)
                if func.overloadpacket in _MATMULS:
                    self._workspace(stream)
        if func in _KERNELS:
            named["self_"] = named.pop("self")
            result = _KERNELS[func](self.runtime, **named)
        else:
            result = func(*args, **kwargs)
        fresh = stream is not None and not returns_view and all(r.alias_info is None for r in schema.returns)
        computed = any(isinstance(value, torch.Tensor) for value in named.values())  # not a factory (allocate)
        if fresh and computed and isinstance(result, torch.Tensor):  # a kernel allocated its output on the device
            self.memory.track(result, self.runtime)
        return result

    def _workspace(self, stream) -> None:
        key = (threading.get_ident(), stream.cuda_stream)
        if key not in self.runtime.workspaces:
            self.runtime.workspaces.add(key)
            self.memory.charge(cuda_module.cublas_workspace_bytes((9, 0)))


def install(monkeypatch, runtime: Runtime) -> None:
    """Replace torch.cuda's streams, events and pinning by ``runtime``'s for one test."""
    monkeypatch.setattr(torch.cuda, "Stream", lambda *args, **kwargs: FakeStream(runtime))
    monkeypatch.setattr(torch.cuda, "Event", lambda *args, **kwargs: FakeEvent(runtime))
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "stream", runtime.stream)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(torch.Tensor, "record_stream", lambda self, stream: None)
    monkeypatch.setattr(cuda_runtime, "pinned_bytes", runtime.pinned_bytes)
    monkeypatch.setattr(cuda_runtime, "_accepts_float32_self", {})
