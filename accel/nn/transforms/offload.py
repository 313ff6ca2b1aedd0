"""``offload_`` / ``unoffload_``: move a whole model's large linear layers to host memory in one call.

The selected ``nn.Linear`` layers (and transformers' ``Conv1D``, recognised by its class name and module, so
transformers stays optional) become :class:`accel.nn.OutOfCoreLinear` layers that share one
:class:`accel.ooc.Engine`: their weights live in host memory and their products run out of core on the
engine's devices, within one per-device budget, so a single layer larger than a device still trains there.

Ties: a weight that another module also holds (GPT-2's ``lm_head.weight`` is its ``wte.weight``) stays one
Parameter, in host memory, shared by the offloaded layer and the other holder: another offloaded layer, or an
``nn.Embedding``, which becomes a :class:`HostEmbedding` (its weight stays in host memory through
``model.to(device)``). Any other holder makes the call refuse with an error naming the tie. Nothing is untied
silently.

Layers are built with :meth:`accel.nn.OutOfCoreLinear.from_linear`: a ``Conv1D`` becomes an ``OutOfCoreLinear``
with ``transposed_weight=True``, which holds ``Conv1D``'s own ``(nx, nf)`` weight, so its ``state_dict`` is the
``Conv1D``'s and checkpoints load into the model whether or not it is offloaded.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import torch
from torch import nn

from accel.nn.ooc_linear import HostResident, OutOfCoreLinear, host_parameter, is_conv1d
from accel.ooc import Engine

__all__ = ["offload_", "unoffload_", "OffloadSummary", "OffloadedLayer", "HostEmbedding", "TiedWeightError",
           "DEFAULT_MIN_WEIGHT_BYTES", "is_conv1d"]

#: with no ``filter_fn``, ``offload_`` takes the layers whose weight has at least this many bytes
DEFAULT_MIN_WEIGHT_BYTES = 16 << 20
#: share of each device's default budget that ``offload_``'s own engine takes (as OutOfCoreLinear's default)
DEFAULT_MEMORY_FRACTION = 0.25


class TiedWeightError(ValueError):
    """A selected layer's weight is shared with another module and cannot stay shared once offloaded."""


def _is_candidate(module: nn.Module) -> bool:
    # exact nn.Linear only: subclasses may have their own forward, or be read by their parent
    # (nn.MultiheadAttention reads out_proj.weight itself), and a parametrized Linear changes its class
    return type(module) is nn.Linear or is_conv1d(module)


class HostEmbedding(HostResident, nn.Embedding):
    """An ``nn.Embedding`` whose weight stays in host memory: the one :func:`offload_` makes of an embedding tied
    to an offloaded layer's weight (GPT-2's ``wte``), so that one host weight serves both.

    ``model.to(device)`` leaves its parameters in host memory (dtype conversions apply), as it does for
    ``OutOfCoreLinear`` (both are :class:`accel.nn.ooc_linear.HostResident`); the lookup runs on the host and its
    output goes to the indices' device."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        out = nn.functional.embedding(input.cpu(), self.weight, self.padding_idx, self.max_norm, self.norm_type,
                                      self.scale_grad_by_freq, self.sparse)
        return out.to(input.device)


def _embedding_like(cls, embedding: nn.Embedding, weight: nn.Parameter) -> nn.Embedding:
    """A ``cls`` embedding configured as ``embedding`` and holding ``weight`` itself (built on the meta device,
    so no second weight is allocated)."""
    made = cls(embedding.num_embeddings, embedding.embedding_dim, padding_idx=embedding.padding_idx,
               max_norm=embedding.max_norm, norm_type=embedding.norm_type,
               scale_grad_by_freq=embedding.scale_grad_by_freq, sparse=embedding.sparse, device="meta")
    made.weight = weight
    made.train(embedding.training)
    return made


@dataclasses.dataclass(frozen=True)
class OffloadedLayer:
    """One layer that :func:`offload_` moved."""

    name: str
    kind: str  #: ``"Linear"`` or ``"Conv1D"``
    in_features: int
    out_features: int
    weight_bytes: int
    tied_with: tuple[str, ...] = ()  #: other modules holding the same weight (it stays one Parameter)
    same_parameters: bool = True  #: the layer kept the model's Parameter objects (an optimizer made before still works)


@dataclasses.dataclass
class OffloadSummary:
    """What :func:`offload_` did: the layers moved, the host bytes they hold, the engine and its budget."""

    layers: list[OffloadedLayer]
    host_bytes: int  #: bytes of the offloaded parameters (weights and biases, each shared tensor once)
    device_budget: dict[str, int]  #: bytes the engine may hold per worker
    engine: Engine
    skipped: list[tuple[str, str]] = dataclasses.field(default_factory=list)  #: (name, why) of candidates left
    #: embeddings tied to an offloaded weight, now :class:`HostEmbedding` (their weight stays in host memory)
    host_embeddings: list[str] = dataclasses.field(default_factory=list)

    @property
    def names(self) -> list[str]:
        return [layer.name for layer in self.layers]

    def __getitem__(self, name: str) -> OffloadedLayer:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(name)

    @property
    def parameters_replaced(self) -> bool:
        """Whether some layer got new Parameter objects: an optimizer built before ``offload_`` must be rebuilt."""
        return not all(layer.same_parameters for layer in self.layers)

    def __str__(self) -> str:
        lines = [f"offload_: {len(self.layers)} layer(s) moved to host memory, {_bytes(self.host_bytes)} held on "
                 f"the host; engine budget per device: "
                 + (", ".join(f"{name} {_bytes(limit)}" for name, limit in self.device_budget.items()) or "-")]
        width = max([len(layer.name) for layer in self.layers] + [4])
        for layer in self.layers:
            tie = f"  tied with {', '.join(layer.tied_with)}" if layer.tied_with else ""
            lines.append(f"  {layer.name:<{width}}  {layer.kind:<6} {layer.in_features}->{layer.out_features}  "
                         f"{_bytes(layer.weight_bytes)}{tie}")
        if self.parameters_replaced:
            lines.append("  new Parameter objects: build the optimizer after offload_")
        for name in self.host_embeddings:
            lines.append(f"  {name}: embedding tied to an offloaded weight, kept in host memory (HostEmbedding)")
        for name, why in self.skipped:
            lines.append(f"  left in place: {name} ({why})")
        return "\n".join(lines)


def _bytes(count: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if count >= size:
            return f"{count / size:.1f} {unit}"
    return f"{count} B"


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def check_wrapping(model: nn.Module, action: str) -> None:
    """Refuse models already wrapped by DDP or FSDP (their wrappers hold the parameters they were built with)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"{action} expects an nn.Module, got {type(model).__name__}")
    if not torch.distributed.is_available():
        return
    from torch.nn.parallel import DistributedDataParallel

    fsdp_classes = []
    try:
        from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
        fsdp_classes = [FullyShardedDataParallel, FSDPModule]
    except ImportError:  # pragma: no cover - builds without FSDP
        pass
    for name, module in model.named_modules():
        where = "the model" if not name else f"submodule {name!r}"
        if fsdp_classes and isinstance(module, tuple(fsdp_classes)):
            raise ValueError(f"{action}: {where} is wrapped by FSDP ({type(module).__name__}); FSDP is out of scope "
                             f"for accel's out-of-core layers (FSDP shards and gathers parameters on the devices, "
                             f"OutOfCoreLinear keeps them whole in host memory). Supported: {action} on the plain "
                             f"model, then DistributedDataParallel (or no wrapper)")
        if isinstance(module, DistributedDataParallel):
            raise ValueError(f"{action}: {where} is a DistributedDataParallel, which registered its parameters when "
                             f"it was built and would not see the new layers. Call {action} on the plain model "
                             f"first, then wrap it: DistributedDataParallel({action.rstrip('_')}ed model)")


def parameter_owners(model: nn.Module) -> dict[int, list[str]]:
    """id(parameter) -> every ``module.param`` name holding it (duplicates included)."""
    owners: dict[int, list[str]] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        for param_name, param in module.named_parameters(recurse=False):
            owners.setdefault(id(param), []).append(f"{module_name}.{param_name}" if module_name else param_name)
    return owners


def _default_engine(devices, memory_limit) -> Engine:
    if memory_limit is None:
        return Engine(devices, default_memory_fraction=DEFAULT_MEMORY_FRACTION)
    return Engine(devices, memory_limit)


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def offload_(model: nn.Module, filter_fn: Callable[[nn.Module, str], bool] | None = None, *,
             engine: Engine | None = None, min_weight_bytes: int | None = None, devices=None,
             memory_limit: int | None = None) -> OffloadSummary:
    r"""Replace a model's large linear layers, in place, by :class:`accel.nn.OutOfCoreLinear` layers sharing
    one :class:`accel.ooc.Engine`.

    Args:
        model (nn.Module): the model (not yet wrapped in ``DistributedDataParallel`` / FSDP).
        filter_fn (callable, optional): ``filter_fn(module, name) -> bool`` chooses among the candidate layers
            (exact ``nn.Linear`` and transformers' ``Conv1D``), as in torchao's ``quantize_``. Default: every
            candidate whose weight has at least ``min_weight_bytes`` bytes.
        engine (accel.ooc.Engine, optional): the engine every offloaded layer shares. Default: a new one on
            ``devices`` with ``memory_limit`` bytes per device (without a limit: a quarter of each device's
            default budget, as ``OutOfCoreLinear``'s default engine).
        min_weight_bytes (int, optional): with no ``filter_fn``, the smallest weight moved (default
            ``DEFAULT_MIN_WEIGHT_BYTES``, 16 MiB); with a ``filter_fn``, applied too if given.
        devices, memory_limit: for the default engine (see :class:`accel.ooc.Engine`); not with ``engine=``.

    Returns:
        OffloadSummary: the layers moved (``str(summary)`` is a readable table), ``host_bytes`` they hold and
        the engine's per-device budget ``device_budget``.

    The offloaded layers keep the model's own Parameter objects where those already live in host memory (a
    model on the CPU), so an optimizer built before still updates them. Parameters on a GPU are copied to new
    host Parameters (``summary.parameters_replaced``), which the replaced modules then hold too: build the
    optimizer afterwards. A ``Conv1D`` becomes an ``OutOfCoreLinear`` with ``transposed_weight=True`` (same
    Parameter, same ``state_dict`` layout). A weight tied to an
    ``nn.Embedding`` stays one Parameter in host memory, the embedding becoming a :class:`HostEmbedding`
    (``summary.host_embeddings``). ``model.to`` moves everything else; offloaded parameters stay in host memory.

    Raises:
        TiedWeightError: a selected layer shares its weight or bias with a module that is neither offloaded in
            this call nor an ``nn.Embedding``; the message names both. Select the other layer too, or leave this one out with ``filter_fn``.
        ValueError: the model is wrapped in ``DistributedDataParallel`` (offload first, then wrap) or FSDP
            (out of scope).

    Example::

        >>> summary = accel.nn.offload_(model, lambda m, name: name == "lm_head" or ".mlp." in name,
        ...                             devices=["cuda:0"], memory_limit=8 << 30)
        >>> print(summary)
        >>> model.to("cuda:0")   # the rest of the model; offloaded weights stay in host memory
    """
    check_wrapping(model, "offload_")
    if filter_fn is not None and not callable(filter_fn):
        raise TypeError(f"filter_fn must be callable as filter_fn(module, name), got {filter_fn!r}")
    if min_weight_bytes is not None and (isinstance(min_weight_bytes, bool) or not isinstance(min_weight_bytes, int)
                                         or min_weight_bytes < 0):
        raise ValueError(f"min_weight_bytes must be a non-negative int, got {min_weight_bytes!r}")
    if engine is not None and (devices is not None or memory_limit is not None):
        raise ValueError("pass devices and memory_limit to the Engine, not with engine=")
    if engine is not None and not isinstance(engine, Engine):
        raise TypeError(f"engine must be an accel.ooc.Engine, got {type(engine).__name__}")
    threshold = min_weight_bytes if min_weight_bytes is not None else (0 if filter_fn else DEFAULT_MIN_WEIGHT_BYTES)

    selected, skipped = [], []
    for name, module in model.named_modules():
        if isinstance(module, OutOfCoreLinear) or not _is_candidate(module):
            continue
        if filter_fn is not None and not filter_fn(module, name):
            continue
        size = _nbytes(module.weight)
        if size < threshold:
            if filter_fn is not None:
                skipped.append((name, f"weight {_bytes(size)} < min_weight_bytes {_bytes(threshold)}"))
            continue
        selected.append((name, module))

    owners = parameter_owners(model)
    aliases: dict[int, list[str]] = {}  # a module registered under several names is replaced under all of them
    for name, module in model.named_modules(remove_duplicate=False):
        aliases.setdefault(id(module), []).append(name)
    selected_names = {alias for _, module in selected for alias in aliases[id(module)]}
    embeddings = {}  # name -> nn.Embedding tied to an offloaded weight: it becomes a HostEmbedding
    plans = []
    for name, module in selected:  # check every tie before changing anything
        for param_name in ("weight", "bias"):
            param = getattr(module, param_name)
            if param is None:
                continue
            others = [o for o in owners.get(id(param), []) if o.rpartition(".")[0] not in aliases[id(module)]]
            for other in others:
                holder_name, _, holder_param = other.rpartition(".")
                holder = model.get_submodule(holder_name) if holder_name else model
                if holder_name in selected_names or isinstance(holder, (OutOfCoreLinear, HostEmbedding)):
                    continue  # offloaded too: the layers share one host Parameter
                elif type(holder) is nn.Embedding and holder_param == "weight":
                    embeddings[holder_name] = holder
                    continue
                else:
                    why = (f"{holder_name or 'the model'} is a {type(holder).__name__}, which model.to(device) would "
                           f"move to the device with the weight; only nn.Embedding and offloaded layers can share "
                           f"an offloaded weight")
                raise TiedWeightError(
                    f"offload_: {name}.{param_name} is tied to {', '.join(others)} (one Parameter) and the tie cannot "
                    f"be kept: {why}. Offload both layers (select {holder_name!r} too) or leave {name!r} out with "
                    f"filter_fn")
        plans.append((name, module, is_conv1d(module)))

    if engine is None:
        engine = _default_engine(devices, memory_limit)
    layers, seen, hosted = [], set(), {}
    host_bytes = 0

    def host(param, dtype):  # one host Parameter per model Parameter, so shared ones stay shared
        if param is None:
            return None, True
        if id(param) not in hosted:
            hosted[id(param)] = host_parameter(param, dtype)
        return hosted[id(param)]

    for name, module, conv in plans:
        tied = tuple(o.rpartition(".")[0] for o in owners.get(id(module.weight), [])
                     if o.rpartition(".")[0] not in aliases[id(module)])
        weight, same_weight = host(module.weight, module.weight.dtype)
        bias, same_bias = host(module.bias, module.weight.dtype)
        # the module holds its host Parameters first, so that from_linear shares them rather than copying each
        # module's own: a Parameter several layers share gets one host copy
        module.weight = weight
        if bias is not None:
            module.bias = bias
        layer = OutOfCoreLinear.from_linear(module, engine=engine)
        layer.train(module.training)
        for alias in aliases[id(module)]:
            set_module(model, alias, layer)
        for param in (weight, bias):
            if param is not None and id(param) not in seen:
                seen.add(id(param))
                host_bytes += _nbytes(param)
        layers.append(OffloadedLayer(name, "Conv1D" if conv else "Linear", layer.in_features, layer.out_features,
                                     _nbytes(weight), tied, same_weight and same_bias))
    for embedding in embeddings.values():
        weight, _ = host(embedding.weight, embedding.weight.dtype)
        replacement = _embedding_like(HostEmbedding, embedding, weight)
        for alias in aliases[id(embedding)]:
            set_module(model, alias, replacement)
    budget = {worker.name: worker.account.limit for worker in engine.workers}
    return OffloadSummary(layers, host_bytes, budget, engine, skipped, sorted(embeddings))


def unoffload_(model: nn.Module, *, device: torch.device | str | None = None) -> list[str]:
    """Turn every :class:`accel.nn.OutOfCoreLinear` of ``model`` back into an ordinary layer, in place.

    An ``OutOfCoreLinear`` with ``transposed_weight=True`` (``Conv1D``'s layout) becomes transformers' ``Conv1D``
    again, any other ``OutOfCoreLinear`` an ``nn.Linear`` (layers built by hand included) and a
    :class:`HostEmbedding` an ``nn.Embedding``, for export or inference where accel is not used. The restored
    layers keep the same Parameter objects, so ties survive.

    Args:
        model (nn.Module): the model.
        device (optional): where the parameters of the restored layers go. Default: the device of the
            model's other parameters when they all agree, else the CPU (where offloaded parameters are).

    Returns:
        list[str]: the names of the layers restored (embeddings included).

    Raises:
        ValueError: a layer with ``transposed_weight=True`` has no bias (``Conv1D`` always has one).
        ImportError: a layer with ``transposed_weight=True`` is to become a ``Conv1D`` and transformers is not
            installed.
    """
    check_wrapping(model, "unoffload_")
    targets = [(name, module) for name, module in model.named_modules()
               if isinstance(module, (OutOfCoreLinear, HostEmbedding))]
    conv_class = None
    for name, layer in targets:  # check before changing anything
        if isinstance(layer, OutOfCoreLinear) and layer.transposed_weight:
            if layer.bias is None:
                raise ValueError(f"unoffload_: {name} has transposed_weight=True (transformers' Conv1D layout) and "
                                 f"no bias; Conv1D always has a bias, so it cannot be restored as one")
            conv_class = _conv1d_class()
    if device is None:
        inside = {id(p) for _, module in targets for p in module.parameters()}
        devices = {p.device for p in model.parameters() if id(p) not in inside}
        device = devices.pop() if len(devices) == 1 else torch.device("cpu")
    device = torch.device(device)
    restored = []
    for name, layer in targets:
        if isinstance(layer, HostEmbedding):
            plain = _embedding_like(nn.Embedding, layer, layer.weight)
        else:
            if layer.transposed_weight:
                with torch.device("meta"):  # no full-size throwaway weight
                    plain = conv_class(layer.out_features, layer.in_features)
            else:
                plain = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
            plain.weight = layer.weight
            if layer.bias is not None:
                plain.bias = layer.bias
        plain.train(layer.training)
        set_module(model, name, plain)
        restored.append(name)
    moved = set()
    for name in restored:  # .to() on the module, so that shared parameters move once and stay shared
        module = model.get_submodule(name)
        if any(p.device != device for p in module.parameters()) and name not in moved:
            module.to(device)
            moved.add(name)
    return restored


def _conv1d_class():
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError as error:  # pragma: no cover - a Conv1D-layout layer came from a transformers model
        raise ImportError("unoffload_: restoring an OutOfCoreLinear with transposed_weight=True as transformers' "
                          "Conv1D needs transformers installed") from error
    return Conv1D
