"""``OutOfCoreLinear``: a linear layer whose weight (and its gradient) live in host memory.

Forward and backward are out-of-core GEMMs on an :class:`accel.ooc.Engine`, so a weight larger than any
GPU trains with an ordinary torch optimizer.

Tiles and their lifetime: each forward opens a :class:`~accel.ooc.engine.CacheScope` and the matching
backward closes it. Within it the tiles of the weight, the input and the output gradient are loaded
once and reused (forward reads ``W^T``, backward ``W``: tiles are keyed in the weight's own coordinates
and cut on one square grid, so they match). Nothing is reused across an optimizer step or any other
boundary where the weight may change, so no write path (fused optimizers, ``.data``, NumPy views,
collectives, ``load_state_dict``) can make a tile stale.
"""
from __future__ import annotations

import math
import threading

import torch
from torch import nn

from accel.ooc import Engine
from accel.ooc.call import gemm_call
from accel.ooc.plan import MIN_TILE, working_set_bytes

#: share of each device's default budget that the layers' shared default engine takes
DEFAULT_MEMORY_FRACTION = 0.25
_shared_engines: dict = {}
_shared_engines_lock = threading.Lock()


def shared_engine(devices=None) -> Engine:
    """The engine all ``OutOfCoreLinear`` layers on ``devices`` share when given no ``memory_limit``:
    a quarter of what :func:`accel.gemm` would take on each device, one budget for all of them."""
    key = None if devices is None else tuple(str(device) for device in devices)
    with _shared_engines_lock:
        if key not in _shared_engines:
            _shared_engines[key] = Engine(devices, default_memory_fraction=DEFAULT_MEMORY_FRACTION)
        return _shared_engines[key]


def tile_side(engine: Engine, rows: int, in_features: int, out_features: int, dtype: torch.dtype) -> int:
    """Side of the square tile grid shared by the layer's three GEMMs (forward ``x W^T``, backward
    ``g W`` and ``g^T x``): the largest whose working set takes at most half of the smallest worker budget,
    the other half caching the call's tiles for reuse."""
    element = torch.empty((), dtype=dtype).element_size()
    accumulator = max(element, 4)
    operand = max(worker.storage_size(dtype, torch.float64 if element == 8 else torch.float32)
                  for worker in engine.workers)
    budget = min(worker.account.limit for worker in engine.workers) // 2
    sizes = dict(operand_size=operand, accumulator_size=accumulator, output_size=element)
    shapes = [(rows, out_features, in_features), (rows, in_features, out_features),
              (out_features, in_features, rows)]

    def fits(side):
        return all(working_set_bytes(min(m, side), min(n, side), min(k, side), **sizes) <= budget
                   for m, n, k in shapes)

    low, high = MIN_TILE, max(rows, in_features, out_features, MIN_TILE)
    while low < high:
        middle = (low + high + 1) // 2
        low, high = (middle, high) if fits(middle) else (low, middle - 1)
    return low


class _OutOfCoreLinearFunction(torch.autograd.Function):
    """``y = x W^T + b`` on the engine; the backward's GEMMs are differentiable (double backward)."""

    @staticmethod
    def forward(ctx, rows, weight, bias, engine, side, backward_follows):
        scope = engine.cache_scope()
        out = gemm_call(engine, rows, weight, bias, beta=0.0 if bias is None else 1.0, trans_b=True, block=side,
                        cache_scope=scope)
        ctx.save_for_backward(rows, weight)
        ctx.engine, ctx.side, ctx.scope, ctx.has_bias = engine, side, scope, bias is not None
        if not backward_follows:  # no graph: nothing will read these tiles again
            scope.close()
        return out

    @staticmethod
    def backward(ctx, grad):
        rows, weight = ctx.saved_tensors
        engine, scope = ctx.engine, ctx.scope
        scope = None if scope.closed else scope
        grad_rows = grad_weight = grad_bias = None
        try:  # grad_rows first: it reads the weight tiles the forward left in the scope
            if ctx.needs_input_grad[0]:
                grad_rows = gemm_call(engine, grad, weight, block=ctx.side, cache_scope=scope)
            if ctx.needs_input_grad[1]:
                grad_weight = gemm_call(engine, grad, rows, trans_a=True, block=ctx.side, cache_scope=scope)
            if ctx.has_bias and ctx.needs_input_grad[2]:
                grad_bias = grad.sum(0)
        finally:  # the weight may change from here on (the optimizer step): its tiles go
            if scope is not None:
                scope.close()
        return grad_rows, grad_weight, grad_bias, None, None, None


class OutOfCoreLinear(nn.Module):
    r"""Applies ``y = x W^T + b`` with ``W`` kept in host memory and the matmuls done out of core.

    Behaves like :class:`torch.nn.Linear` (same parameters, initialisation and shapes), but the weight,
    the bias and their gradients stay on the CPU whatever the device of the input; the products run
    on ``devices`` within ``memory_limit`` bytes per device. The output goes to the input's device.

    Args:
        in_features (int): size of each input sample.
        out_features (int): size of each output sample.
        bias (bool): learn an additive bias (default ``True``).
        devices (sequence, optional): devices for the GEMMs (see :class:`accel.ooc.Engine`); default
            every visible GPU, else the CPU.
        memory_limit (int, optional): bytes per device for this layer's own engine. Default: the layer
            uses the engine shared by every ``OutOfCoreLinear`` on the same ``devices`` made without a
            limit, which takes a quarter of what :func:`accel.gemm` would (a quarter of 90% of a GPU's
            free memory), one budget for all those layers, leaving the rest to the model.
        dtype (torch.dtype, optional): parameter dtype (default: torch's default dtype).
        engine (accel.ooc.Engine, optional): use this engine (and its budget); then ``devices`` and
            ``memory_limit`` stay unset.

    Tiles live from a forward to the end of its backward (see the module docstring): nothing is cached
    across optimizer steps. Autograd: double backward (``create_graph=True``) works, the backward's
    GEMMs being differentiable engine GEMMs. Copies (``copy.deepcopy``, ``pickle``, ``torch.save``,
    ``AveragedModel``) get a new Engine built from the same arguments (see :class:`accel.ooc.Engine`);
    layers sharing an engine share one new engine in the copy.

    Example::

        >>> layer = accel.nn.OutOfCoreLinear(65536, 32768, devices=["cuda:0"], memory_limit=4 << 30)
        >>> y = layer(x)            # x on cuda:0 or on the CPU
        >>> y.sum().backward()      # layer.weight.grad lives in host memory
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, devices=None,
                 memory_limit: int | None = None, dtype: torch.dtype | None = None, engine: Engine | None = None):
        super().__init__()
        for name, value in (("in_features", in_features), ("out_features", out_features)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.in_features, self.out_features = in_features, out_features
        factory = {"device": "cpu", "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **factory))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, **factory))
        else:
            self.register_parameter("bias", None)
        if engine is not None and (devices is not None or memory_limit is not None):
            raise ValueError("pass devices and memory_limit to the Engine, not with engine=")
        if engine is not None and not isinstance(engine, Engine):
            raise TypeError(f"engine must be an accel.ooc.Engine, got {engine!r} (to name devices, pass "
                            f"devices=[...])")
        if engine is None:
            engine = shared_engine(devices) if memory_limit is None else Engine(devices, memory_limit)
        self.engine = engine
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The initialisation of :class:`torch.nn.Linear` (Kaiming-uniform weight, uniform bias)."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features)
            nn.init.uniform_(self.bias, -bound, bound)

    @classmethod
    def from_linear(cls, linear: nn.Linear, **kwargs) -> "OutOfCoreLinear":
        """An ``OutOfCoreLinear`` holding a host copy of ``linear``'s weight and bias.

        Args:
            linear (nn.Linear): the layer to copy.
            **kwargs: ``devices``, ``memory_limit``, ``dtype``, ``engine`` as in the constructor
                (``dtype`` defaults to the linear layer's).
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear expects an nn.Linear, got {type(linear).__name__}")
        kwargs.setdefault("dtype", linear.weight.dtype)
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, **kwargs)
        with torch.no_grad():
            layer.weight.copy_(linear.weight)
            if linear.bias is not None:
                layer.bias.copy_(linear.bias)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() == 0 or x.shape[-1] != self.in_features:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"expected input with last dimension {self.in_features}, got shape {shape}")
        if x.dtype != self.weight.dtype:
            raise TypeError(f"input dtype {x.dtype} does not match the weight dtype {self.weight.dtype}")
        rows = x.reshape(-1, self.in_features).cpu()  # differentiable: gradients flow back to x's device
        parameters = [p for p in (self.weight, self.bias) if p is not None]
        backward_follows = torch.is_grad_enabled() and any(t.requires_grad for t in (x, *parameters))
        side = tile_side(self.engine, rows.shape[0], self.in_features, self.out_features, x.dtype)
        out = _OutOfCoreLinearFunction.apply(rows, self.weight, self.bias, self.engine, side, backward_follows)
        return out.reshape(*x.shape[:-1], self.out_features).to(x.device)

    def _apply(self, fn, recurse=True):
        """Parameters stay in host memory whatever ``.to()`` / ``.cuda()`` asks (that is the point of the
        layer, and it lets ``model.to("cuda")`` move the rest of a model); dtype conversions do apply."""
        for param in self._parameters.values():
            if param is None:
                continue
            dtype = fn(torch.empty(0, dtype=param.dtype)).dtype
            if dtype != param.dtype:
                param.data = param.data.to(dtype)
                if param.grad is not None:
                    param.grad.data = param.grad.data.to(dtype)
        return self

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"devices={self.engine.devices}")
