"""``BTRNN``, ``BTLSTM``, ``BTGRU``: the ``torch.nn`` recurrent layers with a Block-Term input weight.

Only the first layer's input-to-hidden weight is block-term (Ye et al., CVPR 2018): that is the
weight that grows with the input (57,600 x 1,024 for 160x120x3 video frames) and the one that BT
compresses by orders of magnitude. The gates share one :class:`~accel.nn.BTLinear` whose output
shape's first mode is multiplied by the number of gates, so its flat output splits into the gates in
``torch.nn`` order (LSTM: i, f, g, o; GRU: r, z, n). Its projection is computed for all time steps
in one call before the recurrence.

Layers after the first take ``hidden_size * num_directions`` inputs: those input weights stay dense,
like every hidden-to-hidden weight. They are as small as the recurrent weights, so a BT factorisation
would save little, and keeping them dense lets ``from_lstm`` copy them exactly. Dense parameters carry
``torch.nn``'s names (``weight_hh_l0``, ``weight_ih_l1_reverse``, ...); the first layer's BT layers are
``input_projection`` (and ``input_projection_reverse``), whose bias is ``torch.nn``'s ``bias_ih_l0``.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from accel.nn.bt.linear import BTLinear
from accel.nn.bt.shapes import auto_num_modes, balanced_factors
from accel.nn.recurrence._op import fused_direction, padded_direction
from accel.nn.recurrence._reference import CELLS, GATES, run_direction

__all__ = ["BTRNN", "BTLSTM", "BTGRU"]

_RECURRENCES = ("fused", "loop")

# what torch says when an autograd.Function or a custom op without functorch rules meets a torch.func transform
_FUNCTORCH_REFUSALS = ("functorch transforms", "Batching rule not implemented for")


def _refuse_functorch(error: RuntimeError, what: str, instead: str) -> None:
    """Raise a clear error in place of torch's generic one when ``error`` is torch.func refusing a custom
    autograd rule; return otherwise (the caller re-raises ``error``)."""
    if any(refusal in str(error) for refusal in _FUNCTORCH_REFUSALS):
        raise RuntimeError(f"torch.func transforms (grad, vmap, jacrev, ...) are not supported by {what}: it "
                           f"runs a custom autograd rule without functorch support. To use torch.func, {instead}; "
                           f"or take gradients with torch.autograd") from error


class _BTRNNBase(nn.Module):
    _torch_class: type = nn.Module

    def __init__(self, mode: str, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False, *,
                 in_shape: Sequence[int] | None = None, hidden_shape: Sequence[int] | None = None,
                 ranks: int | Sequence[int] = 4, num_blocks: int = 2, recurrence: str = "fused", device=None,
                 dtype=None):
        super().__init__()
        if recurrence not in _RECURRENCES:
            raise ValueError(f"recurrence must be one of {_RECURRENCES}, got {recurrence!r}")
        self.recurrence = recurrence
        for name, value in (("input_size", input_size), ("hidden_size", hidden_size), ("num_layers", num_layers)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not isinstance(dropout, (int, float)) or not 0 <= dropout <= 1 or isinstance(dropout, bool):
            raise ValueError(f"dropout must be a number in [0, 1], got {dropout!r}")
        self.mode, self.input_size, self.hidden_size, self.num_layers = mode, input_size, hidden_size, num_layers
        self.bias, self.batch_first, self.dropout = bias, batch_first, float(dropout)
        self.bidirectional, self.num_directions = bidirectional, 2 if bidirectional else 1
        self.num_gates = GATES[mode]
        if in_shape is None and hidden_shape is None:
            d = auto_num_modes(input_size, hidden_size)
        else:
            d = len(in_shape) if in_shape is not None else len(hidden_shape)
        in_shape = tuple(in_shape) if in_shape is not None else balanced_factors(input_size, d)
        hidden_shape = tuple(hidden_shape) if hidden_shape is not None else balanced_factors(hidden_size, d)
        if math.prod(hidden_shape) != hidden_size or any(h < 1 for h in hidden_shape):
            raise ValueError(f"hidden_shape={hidden_shape} has product {math.prod(hidden_shape)}, "
                             f"but hidden_size={hidden_size}")
        self.in_shape, self.hidden_shape = in_shape, hidden_shape
        out_shape = (self.num_gates * hidden_shape[0], *hidden_shape[1:])
        kw = {"device": device, "dtype": dtype}
        gate_size = self.num_gates * hidden_size
        for direction in range(self.num_directions):
            suffix = "_reverse" if direction else ""
            projection = BTLinear(input_size, gate_size, in_shape=in_shape, out_shape=out_shape, ranks=ranks,
                                  num_blocks=num_blocks, bias=bias, **kw)
            setattr(self, "input_projection" + suffix, projection)
            for name, shape in self._dense_shapes(direction):
                self.register_parameter(name, nn.Parameter(torch.empty(shape, **kw)))
            self._reset_dense(direction)

    def _dense_shapes(self, direction: int) -> list[tuple[str, tuple[int, ...]]]:
        """Names and shapes of one direction's dense parameters, in ``torch.nn``'s order per layer."""
        suffix = "_reverse" if direction else ""
        gate_size = self.num_gates * self.hidden_size
        shapes = []
        for layer in range(self.num_layers):
            shapes.append((f"weight_hh_l{layer}{suffix}", (gate_size, self.hidden_size)))
            if self.bias:
                shapes.append((f"bias_hh_l{layer}{suffix}", (gate_size,)))
            if layer > 0:
                shapes.append((f"weight_ih_l{layer}{suffix}", (gate_size, self.hidden_size * self.num_directions)))
                if self.bias:
                    shapes.append((f"bias_ih_l{layer}{suffix}", (gate_size,)))
        return shapes

    def _reset_dense(self, direction: int) -> None:
        """``torch.nn``'s ``U(-1/sqrt(H), 1/sqrt(H))`` for the projection's bias (``b_ih`` of the first layer)
        and every dense weight and bias of one direction."""
        bound = 1.0 / math.sqrt(self.hidden_size)
        with torch.no_grad():
            bias = getattr(self._input_projection(direction), "bias", None)
            if isinstance(bias, torch.Tensor):
                bias.uniform_(-bound, bound)
            for name, _ in self._dense_shapes(direction):
                getattr(self, name).uniform_(-bound, bound)

    def reset_parameters(self) -> None:
        """Initialise every parameter afresh, as at construction: the input projection by its own
        ``reset_parameters`` (for :class:`~accel.nn.BTLinear`, cores and factors scaled so that the dense weight
        has ``nn.Linear``'s variance), then its bias and every dense weight and bias from ``torch.nn``'s
        ``U(-1/sqrt(hidden_size), 1/sqrt(hidden_size))``. With ``to_empty()`` after a construction on the
        ``"meta"`` device, this makes a usable layer."""
        for direction in range(self.num_directions):
            projection = self._input_projection(direction)
            reset = getattr(projection, "reset_parameters", None)
            if not callable(reset):
                raise TypeError(f"{type(self).__name__}.reset_parameters: the input projection "
                                f"({type(projection).__name__}) has no reset_parameters() to initialise it")
            reset()
            self._reset_dense(direction)

    @property
    def ranks(self) -> tuple[int, ...]:
        return self.input_projection.ranks

    @property
    def num_blocks(self) -> int:
        return self.input_projection.num_blocks

    def _weights(self, layer: int, direction: int):
        suffix = f"_l{layer}" + ("_reverse" if direction else "")
        get = lambda name: getattr(self, name + suffix, None)  # noqa: E731
        return get("weight_ih"), get("bias_ih"), get("weight_hh"), get("bias_hh")

    def _project(self, layer: int, direction: int, data: torch.Tensor) -> torch.Tensor:
        """Input-to-hidden projection of all time steps at once, ``b_ih`` included. The first layer calls its
        projection as a module, so its hooks, pruning and parametrizations apply on every recurrence."""
        if layer == 0:
            projection = self._input_projection(direction)
            try:
                return projection(data)
            except RuntimeError as error:
                _refuse_functorch(error, f"{type(self).__name__}.input_projection ({type(projection).__name__})",
                                  self._functorch_way)
                raise
        weight_ih, bias_ih, _, _ = self._weights(layer, direction)
        return nn.functional.linear(data, weight_ih, bias_ih)

    def _input_projection(self, direction: int) -> nn.Module:
        return getattr(self, "input_projection" + ("_reverse" if direction else ""))

    def _check_state(self, state: torch.Tensor, name: str, batch: int, batched: bool) -> torch.Tensor:
        expected = (self.num_layers * self.num_directions, batch, self.hidden_size)
        shape = tuple(state.shape) if batched else (state.shape[0], 1, *state.shape[1:])
        if state.dim() != (3 if batched else 2) or shape != expected:
            raise ValueError(f"expected {name} of shape {expected if batched else (expected[0], expected[2])}, "
                             f"got {tuple(state.shape)}")
        return state if batched else state.unsqueeze(1)

    def forward(self, input, hx=None):
        """Same arguments and returns as ``torch.nn.RNN`` / ``LSTM`` / ``GRU``.

        Args:
            input: ``(L, B, input_size)`` (``(B, L, input_size)`` if ``batch_first``), ``(L, input_size)``
                unbatched, or a ``PackedSequence``.
            hx: initial hidden state ``(num_layers * num_directions, B, hidden_size)``; for ``BTLSTM`` a
                tuple ``(h_0, c_0)``. Zeros when not given.

        Returns:
            ``(output, h_n)`` (``(output, (h_n, c_n))`` for ``BTLSTM``): ``output`` is
            ``(L, B, num_directions * hidden_size)`` or a ``PackedSequence`` when the input is one.
        """
        if self.recurrence not in _RECURRENCES:
            raise ValueError(f"recurrence must be one of {_RECURRENCES}, got {self.recurrence!r}")
        if torch.onnx.is_in_onnx_export() and torch.jit.is_tracing():
            raise RuntimeError(f"torch.onnx.export(..., dynamo=False) (the TorchScript exporter) does not support "
                               f"{type(self).__name__}: export with torch.onnx.export(..., dynamo=True), which "
                               f"writes ONNX's own {self._onnx_operator} operator with a dynamic sequence length")
        packed = isinstance(input, PackedSequence)
        if packed:
            data, batch_sizes, sorted_indices, unsorted_indices = input
            batch, batched = int(batch_sizes[0]), True
        else:
            if not isinstance(input, torch.Tensor) or input.dim() not in (2, 3):
                raise ValueError(f"expected a 2-D (unbatched) or 3-D (batched) input or a PackedSequence, "
                                 f"got {getattr(input, 'shape', type(input).__name__)}")
            batched = input.dim() == 3
            data = input if batched else input.unsqueeze(1)
            data = data.transpose(0, 1) if (self.batch_first and batched) else data  # (L, B, features)
            if data.shape[0] == 0:
                raise ValueError(f"{type(self).__name__} needs a sequence length of at least 1 (as torch.nn's "
                                 f"RNNs do), got input of shape {tuple(input.shape)}")
            batch, batch_sizes = data.shape[1], None
            sorted_indices = unsorted_indices = None
        if data.shape[-1] != self.input_size:
            raise ValueError(f"input.size(-1) must be equal to input_size. Expected {self.input_size}, "
                             f"got {data.shape[-1]}")
        states = self._initial_states(hx, data, batch, batched, sorted_indices)
        finals = []
        for layer in range(self.num_layers):
            outputs = []
            for direction in range(self.num_directions):
                index = layer * self.num_directions + direction
                out, final = self._run_direction(layer, direction, data, batch_sizes,
                                                 tuple(s[index] for s in states))
                outputs.append(out)
                finals.append(final)
            data = torch.cat(outputs, dim=-1) if self.num_directions == 2 else outputs[0]
            if self.dropout and self.training and layer < self.num_layers - 1:
                data = nn.functional.dropout(data, self.dropout, training=True)
        final_states = [torch.stack([f[i] for f in finals]) for i in range(len(states))]
        if packed:
            output = PackedSequence(data, batch_sizes, sorted_indices, unsorted_indices)
            if unsorted_indices is not None:
                final_states = [s.index_select(1, unsorted_indices) for s in final_states]
        else:
            output = data.transpose(0, 1) if (self.batch_first and batched) else data
            if not batched:
                output, final_states = output.squeeze(1), [s.squeeze(1) for s in final_states]
        return output, (tuple(final_states) if self.mode == "LSTM" else final_states[0])

    def _initial_states(self, hx, data, batch, batched, sorted_indices) -> tuple[torch.Tensor, ...]:
        lstm = self.mode == "LSTM"
        if hx is None:
            zeros = data.new_zeros(self.num_layers * self.num_directions, batch, self.hidden_size)
            return (zeros, zeros) if lstm else (zeros,)
        if lstm and not (isinstance(hx, tuple) and len(hx) == 2):
            raise TypeError(f"BTLSTM expects hx as a tuple (h_0, c_0), got {type(hx).__name__}")
        if not lstm and not isinstance(hx, torch.Tensor):
            raise TypeError(f"{type(self).__name__} expects hx as one tensor h_0 (only BTLSTM takes a tuple "
                            f"(h_0, c_0)), got {type(hx).__name__}")
        states = tuple(self._check_state(s, name, batch, batched)
                       for s, name in zip(hx if lstm else (hx,), ("h_0", "c_0")))
        if sorted_indices is not None:
            states = tuple(s.index_select(1, sorted_indices) for s in states)
        return states

    def _run_direction(self, layer: int, direction: int, data: torch.Tensor, batch_sizes: torch.Tensor | None,
                       state: tuple[torch.Tensor, ...]):
        """One direction of one layer: ``data`` is packed ``(N, features)`` when ``batch_sizes`` is given,
        else padded ``(L, B, features)``; the output comes in the same layout."""
        _, _, weight_hh, bias_hh = self._weights(layer, direction)
        x_proj = self._project(layer, direction, data)
        reverse = direction == 1
        if self.recurrence == "fused":
            try:
                if batch_sizes is None:
                    return padded_direction(self.mode, x_proj, state, weight_hh, bias_hh, reverse)
                return fused_direction(self.mode, x_proj, batch_sizes, state, weight_hh, bias_hh, reverse)
            except RuntimeError as error:
                _refuse_functorch(error, f"{type(self).__name__} with recurrence='fused' (one custom op with a "
                                  "hand-written backward-through-time)", self._functorch_way)
                raise
        # the reference: a Python loop over the packed layout (a padded batch is the equal-lengths case)
        if batch_sizes is None:
            steps = x_proj.shape[0]
            out, final = run_direction(CELLS[self.mode], x_proj.flatten(0, 1), [x_proj.shape[1]] * steps, state,
                                       weight_hh, bias_hh, reverse)
            return out.unflatten(0, (steps, -1)), final
        return run_direction(CELLS[self.mode], x_proj, batch_sizes.tolist(), state, weight_hh, bias_hh, reverse)

    @property
    def _functorch_way(self) -> str:
        return (f"run {type(self).__name__} with recurrence='loop' and a BTLinear input projection of "
                f"contraction='lowrank' (layer.recurrence = 'loop'; "
                f"layer.input_projection.contraction = 'lowrank')")

    @property
    def _onnx_operator(self) -> str:
        return {"LSTM": "LSTM", "GRU": "GRU"}.get(self.mode, "RNN")

    def extra_repr(self) -> str:
        return (f"{self.input_size}, {self.hidden_size}, num_layers={self.num_layers}, bias={self.bias}, "
                f"batch_first={self.batch_first}, dropout={self.dropout}, bidirectional={self.bidirectional}, "
                f"in_shape={self.in_shape}, hidden_shape={self.hidden_shape}, ranks={self.ranks}, "
                f"num_blocks={self.num_blocks}")

    def _torch_kwargs(self) -> dict:
        return dict(num_layers=self.num_layers, bias=self.bias, batch_first=self.batch_first, dropout=self.dropout,
                    bidirectional=self.bidirectional)

    def to_dense_module(self) -> nn.Module:
        """The equivalent ``torch.nn`` module, with each BT input weight rebuilt as a dense matrix."""
        module = self._make_torch_module()
        with torch.no_grad():
            for name, parameter in module.named_parameters():
                if name.startswith("weight_ih_l0"):
                    source = getattr(self, "input_projection" + name[len("weight_ih_l0"):]).to_dense()
                elif name.startswith("bias_ih_l0"):
                    source = getattr(self, "input_projection" + name[len("bias_ih_l0"):]).bias
                else:
                    source = getattr(self, name)
                parameter.copy_(source)
        return module

    def _make_torch_module(self) -> nn.Module:
        p = self.input_projection.core
        return self._torch_class(self.input_size, self.hidden_size, **self._torch_kwargs(), device=p.device,
                                 dtype=p.dtype)

    @classmethod
    def _from_torch(cls, module: nn.Module, *, in_shape=None, hidden_shape=None, ranks=4, num_blocks=2,
                    **decomposition_options):
        if type(module) is not cls._torch_class:
            raise TypeError(f"{cls.__name__} compresses an {cls._torch_class.__name__}, got {type(module).__name__}")
        if getattr(module, "proj_size", 0):
            raise ValueError(f"LSTMs with projections are not supported, got proj_size={module.proj_size}")
        p = module.weight_ih_l0
        extra = {"nonlinearity": module.nonlinearity} if cls is BTRNN else {}
        layer = cls(module.input_size, module.hidden_size, num_layers=module.num_layers, bias=module.bias,
                    batch_first=module.batch_first, dropout=module.dropout, bidirectional=module.bidirectional,
                    in_shape=in_shape, hidden_shape=hidden_shape, ranks=ranks, num_blocks=num_blocks,
                    device=p.device, dtype=p.dtype, **extra)
        errors = []
        with torch.no_grad():
            for name, parameter in layer.named_parameters():
                if not name.startswith("input_projection"):
                    parameter.copy_(getattr(module, name))
            for direction in range(layer.num_directions):
                suffix = "_reverse" if direction else ""
                old = getattr(layer, "input_projection" + suffix)
                new = BTLinear.from_dense(getattr(module, "weight_ih_l0" + suffix).detach(),
                                          getattr(module, "bias_ih_l0" + suffix).detach() if module.bias else None,
                                          in_shape=old.in_shape, out_shape=old.out_shape, ranks=old.ranks,
                                          num_blocks=old.num_blocks, **decomposition_options)
                setattr(layer, "input_projection" + suffix, new)
                errors.append(new.reconstruction_error)
        layer.reconstruction_error = max(errors)
        return layer


_CONSTRUCTOR_DOC = """
    Args:
        input_size (int): features per input step.
        hidden_size (int): features of the hidden state.
        num_layers (int): stacked layers. Default: 1.
        bias (bool): use the ``b_ih`` and ``b_hh`` biases. Default: ``True``.
        batch_first (bool): input and output are ``(batch, seq, feature)``. Default: ``False``.
        dropout (float): dropout on the outputs of each layer but the last. Default: 0.
        bidirectional (bool): run a second, reversed, direction. Default: ``False``.
        in_shape (sequence of int, optional): factorisation of ``input_size`` (automatic when not given).
        hidden_shape (sequence of int, optional): factorisation of ``hidden_size``, same number of modes;
            the BT layer's output shape is ``(gates * hidden_shape[0], *hidden_shape[1:])``.
        ranks (int or sequence of int): Tucker ranks of the BT input weight. Default: 4.
        num_blocks (int): number of Tucker blocks. Default: 2.
        recurrence (str): ``"fused"``: each direction of each layer is one op with a hand-written
            backward-through-time (:mod:`accel.nn.recurrence._op`), which ``torch.export`` keeps with a
            dynamic sequence length; ``"loop"``: the Python reference loop that autograd differentiates
            step by step (exported unrolled at a fixed length; the one that ``torch.func`` transforms run,
            with a BTLinear projection of ``contraction="lowrank"``). Default: ``"fused"``.
        device, dtype: of the parameters (factory arguments, as for ``torch.nn.LSTM``; ``device="meta"`` then
            ``to_empty()`` and :meth:`reset_parameters` make a layer without initialising it twice).
"""


class BTRNN(_BTRNNBase):
    """``torch.nn.RNN`` with a Block-Term input-to-hidden weight in the first layer.

    Takes ``nonlinearity`` (``"tanh"`` or ``"relu"``, default ``"tanh"``) besides the arguments below.
    """ + _CONSTRUCTOR_DOC
    _torch_class = nn.RNN

    def __init__(self, input_size, hidden_size, num_layers=1, nonlinearity="tanh", bias=True, batch_first=False,
                 dropout=0.0, bidirectional=False, **bt_kwargs):
        if nonlinearity not in ("tanh", "relu"):
            raise ValueError(f"nonlinearity must be 'tanh' or 'relu', got {nonlinearity!r}")
        self.nonlinearity = nonlinearity
        super().__init__("RNN_" + nonlinearity.upper(), input_size, hidden_size, num_layers, bias, batch_first,
                         dropout, bidirectional, **bt_kwargs)

    def _torch_kwargs(self):
        return {**super()._torch_kwargs(), "nonlinearity": self.nonlinearity}

    @classmethod
    def from_rnn(cls, rnn: nn.RNN, **kwargs) -> "BTRNN":
        """Compress a trained ``nn.RNN``; keyword arguments as for :meth:`BTLSTM.from_lstm`."""
        return cls._from_torch(rnn, **kwargs)


class BTLSTM(_BTRNNBase):
    """``torch.nn.LSTM`` with a Block-Term input-to-hidden weight in the first layer (gates i, f, g, o).
    """ + _CONSTRUCTOR_DOC
    _torch_class = nn.LSTM

    def __init__(self, input_size, hidden_size, num_layers=1, bias=True, batch_first=False, dropout=0.0,
                 bidirectional=False, **bt_kwargs):
        super().__init__("LSTM", input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional,
                         **bt_kwargs)

    @classmethod
    def from_lstm(cls, lstm: nn.LSTM, **kwargs) -> "BTLSTM":
        """Compress a trained ``nn.LSTM``: the first layer's input weights by block-term decomposition,
        everything else copied. Keyword arguments: ``in_shape``, ``hidden_shape``, ``ranks``,
        ``num_blocks`` and the options of :func:`accel.nn.bt.decompose.block_term_decomposition`. The largest
        relative reconstruction error of the compressed weights is stored in ``reconstruction_error``."""
        return cls._from_torch(lstm, **kwargs)


class BTGRU(_BTRNNBase):
    """``torch.nn.GRU`` with a Block-Term input-to-hidden weight in the first layer (gates r, z, n).
    """ + _CONSTRUCTOR_DOC
    _torch_class = nn.GRU

    def __init__(self, input_size, hidden_size, num_layers=1, bias=True, batch_first=False, dropout=0.0,
                 bidirectional=False, **bt_kwargs):
        super().__init__("GRU", input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional,
                         **bt_kwargs)

    @classmethod
    def from_gru(cls, gru: nn.GRU, **kwargs) -> "BTGRU":
        """Compress a trained ``nn.GRU``; keyword arguments as for :meth:`BTLSTM.from_lstm`."""
        return cls._from_torch(gru, **kwargs)
