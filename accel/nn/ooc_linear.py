"""``OutOfCoreLinear``: a linear layer whose weight (and its gradient) live in host memory.

Forward and backward are out-of-core GEMMs on an :class:`accel.ooc.Engine`, so a weight larger than any
GPU trains with an ordinary torch optimizer. The layer uses only the engine's public methods:
:meth:`~accel.ooc.Engine.gemm`, :meth:`~accel.ooc.Engine.block_for` and :meth:`~accel.ooc.Engine.cache_scope`.

Tiles and their lifetime: each forward opens a :class:`~accel.ooc.CacheScope` and the matching backward
closes it. Within it the tiles of the weight, the input and the output gradient are loaded once and reused
(forward reads ``W^T``, backward ``W``: tiles are keyed in the weight's own coordinates and cut on one
square grid, :meth:`~accel.ooc.Engine.block_for`, so they match). Nothing is reused across an optimizer
step or any other boundary where the weight may change, so no write path (fused optimizers, ``.data``,
NumPy views, collectives, ``load_state_dict``) can make a tile stale.
"""
from __future__ import annotations

import logging
import math
import threading

import torch
from torch import nn

from accel.nn._interop import is_conv1d
from accel.ooc import Engine

logger = logging.getLogger(__name__)

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


class _OutOfCoreLinearFunction(torch.autograd.Function):
    """``y = x W^T + b`` on the engine (``x W + b`` when the weight is stored transposed); the backward's
    GEMMs are differentiable (double backward)."""

    @staticmethod
    def forward(ctx, rows, weight, bias, engine, transposed, backward_follows):
        # one tile grid for the three GEMMs, so the forward's tiles serve the backward
        batch, n_in = rows.shape
        n_out = weight.shape[1] if transposed else weight.shape[0]
        side = engine.block_for([(batch, n_out, n_in), (batch, n_in, n_out), (n_out, n_in, batch)], rows.dtype)
        scope = engine.cache_scope()
        out = engine.gemm(rows, weight, bias, beta=0.0 if bias is None else 1.0, trans_b=not transposed, block=side,
                          cache_scope=scope)
        # save only what the backward reads, as torch's linear does (a tensor made under
        # torch.inference_mode cannot be saved; torch refuses only where it must be)
        ctx.save_for_backward(rows if ctx.needs_input_grad[1] else None, weight if ctx.needs_input_grad[0] else None)
        ctx.engine, ctx.side, ctx.scope, ctx.has_bias, ctx.transposed = engine, side, scope, bias is not None, \
            transposed
        if not backward_follows:  # no graph: nothing will read these tiles again
            scope.close()
        return out

    @staticmethod
    def backward(ctx, grad):
        rows, weight = ctx.saved_tensors
        engine, scope, side = ctx.engine, ctx.scope, ctx.side
        scope = None if scope.closed else scope
        grad_rows = grad_weight = grad_bias = None
        try:  # grad_rows first: it reads the weight tiles the forward left in the scope
            if ctx.needs_input_grad[0]:  # g W, or g W^T for a transposed weight
                grad_rows = engine.gemm(grad, weight, trans_b=ctx.transposed, block=side, cache_scope=scope)
            if ctx.needs_input_grad[1]:  # g^T x, or x^T g for a transposed weight
                if ctx.transposed:
                    grad_weight = engine.gemm(rows, grad, trans_a=True, block=side, cache_scope=scope)
                else:
                    grad_weight = engine.gemm(grad, rows, trans_a=True, block=side, cache_scope=scope)
            if ctx.has_bias and ctx.needs_input_grad[2]:
                grad_bias = grad.sum(0)
        finally:  # the weight may change from here on (the optimizer step): its tiles go
            if scope is not None:
                scope.close()
        return grad_rows, grad_weight, grad_bias, None, None, None


def host_parameter(parameter: torch.Tensor | None, dtype: torch.dtype) -> tuple[nn.Parameter | None, bool]:
    """The host Parameter a layer that keeps its parameters in host memory holds in place of ``parameter``.

    Returns ``(host, kept)``: ``parameter`` itself (``kept`` true) when it is a :class:`~torch.nn.Parameter` in
    host memory or on the meta device with ``dtype``, so ties and optimizers built on it keep working; else a new
    host Parameter holding a copy converted to ``dtype`` (``requires_grad`` as ``parameter``'s). ``None`` gives
    ``(None, True)``."""
    if parameter is None:
        return None, True
    if isinstance(parameter, nn.Parameter) and parameter.device.type in ("cpu", "meta") and parameter.dtype == dtype:
        return parameter, True
    with torch.no_grad():
        copied = parameter.detach().to(device="cpu", dtype=dtype, copy=True)
    return nn.Parameter(copied, requires_grad=parameter.requires_grad), False


class HostResident:
    """Mixin for an :class:`torch.nn.Module` whose parameters stay in host memory whatever ``.to()`` /
    ``.cuda()`` / ``model.to(device)`` asks, so that a model holding it moves everything else to a device.

    Dtype conversions apply (in place: a parameter stays the same object, so ties and optimizers survive), and
    a parameter on the meta device is materialised in host memory (``to_empty(device=...)`` of any device).
    Buffers and submodules are converted as usual. List it before the module class:
    ``class HostEmbedding(HostResident, nn.Embedding)``.

    It overrides :meth:`torch.nn.Module._apply`, the one method every conversion goes through: torch has no
    public hook that keeps a parameter off a device."""

    def _apply(self, fn, recurse=True):
        if recurse:
            for module in self.children():
                module._apply(fn)
        for name, param in self._parameters.items():
            if param is None:
                continue
            if param.device.type == "meta":
                applied = fn(param)
                if applied.device.type != "meta":  # materialised (to_empty): in host memory, never elsewhere
                    if applied.device.type != "cpu":
                        applied = torch.empty(applied.shape, dtype=applied.dtype)
                    self._parameters[name] = nn.Parameter(applied, requires_grad=param.requires_grad)
                elif applied.dtype != param.dtype:
                    self._parameters[name] = nn.Parameter(applied, requires_grad=param.requires_grad)
                continue
            dtype = fn(torch.empty(0, dtype=param.dtype)).dtype
            if dtype != param.dtype:
                param.data = param.data.to(dtype)
                if param.grad is not None:
                    param.grad.data = param.grad.data.to(dtype)
        for name, buffer in self._buffers.items():
            if buffer is not None:
                self._buffers[name] = fn(buffer)
        return self


class OutOfCoreLinear(HostResident, nn.Module):
    r"""Applies ``y = x W^T + b`` with ``W`` kept in host memory and the matmuls done out of core.

    Behaves like :class:`torch.nn.Linear` (same parameters, initialisation and shapes), but the weight,
    the bias and their gradients stay on the CPU whatever the device of the input; the products run
    on ``devices`` within ``memory_limit`` bytes per device. The output goes to the input's device.
    ``model.to(device)`` leaves the layer's parameters in host memory (dtype conversions apply; see
    :class:`HostResident`), so it moves the rest of a model.

    Args:
        in_features (int): size of each input sample.
        out_features (int): size of each output sample.
        bias (bool): learn an additive bias (default ``True``).
        device (torch.device or str, optional): where the parameters are made: the host (``"cpu"``), or
            ``"meta"`` to allocate nothing (then :meth:`~torch.nn.Module.to_empty` and
            :meth:`reset_parameters`). Default: the meta device under ``with torch.device("meta")``, else the
            host (whatever torch's default device). The GEMMs' devices are ``devices``.
        dtype (torch.dtype, optional): parameter dtype (default: torch's default dtype).
        devices (sequence, optional): devices for the GEMMs (see :class:`accel.ooc.Engine`); default
            every visible GPU, else the CPU.
        memory_limit (int, optional): bytes per device for this layer's own engine. Default: the layer
            uses the engine shared by every ``OutOfCoreLinear`` on the same ``devices`` made without a
            limit, which takes a quarter of what :func:`accel.gemm` would (a quarter of 90% of a GPU's
            free memory), one budget for all those layers, leaving the rest to the model.
        engine (accel.ooc.Engine, optional): use this engine (and its budget); then ``devices`` and
            ``memory_limit`` stay unset.
        transposed_weight (bool): store the weight as ``(in_features, out_features)`` and compute
            ``y = x W + b``, as transformers' ``Conv1D`` does (default ``False``: ``nn.Linear``'s layout).

    Attributes:
        transposed_weight (bool): the weight's layout (see above); ``weight.shape`` follows it.

    Tiles live from a forward to the end of its backward (see the module docstring): nothing is cached
    across optimizer steps. Autograd: double backward (``create_graph=True``) works, the backward's
    GEMMs being differentiable engine GEMMs. Under :func:`torch.inference_mode` the layer works as
    ``nn.Linear`` does, for inputs and for a layer made there. Copies (``copy.deepcopy``, ``pickle``,
    ``torch.save``, ``AveragedModel``) get a new Engine built from the same arguments (see
    :class:`accel.ooc.Engine`); layers sharing an engine share one new engine in the copy.

    Example::

        >>> layer = accel.nn.OutOfCoreLinear(65536, 32768, devices=["cuda:0"], memory_limit=4 << 30)
        >>> y = layer(x)            # x on cuda:0 or on the CPU
        >>> y.sum().backward()      # layer.weight.grad lives in host memory
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None,
                 dtype: torch.dtype | None = None, *, devices=None, memory_limit: int | None = None,
                 engine: Engine | None = None, transposed_weight: bool = False):
        super().__init__()
        for name, value in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if engine is not None and (devices is not None or memory_limit is not None):
            raise ValueError("pass devices and memory_limit to the Engine, not with engine=")
        if engine is not None and not isinstance(engine, Engine):
            raise TypeError(f"engine must be an accel.ooc.Engine, got {engine!r} (to name devices, pass "
                            f"devices=[...])")
        device = _parameter_device(device)
        self.in_features, self.out_features = in_features, out_features
        self.transposed_weight = bool(transposed_weight)
        factory = {"device": device, "dtype": dtype}
        shape = (in_features, out_features) if self.transposed_weight else (out_features, in_features)
        self.weight = nn.Parameter(torch.empty(shape, **factory))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, **factory))
        else:
            self.register_parameter("bias", None)
        if engine is None:
            engine = shared_engine(devices) if memory_limit is None else Engine(devices, memory_limit)
        self.engine = engine
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The initialisation of :class:`torch.nn.Linear` (Kaiming-uniform weight, uniform bias), also for a
        transposed weight (drawn in ``nn.Linear``'s orientation). Does nothing on the meta device."""
        weight = self.weight.t() if self.transposed_weight else self.weight
        nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features)
            nn.init.uniform_(self.bias, -bound, bound)

    @classmethod
    def from_linear(cls, linear: nn.Module, **kwargs) -> "OutOfCoreLinear":
        """An ``OutOfCoreLinear`` computing what ``linear`` computes, from an :class:`torch.nn.Linear` or
        transformers' ``Conv1D`` (``transformers.pytorch_utils.Conv1D``, whose weight is stored
        ``(in_features, out_features)``; the new layer keeps that layout, ``transposed_weight=True``).

        The new layer holds ``linear``'s own weight and bias :class:`~torch.nn.Parameter` objects wherever it
        can: a parameter in host memory (or on the meta device) of the requested dtype is shared, not copied,
        so a weight tied to another module (GPT-2's ``lm_head`` and its token embedding) stays tied, and an
        optimizer built on the old parameters keeps training the new layer. A parameter on another device
        (a GPU) or of another dtype is copied into a new host parameter instead (logged at INFO level): a
        tie through it is then broken, which model-level transforms must refuse or restore. To keep ``linear``
        independent of the new layer, pass a copy (``copy.deepcopy(linear)``).

        Args:
            linear (nn.Linear or transformers Conv1D): the layer to take over.
            **kwargs: ``devices``, ``memory_limit``, ``dtype``, ``engine`` as in the constructor
                (``dtype`` defaults to the linear layer's).

        Raises:
            TypeError: ``linear`` is neither an ``nn.Linear`` nor a transformers ``Conv1D``.
            ValueError: ``kwargs`` names ``device`` or ``transposed_weight`` (they follow ``linear``).
        """
        if isinstance(linear, nn.Linear):
            transposed = False
            in_features, out_features = linear.in_features, linear.out_features
        elif is_conv1d(linear):
            transposed = True
            in_features, out_features = linear.weight.shape
        else:
            raise TypeError(f"from_linear expects an nn.Linear or a transformers Conv1D, got "
                            f"{type(linear).__name__}")
        for name in ("device", "transposed_weight"):
            if name in kwargs:
                raise ValueError(f"from_linear takes {name} from the layer; leave {name}= unset")
        dtype = kwargs.setdefault("dtype", linear.weight.dtype)
        bias = getattr(linear, "bias", None)
        layer = cls(in_features, out_features, bias is not None, device="meta", transposed_weight=transposed,
                    **kwargs)
        for name, parameter in (("weight", linear.weight), ("bias", bias)):
            if parameter is None:
                continue
            held, kept = host_parameter(parameter, dtype)
            if not kept:
                logger.info("OutOfCoreLinear.from_linear copies %s %s (%s, %s) into host memory as %s: the new "
                            "layer does not share it with %s", name, tuple(parameter.shape), parameter.device,
                            parameter.dtype, dtype, type(linear).__name__)
            setattr(layer, name, held)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() == 0 or x.shape[-1] != self.in_features:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"expected input with last dimension {self.in_features}, got shape {shape}")
        if x.dtype != self.weight.dtype:
            raise TypeError(f"input dtype {x.dtype} does not match the weight dtype {self.weight.dtype}")
        if self.weight.device.type == "meta":
            raise RuntimeError("OutOfCoreLinear was made on the meta device: materialise it first with "
                               "module.to_empty(device='cpu') and reset_parameters() (or load a state dict)")
        rows = x.reshape(-1, self.in_features).cpu()  # differentiable: gradients flow back to x's device
        parameters = [p for p in (self.weight, self.bias) if p is not None]
        backward_follows = torch.is_grad_enabled() and any(t.requires_grad for t in (x, *parameters))
        out = _OutOfCoreLinearFunction.apply(rows, self.weight, self.bias, self.engine, self.transposed_weight,
                                             backward_follows)
        return out.reshape(*x.shape[:-1], self.out_features).to(x.device)

    def extra_repr(self) -> str:
        layout = ", transposed_weight=True" if self.transposed_weight else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
                f"{layout}, devices={self.engine.devices}")


def _parameter_device(device) -> torch.device:
    """Where the parameters are made: the host, or the meta device (nothing allocated). With no device,
    torch's default device decides between the two (``with torch.device("meta"):`` makes a meta layer); any
    other default device still gives host parameters, the layer's point."""
    if device is None:
        return torch.device("meta") if torch.get_default_device().type == "meta" else torch.device("cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"unknown device {device!r}") from error
    if device.type not in ("cpu", "meta"):
        raise ValueError(f"OutOfCoreLinear keeps its parameters in host memory: device={str(device)!r} is not "
                         f"supported (use device='cpu' or 'meta'; devices=[{str(device)!r}] runs the GEMMs there)")
    return device
