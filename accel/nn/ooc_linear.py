"""``OutOfCoreLinear``: a linear layer whose weight (and its gradient) live in host memory.

Forward and backward are out-of-core GEMMs (:func:`accel.gemm`) through one :class:`accel.ooc.Engine`
per layer, so a weight larger than any GPU trains with an ordinary torch optimizer. The engine's tile
cache keeps weight tiles between forward and backward, and drops them when the optimizer changes the
weight in place.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from accel.ooc import Engine


class _OutOfCoreLinearFunction(torch.autograd.Function):
    """``y = x @ W^T + b`` with the three matmuls (forward, grad input, grad weight) on the engine."""

    @staticmethod
    def forward(ctx, x, weight, bias, engine):
        rows = x.reshape(-1, x.shape[-1]).detach().cpu()
        if bias is not None:  # beta * C with C the bias broadcast over rows: added inside the epilogue
            out = engine.gemm(rows, weight, bias, beta=1.0, trans_b=True)
        else:
            out = engine.gemm(rows, weight, trans_b=True)
        ctx.save_for_backward(rows, weight)
        ctx.engine, ctx.has_bias, ctx.input_shape, ctx.input_device = engine, bias is not None, x.shape, x.device
        return out.reshape(*x.shape[:-1], out.shape[-1]).to(x.device)

    @staticmethod
    def backward(ctx, grad_out):
        rows, weight = ctx.saved_tensors
        engine = ctx.engine
        grad_rows = grad_out.reshape(-1, grad_out.shape[-1]).cpu()
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = engine.gemm(grad_rows, weight).reshape(ctx.input_shape).to(ctx.input_device)
        if ctx.needs_input_grad[1]:
            grad_weight = engine.gemm(grad_rows, rows, trans_a=True)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad_rows.sum(0)
        return grad_x, grad_weight, grad_bias, None


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
        memory_limit (int, optional): bytes per device the layer's engine may hold.
        dtype (torch.dtype, optional): parameter dtype (default: torch's default dtype).
        engine (accel.ooc.Engine, optional): share one engine (and its memory budget) among layers;
            then ``devices`` and ``memory_limit`` stay unset.

    The layer's engine keeps weight tiles on the devices between calls (up to ``memory_limit`` per
    device; they are dropped when the optimizer changes the weight). Several layers on one GPU should
    share an ``engine`` or get limits that leave room for the rest of the model.

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
        self.engine = engine if engine is not None else Engine(devices, memory_limit)
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
        if x.shape[-1] != self.in_features:
            raise ValueError(f"expected input with last dimension {self.in_features}, got shape {tuple(x.shape)}")
        if x.dtype != self.weight.dtype:
            raise TypeError(f"input dtype {x.dtype} does not match the weight dtype {self.weight.dtype}")
        return _OutOfCoreLinearFunction.apply(x, self.weight, self.bias, self.engine)

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
