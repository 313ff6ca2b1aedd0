"""``compress_``: a trained model's linear and recurrent layers to block-term layers, in one call.

Each selected ``nn.Linear`` (or transformers ``Conv1D``) becomes an :class:`accel.nn.BTLinear`, each ``nn.LSTM`` /
``nn.GRU`` / ``nn.RNN`` an :class:`accel.nn.BTLSTM` / ``BTGRU`` / ``BTRNN`` (whose first layer's input-to-hidden
weight is block-term, everything else copied), initialised by accel's block-term decomposition of the trained
weight, so the compressed model starts from the function the dense one learnt and only needs fine-tuning.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
import warnings
from typing import Callable, Mapping

from torch import nn

from accel.nn import BTGRU, BTLSTM, BTRNN, BTLinear
from accel.nn.transforms.offload import TiedWeightError, check_wrapping, is_conv1d, parameter_owners, set_module

__all__ = ["compress_", "CompressionSummary", "LayerCompression", "TargetError", "CannotCompressError"]

_RECURRENT = {nn.LSTM: BTLSTM, nn.GRU: BTGRU, nn.RNN: BTRNN}


class CannotCompressError(ValueError):
    """A selected layer has no block-term form with the given shapes (its sizes do not factor, say)."""


@dataclasses.dataclass(frozen=True)
class TargetError:
    """``ranks=TargetError(0.05)``: per layer, the smallest common Tucker rank whose decomposition has a relative
    Frobenius error ``||W - W_bt|| / ||W||`` of at most ``error`` (found by bisection over the rank, one
    decomposition per step). A layer that would need as many parameters as its dense weight stays dense (listed
    in ``CompressionSummary.skipped``)."""

    error: float

    def __post_init__(self):
        if isinstance(self.error, bool) or not isinstance(self.error, numbers.Real) or not 0 < self.error < 1:
            raise ValueError(f"TargetError(error) must be a relative error in (0, 1), got {self.error!r}")


@dataclasses.dataclass(frozen=True)
class LayerCompression:
    """One layer that :func:`compress_` replaced."""

    name: str
    kind: str  #: the dense layer's class: ``"Linear"``, ``"Conv1D"``, ``"LSTM"``, ``"GRU"``, ``"RNN"``
    parameters_before: int  #: all parameters of the dense module (biases, recurrent weights included)
    parameters_after: int  #: all parameters of the block-term module
    relative_error: float | None  #: ``||W - W_bt|| / ||W||`` of the decomposed weight (None without decomposition)
    ranks: tuple[int, ...]
    num_blocks: int
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]  #: of the BT weight (for a recurrent layer: gates x hidden_shape[0], ...)

    @property
    def compression_ratio(self) -> float:
        return self.parameters_before / self.parameters_after


@dataclasses.dataclass
class CompressionSummary:
    """What :func:`compress_` did, per layer; ``ranks`` / ``num_blocks`` rebuild the same layers on a fresh model
    (``compress_(fresh, ranks=summary.ranks, num_blocks=summary.num_blocks, decompose=False)``, then
    ``load_state_dict``)."""

    layers: list[LayerCompression]
    skipped: list[tuple[str, str]] = dataclasses.field(default_factory=list)  #: (name, why) of candidates left dense

    @property
    def parameters_before(self) -> int:
        return sum(layer.parameters_before for layer in self.layers)

    @property
    def parameters_after(self) -> int:
        return sum(layer.parameters_after for layer in self.layers)

    @property
    def ranks(self) -> dict[str, tuple[int, ...]]:
        return {layer.name: layer.ranks for layer in self.layers}

    @property
    def num_blocks(self) -> dict[str, int]:
        return {layer.name: layer.num_blocks for layer in self.layers}

    def __getitem__(self, name: str) -> LayerCompression:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(name)

    def __str__(self) -> str:
        width = max([len(layer.name) for layer in self.layers] + [5])
        lines = [f"compress_: {len(self.layers)} layer(s), {self.parameters_before:,} -> {self.parameters_after:,} "
                 f"parameters",
                 f"  {'layer':<{width}}  {'kind':<6} {'before':>11} {'after':>11} {'ratio':>7}  {'rel. error':>10}  "
                 f"ranks x blocks"]
        for layer in self.layers:
            error = "-" if layer.relative_error is None else f"{layer.relative_error:.2e}"
            lines.append(f"  {layer.name:<{width}}  {layer.kind:<6} {layer.parameters_before:>11,} "
                         f"{layer.parameters_after:>11,} {layer.compression_ratio:>6.1f}x  {error:>10}  "
                         f"{layer.ranks} x {layer.num_blocks}")
        for name, why in self.skipped:
            lines.append(f"  left dense: {name} ({why})")
        return "\n".join(lines)


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _kind(module: nn.Module) -> str | None:
    if type(module) is nn.Linear:  # exact: subclasses may have their own forward or be read by their parent
        return "Linear"
    if is_conv1d(module):
        return "Conv1D"
    if type(module) in _RECURRENT:
        return type(module).__name__
    return None


def _weight_parameters(in_shape, out_shape, ranks, num_blocks) -> int:
    return num_blocks * (sum(i * j * r for i, j, r in zip(in_shape, out_shape, ranks)) + math.prod(ranks))


def _capped(rank: int, sizes) -> tuple[int, ...]:
    return tuple(min(rank, s) for s in sizes)


def _full_ranks(sizes) -> tuple[int, ...]:
    """The multilinear rank bound of a tensor with mode sizes ``sizes``: one block with these ranks is exact."""
    total = math.prod(sizes)
    return tuple(min(s, total // s) for s in sizes)


class _Layer:
    """A selected dense layer: its BT shapes, and how to build its BT twin at given ranks."""

    def __init__(self, name: str, module: nn.Module, shapes, options: dict):
        self.name, self.module, self.kind, self.options = name, module, _kind(module), options
        recurrent = self.kind in ("LSTM", "GRU", "RNN")
        if recurrent and getattr(module, "proj_size", 0):
            raise CannotCompressError(f"compress_: {name} is an LSTM with proj_size={module.proj_size}, which BTLSTM "
                                      f"does not support")
        if recurrent:
            self.dense_weight = module.weight_ih_l0
        elif self.kind == "Conv1D":
            self.dense_weight = module.weight.t()
        else:
            self.dense_weight = module.weight
        out_features, in_features = self.dense_weight.shape
        given_in, given_out = shapes if shapes is not None else (None, None)
        with warnings.catch_warnings():  # a probe at rank 1 for its shapes; its size warning is irrelevant here
            warnings.simplefilter("ignore")
            try:
                if recurrent:
                    probe = _RECURRENT[type(module)](module.input_size, module.hidden_size, in_shape=given_in,
                                                     hidden_shape=given_out, ranks=1, num_blocks=1, device="meta")
                    self.in_shape, self.hidden_shape = tuple(probe.in_shape), tuple(probe.hidden_shape)
                    self.out_shape = tuple(probe.input_projection.out_shape)
                else:
                    probe = BTLinear(in_features, out_features, in_shape=given_in, out_shape=given_out, ranks=1,
                                     num_blocks=1, bias=False, device="meta")
                    self.in_shape, self.out_shape = tuple(probe.in_shape), tuple(probe.out_shape)
            except ValueError as error:
                raise CannotCompressError(f"compress_: {name} ({self.kind}): shapes={shapes}: {error}") from None
        if len(self.in_shape) < 2 or min(self.in_shape + self.out_shape) < 2:
            raise CannotCompressError(
                f"compress_: {name} ({self.kind}, {in_features} -> {out_features} features): a block-term weight "
                f"needs both sizes split into >= 2 factors >= 2 each, got in_shape={self.in_shape}, "
                f"out_shape={self.out_shape} (a prime size does not split). Pass shapes={{{name!r}: (in_shape, "
                f"{'hidden_shape' if recurrent else 'out_shape'})}} with sizes that multiply to these, or leave the "
                f"layer out with filter_fn")
        self.sizes = tuple(i * j for i, j in zip(self.in_shape, self.out_shape))
        self.dense_parameters = in_features * out_features

    def resolve(self, spec, num_blocks: int) -> tuple[tuple[int, ...], int] | None:
        """``(ranks, num_blocks)`` for a spec that does not need the weights (None for a TargetError)."""
        if isinstance(spec, str):
            if spec != "full":
                raise ValueError(f"compress_: ranks={spec!r} for {self.name}: the only string is 'full'")
            return _full_ranks(self.sizes), 1
        if isinstance(spec, TargetError):
            return None
        if isinstance(spec, float):
            if not 0 < spec < 1:
                raise ValueError(f"compress_: ranks={spec!r} for {self.name}: a float is a fraction of the dense "
                                 f"weight's parameters, in (0, 1)")
            budget = spec * self.dense_parameters
            fits = [r for r in range(1, max(self.sizes) + 1)
                    if _weight_parameters(self.in_shape, self.out_shape, _capped(r, self.sizes), num_blocks) <= budget]
            if not fits:
                raise CannotCompressError(
                    f"compress_: ranks={spec} for {self.name} allows {budget:,.0f} weight parameters, but rank 1 with "
                    f"num_blocks={num_blocks} takes "
                    f"{_weight_parameters(self.in_shape, self.out_shape, _capped(1, self.sizes), num_blocks):,} "
                    f"(in_shape={self.in_shape}, out_shape={self.out_shape})")
            return _capped(max(fits), self.sizes), num_blocks
        if isinstance(spec, numbers.Integral) and not isinstance(spec, bool):
            if spec < 1:
                raise ValueError(f"compress_: ranks={spec} for {self.name} must be >= 1")
            return _capped(int(spec), self.sizes), num_blocks
        if isinstance(spec, (tuple, list)) and all(isinstance(r, numbers.Integral) and not isinstance(r, bool)
                                                    for r in spec):
            ranks = tuple(int(r) for r in spec)
            if len(ranks) != len(self.sizes) or any(not 1 <= r <= s for r, s in zip(ranks, self.sizes)):
                raise ValueError(f"compress_: ranks={spec} for {self.name}: need one rank per mode, each in "
                                 f"[1, I_k*J_k] for the mode sizes {self.sizes}")
            return ranks, num_blocks
        raise TypeError(f"compress_: ranks for {self.name} must be an int, one int per mode, a float fraction in "
                        f"(0, 1), accel.nn.TargetError(error) or 'full', got {spec!r}")

    def weight_parameters(self, ranks, num_blocks) -> int:
        return _weight_parameters(self.in_shape, self.out_shape, ranks, num_blocks)

    def build(self, ranks, num_blocks, decompose: bool) -> tuple[nn.Module, float | None]:
        """The BT module at these ranks (decomposed from the trained weight, or freshly initialised)."""
        module = self.module
        with warnings.catch_warnings():
            if self.weight_parameters(ranks, num_blocks) > self.dense_parameters:  # asked for ("full", a mapping)
                warnings.simplefilter("ignore")
            if self.kind in ("LSTM", "GRU", "RNN"):
                cls = _RECURRENT[type(module)]
                shapes = dict(in_shape=self.in_shape, hidden_shape=self.hidden_shape, ranks=ranks,
                              num_blocks=num_blocks)
                if decompose:
                    twin = getattr(cls, "from_" + self.kind.lower())(module, **shapes, **self.options)
                    return twin, twin.reconstruction_error
                extra = {"nonlinearity": module.nonlinearity} if self.kind == "RNN" else {}
                p = module.weight_ih_l0
                twin = cls(module.input_size, module.hidden_size, num_layers=module.num_layers, bias=module.bias,
                           batch_first=module.batch_first, dropout=module.dropout, bidirectional=module.bidirectional,
                           device=p.device, dtype=p.dtype, **shapes, **extra)
                return twin, None
            weight = self.dense_weight.detach()
            bias = None if module.bias is None else module.bias.detach()
            shapes = dict(in_shape=self.in_shape, out_shape=self.out_shape, ranks=ranks, num_blocks=num_blocks)
            if decompose:
                twin = BTLinear.from_dense(weight, bias, **shapes, **self.options)
                return twin, twin.reconstruction_error
            out_features, in_features = weight.shape
            twin = BTLinear(in_features, out_features, bias=bias is not None, device=weight.device, dtype=weight.dtype,
                            **shapes)
            return twin, None

    def search(self, target: TargetError, num_blocks: int):
        """Bisection over a common rank for the smallest meeting ``target`` within the dense size; None if none."""
        useful = [r for r in range(1, max(self.sizes) + 1)
                  if self.weight_parameters(_capped(r, self.sizes), num_blocks) < self.dense_parameters]
        if not useful:
            return None
        low, high = 1, max(useful)
        built = {}

        def meets(rank):
            built[rank] = self.build(_capped(rank, self.sizes), num_blocks, True)
            return built[rank][1] <= target.error

        if not meets(high):
            return None
        while low < high:
            middle = (low + high) // 2
            if meets(middle):
                high = middle
            else:
                low = middle + 1
        twin, error = built[high] if high in built else self.build(_capped(high, self.sizes), num_blocks, True)
        return twin, error, _capped(high, self.sizes)


def _per_layer(value, name: str, what: str):
    if isinstance(value, Mapping):
        if name not in value:
            raise KeyError(f"compress_: {what} is a mapping without an entry for the selected layer {name!r}")
        return value[name]
    return value


def compress_(model: nn.Module, filter_fn: Callable[[nn.Module, str], bool] | None = None, *, ranks=4,
              num_blocks: int | Mapping[str, int] = 2, shapes: Mapping[str, tuple] | None = None,
              decompose: bool = True, **decomposition_options) -> CompressionSummary:
    r"""Replace a model's linear and recurrent layers, in place, by block-term layers initialised from their weights.

    ``nn.Linear`` (exactly; and transformers' ``Conv1D``) becomes :class:`accel.nn.BTLinear`; ``nn.LSTM`` /
    ``nn.GRU`` / ``nn.RNN`` become :class:`accel.nn.BTLSTM` / ``BTGRU`` / ``BTRNN``, whose first layer's
    input-to-hidden weight is block-term (the other weights are copied as they are).

    Args:
        model (nn.Module): the trained model (not wrapped in ``DistributedDataParallel`` / FSDP).
        filter_fn (callable, optional): ``filter_fn(module, name) -> bool`` picks among the candidate layers. A
            layer it picks that has no block-term form raises :class:`CannotCompressError`. Default: the layers
            named in ``ranks`` when that is a mapping, else every candidate whose block-term weight at ``ranks``
            is smaller than its dense weight; the others are listed in ``summary.skipped`` with the reason.
        ranks: the Tucker ranks of each block, as

            * an int ``R`` (every mode, capped at the mode's size ``I_k * J_k``) or one int per mode;
            * a float in (0, 1): a fraction of the dense weight's parameters; the largest common rank whose
              block-term weight fits in it;
            * :class:`TargetError` (``accel.nn.TargetError(0.05)``): the smallest common rank whose relative
              reconstruction error is at most 0.05 (a layer that would need its dense size stays dense);
            * ``"full"``: one block with the full multilinear ranks: exact, so the model computes the same
              function (larger than dense; for checking a pipeline);
            * a mapping ``{layer name: any of the above}``.

            For a recurrent layer these apply to its first layer's input-to-hidden weight (all gates).
            Default: 4.
        num_blocks (int or mapping): the number ``N`` of Tucker blocks, or ``{layer name: N}``. Default: 2
            (``"full"`` uses 1).
        shapes (mapping, optional): ``{layer name: (in_shape, out_shape)}`` (for a recurrent layer
            ``(in_shape, hidden_shape)``), the factorisations of the feature sizes; default: balanced factors,
            as ``BTLinear`` chooses them.
        decompose (bool): initialise from the trained weights (default). ``False`` builds the same layers freshly
            initialised, for loading a compressed model's ``state_dict``: pass ``ranks=summary.ranks,
            num_blocks=summary.num_blocks`` from the compression that made it.
        **decomposition_options: ``n_iter``, ``tol``, ``num_restarts``, ``random_state``, ``progress``, ... of
            :func:`accel.nn.block_term_decomposition`.

    Returns:
        CompressionSummary: per layer, the parameters before and after, the relative reconstruction error, the
        ranks and shapes (``str(summary)`` is a table).

    Raises:
        TiedWeightError: a selected layer's weight is shared with another module (compressing would untie it).
        CannotCompressError: a selected layer cannot be factorised (a prime feature size, an LSTM with
            ``proj_size``, a fraction too small for rank 1); the message names it.

    Example::

        >>> summary = accel.nn.compress_(model, lambda m, name: name == "encoder", ranks=0.05)
        >>> print(summary)          # parameters before/after and reconstruction error per layer
        >>> # fine-tune model as usual; optimizers must be built after compress_ (new parameters)
    """
    check_wrapping(model, "compress_")
    if filter_fn is not None and not callable(filter_fn):
        raise TypeError(f"filter_fn must be callable as filter_fn(module, name), got {filter_fn!r}")
    if isinstance(ranks, Mapping):
        candidates = {name for name, module in model.named_modules() if _kind(module)}
        unknown = sorted(set(ranks) - candidates)
        if unknown:
            raise KeyError(f"compress_: ranks names {unknown}, which are not Linear/Conv1D/LSTM/GRU/RNN layers of the "
                           f"model (candidates: {sorted(candidates)})")
    for name in sorted(set(shapes or {})):
        try:
            kind = _kind(model.get_submodule(name))
        except AttributeError:
            kind = None
        if kind is None:
            raise KeyError(f"compress_: shapes names {name!r}, which is not a Linear/Conv1D/LSTM/GRU/RNN layer")
    given = sorted({"in_shape", "out_shape", "hidden_shape"} & set(decomposition_options))
    if given:
        raise TypeError(f"compress_: {given} apply per layer: pass shapes={{name: (in_shape, out_shape)}}")
    explicit = filter_fn is not None or isinstance(ranks, Mapping)

    layers, skipped = [], []
    for name, module in model.named_modules():
        if _kind(module) is None:
            continue
        if filter_fn is not None and not filter_fn(module, name):
            continue
        if filter_fn is None and isinstance(ranks, Mapping) and name not in ranks:
            continue
        try:
            layer = _Layer(name, module, (shapes or {}).get(name), decomposition_options)
        except CannotCompressError as error:
            if explicit:
                raise
            skipped.append((name, str(error).split(": ", 1)[1]))
            continue
        layers.append(layer)

    owners = parameter_owners(model)
    for layer in layers:  # refuse before changing anything
        for param_name, param in layer.module.named_parameters(recurse=False):
            others = [o for o in owners.get(id(param), []) if o != f"{layer.name}.{param_name}"]
            if others:
                raise TiedWeightError(f"compress_: {layer.name}.{param_name} is tied to {', '.join(others)} (one "
                                      f"Parameter); a block-term layer has its own parameters, so compressing would "
                                      f"untie them. Leave {layer.name!r} out with filter_fn")
    aliases: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        aliases.setdefault(id(module), []).append(name)

    results = []
    for layer in layers:
        spec = _per_layer(ranks, layer.name, "ranks")
        blocks = _per_layer(num_blocks, layer.name, "num_blocks")
        if isinstance(blocks, bool) or not isinstance(blocks, numbers.Integral) or blocks < 1:
            raise ValueError(f"compress_: num_blocks for {layer.name} must be a positive int, got {blocks!r}")
        try:
            resolved = layer.resolve(spec, int(blocks))
        except CannotCompressError as error:
            if explicit:
                raise
            skipped.append((layer.name, str(error).split(f"for {layer.name} ", 1)[-1]))
            continue
        if resolved is None:  # a target error
            if not decompose:
                raise ValueError("compress_: ranks=TargetError(...) needs the trained weights (decompose=True); to "
                                 "rebuild a compressed model pass ranks=summary.ranks, num_blocks=summary.num_blocks")
            found = layer.search(spec, int(blocks))
            if found is None:
                skipped.append((layer.name, f"relative error {spec.error} needs at least as many parameters as the "
                                            f"dense weight"))
                continue
            twin, error, layer_ranks = found
            blocks = int(blocks)
        else:
            layer_ranks, blocks = resolved
            if not explicit and spec != "full" and (
                    layer.weight_parameters(layer_ranks, blocks) >= layer.dense_parameters):
                skipped.append((layer.name, f"ranks {layer_ranks} x {blocks} blocks take "
                                            f"{layer.weight_parameters(layer_ranks, blocks):,} parameters, the dense "
                                            f"weight {layer.dense_parameters:,}"))
                continue
            twin, error = layer.build(layer_ranks, blocks, decompose)
        twin.train(layer.module.training)
        for alias in aliases[id(layer.module)]:
            set_module(model, alias, twin)
        results.append(LayerCompression(layer.name, layer.kind, _count(layer.module), _count(twin), error,
                                        tuple(layer_ranks), int(blocks), layer.in_shape, layer.out_shape))
    return CompressionSummary(results, skipped)
