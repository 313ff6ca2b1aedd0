"""``BTLinear``: a linear layer whose weight is a Block-Term (BT) tensor.

The weight ``W`` (``in_features x out_features``, ``in_features = prod(in_shape)``,
``out_features = prod(out_shape)``) is folded into a d-order tensor with modes ``I_k * J_k`` and
written as a sum of ``N`` Tucker blocks (Ye et al., CVPR 2018)::

    W[i_1..i_d, j_1..j_d] = sum_n sum_r core[n, r_1..r_d] * prod_k factors[k][n, i_k, j_k, r_k]

The forward pass never rebuilds ``W`` unless a cost model (:mod:`accel.nn.bt._paths`) says that is
cheaper for the batch at hand (then :mod:`accel.nn.bt._dense`): it contracts the input with the cores
and factors, either as a chain of plain GEMMs with a hand-written backward (:mod:`accel.nn.bt._contract`)
or along an ``opt_einsum`` path chosen per batch size and cached (the reference twin, and the fallback
where the chain costs many more flops).
"""
from __future__ import annotations

import math
import warnings
from typing import Sequence

import torch
from torch import nn

from accel.nn.bt._compiled import compiled_factorized_product
from accel.nn.bt._contract import gemm_chain_contract
from accel.nn.bt._dense import RebuildWorkspace, matmul_dtype, rebuild_linear
from accel.nn.bt._factorized import chunk_rows, factorized_product
from accel.nn.bt._lowrank import lowrank_linear
from accel.nn.bt._paths import (ELEMENT_FLOPS, FACTORIZED_FLOP_PENALTY,  # noqa: F401 (re-exported)
                               GEMM_CHAIN_MAX_EXTRA_FLOPS, REBUILD_FLOP_PENALTY, chain_plan, contraction_costs,
                               contraction_method, dense_is_cheaper, factorized_expression, factorized_method,
                               rebuild_expression)
from accel.nn.bt.shapes import (auto_num_modes, balanced_factors, check_shape,  # noqa: F401 (re-exported)
                                 resolve_ranks, weight_parameters)
from accel.nn.bt._traced import (compiled_rebuild_linear, contract_steps, eager_splits, is_tracing, plan_rows,
                               rebuild_matmul, traced_plan)

__all__ = ["BTLinear", "balanced_factors"]

_CONTRACTIONS = ("auto", "factorized", "gemm", "einsum", "dense", "lowrank")


class BTLinear(nn.Module):
    r"""Applies ``y = x W^T + b`` with ``W`` stored as a Block-Term tensor.

    Args:
        in_features (int): size of each input sample, ``prod(in_shape)``.
        out_features (int): size of each output sample, ``prod(out_shape)``.
        in_shape (sequence of int, optional): the factorisation ``I_1..I_d`` of ``in_features``.
            Chosen automatically (balanced factors, d <= 4) when not given.
        out_shape (sequence of int, optional): the factorisation ``J_1..J_d`` of ``out_features``,
            with the same ``d`` as ``in_shape``. Chosen automatically when not given.
        ranks (int, float or sequence of int): the Tucker ranks ``R_1..R_d`` of every block. An int is
            used for every mode and capped at each mode's size ``I_k * J_k`` (with a warning); a float in
            (0, 1) is a fraction of the dense weight's parameters (as in tensorly-torch): the largest
            rank, the same for every mode and capped likewise, whose weight fits in it; a sequence must
            have one entry per mode, each at most ``I_k * J_k``. Default: 4.
        num_blocks (int): the number ``N`` of Tucker blocks. Default: 2.
        bias (bool): if ``False``, the layer learns no additive bias. Default: ``True``.
        contraction (str): ``"auto"`` (per batch size, by flops, where those of the factorized path
            count ``FACTORIZED_FLOP_PENALTY`` (4) and those of rebuilding ``W`` ``REBUILD_FLOP_PENALTY``
            (2) times those of the dense GEMM, and every element a path moves ``ELEMENT_FLOPS`` (100)
            flops), ``"factorized"`` (always
            contract through the factors, by ``"gemm"`` or ``"einsum"``: the GEMM chain unless it costs
            more than ``GEMM_CHAIN_MAX_EXTRA_FLOPS`` (1.15) times the flops of the opt_einsum path, or
            d = 1), ``"gemm"`` (the chain of GEMMs with a hand-written backward, d >= 2), ``"einsum"``
            (the opt_einsum path with autograd), ``"dense"`` (always rebuild ``W``, with one GEMM into
            ``workspace``, and multiply) or ``"lowrank"`` (multiply by ``W``'s two thin factors in turn, factor 0
            and the rest of the block term, :mod:`accel.nn.bt._lowrank`; ``"auto"`` weighs it as well).
            Default: ``"auto"``.
        device, dtype: of the parameters, as for ``nn.Linear``.

    Shape:
        - Input: ``(*, in_features)``; Output: ``(*, out_features)``.

    Attributes:
        core (Parameter): ``(N, R_1, ..., R_d)``.
        factors (ParameterList): ``d`` tensors, the k-th of shape ``(N, I_k, J_k, R_k)``.
        bias (Parameter or None): ``(out_features,)``.
        reconstruction_error (float or None): relative Frobenius error of ``from_dense``.
        workspace (RebuildWorkspace): the dense path keeps ``W`` and its gradient here between calls
            (2 x ``in_features * out_features`` elements once used); ``layer.workspace.clear()`` frees them.

    The weight uses ``N * (sum_k I_k J_k R_k + prod_k R_k)`` parameters (``num_weight_parameters``); a layer
    larger than the dense weight is built with a warning giving both figures. As for ``nn.Linear``, the input
    must have the parameters' dtype (autocast aside).

    Under ``torch.compile``, ``torch.export`` (a dynamic batch included), ``torch.onnx.export(dynamo=True)``,
    ``torch.jit.trace`` or on FakeTensors the layer runs the same contraction with ordinary ops, its plan made
    outside the graph (:mod:`accel.nn.bt._traced`); no traced tensor reaches a cache or ``workspace`` (compiled, the
    dense path is one custom op that runs the eager kernels, workspace included, on the real tensors).
    """

    def __init__(self, in_features: int, out_features: int, *, in_shape: Sequence[int] | None = None,
                 out_shape: Sequence[int] | None = None, ranks: int | Sequence[int] = 4, num_blocks: int = 2,
                 bias: bool = True, contraction: str = "auto", device=None, dtype=None):
        super().__init__()
        for name, value in (("in_features", in_features), ("out_features", out_features), ("num_blocks", num_blocks)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if contraction not in _CONTRACTIONS:
            raise ValueError(f"contraction must be one of {_CONTRACTIONS}, got {contraction!r}")
        if in_shape is None and out_shape is None:
            d = auto_num_modes(in_features, out_features)
        else:
            d = len(in_shape) if in_shape is not None else len(out_shape)
        in_shape = balanced_factors(in_features, d) if in_shape is None else in_shape
        out_shape = balanced_factors(out_features, d) if out_shape is None else out_shape
        self.in_shape = check_shape("in_shape", in_shape, in_features, "in_features")
        self.out_shape = check_shape("out_shape", out_shape, out_features, "out_features")
        if len(self.in_shape) != len(self.out_shape):
            raise ValueError(f"in_shape={self.in_shape} and out_shape={self.out_shape} must have the same "
                             f"number of modes, got {len(self.in_shape)} and {len(self.out_shape)}")
        self.ranks = resolve_ranks(ranks, self.in_shape, self.out_shape, num_blocks)
        if contraction == "gemm" and len(self.in_shape) < 2:
            raise ValueError(f"contraction='gemm' needs at least 2 modes, got in_shape={self.in_shape}")
        self.in_features, self.out_features, self.num_blocks = in_features, out_features, num_blocks
        self.contraction = contraction
        self.max_intermediate_bytes = 8 * 2**20
        self.workspace = RebuildWorkspace()  # the dense path's W and grad W, reused across calls
        self.reconstruction_error: float | None = None
        kw = {"device": device, "dtype": dtype}
        self.core = nn.Parameter(torch.empty(num_blocks, *self.ranks, **kw))
        self.factors = nn.ParameterList(
            nn.Parameter(torch.empty(num_blocks, i, j, r, **kw))
            for i, j, r in zip(self.in_shape, self.out_shape, self.ranks))
        self.bias = nn.Parameter(torch.empty(out_features, **kw)) if bias else None
        self.reset_parameters()
        dense = in_features * out_features
        if self.num_weight_parameters > dense:
            warnings.warn(f"BTLinear({in_features}, {out_features}) with in_shape={self.in_shape}, out_shape="
                          f"{self.out_shape}, ranks={self.ranks}, num_blocks={num_blocks} has "
                          f"{self.num_weight_parameters:,} weight parameters, "
                          f"{self.num_weight_parameters / dense:.1f}x "
                          f"the {dense:,} of a dense weight: lower ranks or fewer blocks (or features that "
                          f"factor into more modes) compress it", stacklevel=2)

    @property
    def num_modes(self) -> int:
        """The tensor order ``d``."""
        return len(self.in_shape)

    @property
    def num_weight_parameters(self) -> int:
        """``N * (sum_k I_k J_k R_k + prod_k R_k)``: the parameters of the BT weight."""
        return weight_parameters(self.in_shape, self.out_shape, self.ranks, self.num_blocks)

    @property
    def num_parameters(self) -> int:
        """All parameters: the BT weight plus the bias."""
        return self.num_weight_parameters + (self.out_features if self.bias is not None else 0)

    @property
    def compression_ratio(self) -> float:
        """Dense weight size over BT weight size, ``in_features * out_features / num_weight_parameters``."""
        return self.in_features * self.out_features / self.num_weight_parameters

    def reset_parameters(self) -> None:
        """Normal cores and factors scaled so that ``to_dense()`` has ``nn.Linear``'s weight variance.

        ``nn.Linear`` draws ``U(-1/sqrt(in), 1/sqrt(in))``: variance ``1 / (3 in_features)``. An entry of
        ``W`` is a sum of ``N * prod_k R_k`` products of one core entry and ``d`` factor entries, all
        independent with zero mean, so its variance is ``N prod(R) var(core) prod_k var(factor_k)``.
        The core takes ``1 / (N prod(R))`` and each factor the d-th root of the target.
        """
        target = 1.0 / (3.0 * self.in_features)
        with torch.no_grad():
            self.core.normal_(0.0, math.sqrt(1.0 / (self.num_blocks * math.prod(self.ranks))))
            for factor in self.factors:
                factor.normal_(0.0, math.sqrt(target ** (1.0 / self.num_modes)))
            if self.bias is not None:
                bound = 1.0 / math.sqrt(self.in_features)
                self.bias.uniform_(-bound, bound)

    def _key(self):
        return self.in_shape, self.out_shape, self.ranks, self.num_blocks

    def uses_dense(self, batch: int) -> bool:
        """Whether a forward pass over ``batch`` rows rebuilds the dense weight."""
        if self.contraction != "auto":
            return self.contraction == "dense"
        return dense_is_cheaper(*self._key(), batch)

    def method(self, batch: int) -> str:
        """How a forward pass over ``batch`` rows contracts: ``"dense"``, ``"lowrank"``, ``"gemm"`` or ``"einsum"``."""
        return contraction_method(*self._key(), self.contraction, batch)

    def cost(self, batch: int) -> dict:
        """Flop estimates of the forward pass over ``batch`` rows: ``{"factorized": ..., "einsum": ...,
        "gemm": ..., "rebuild": ..., "matmul": ..., "lowrank": ...}`` (the dense path is rebuild + matmul;
        ``"factorized"`` is the one of ``"gemm"``/``"einsum"`` that ``factorized_method`` uses), the elements
        each path moves and the totals ``"auto_dense"`` / ``"auto_lowrank"`` / ``"auto_factorized"`` that
        ``"auto"`` compares."""
        return contraction_costs(*self._key(), batch)

    def factorized_method(self, batch: int) -> str:
        """``"gemm"`` or ``"einsum"``: how a factorized forward pass over ``batch`` rows contracts."""
        if self.contraction in ("gemm", "einsum"):
            return self.contraction
        return factorized_method(*self._key(), batch)

    def to_dense(self) -> torch.Tensor:
        """The weight as an ``(out_features, in_features)`` matrix, like ``nn.Linear.weight``."""
        w = rebuild_expression(*self._key())[0](self.core, *self.factors, backend="torch")
        return w.reshape(self.in_features, self.out_features).t()

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self._linear(input, self.bias)

    def product(self, input: torch.Tensor) -> torch.Tensor:
        """``input @ W^T`` without the bias: ``forward`` less ``self.bias`` (the fused BT RNNs add it with
        ``b_hh`` inside their step)."""
        return self._linear(input, None)

    def _linear(self, input: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        self._check_input(input)
        leading = input.shape[:-1]
        x = input.reshape(-1, self.in_features)
        y = self._traced_product(x, bias) if is_tracing(x, self.core) else self._eager_product(x, bias)
        return y.reshape(*leading, self.out_features)

    def _check_input(self, input: torch.Tensor) -> None:
        if input.dim() == 0 or input.shape[-1] != self.in_features:
            raise ValueError(f"expected input of shape (*, {self.in_features}), got {tuple(input.shape)}")
        if input.dtype != self.core.dtype and not (  # as nn.Linear: autocast casts float16/32/bfloat16 only
                torch.is_autocast_enabled(input.device.type) and input.is_floating_point()
                and input.dtype != torch.float64 and self.core.dtype != torch.float64):
            raise RuntimeError(f"BTLinear got an input of dtype {input.dtype} but its parameters are "
                               f"{self.core.dtype}; like nn.Linear it does not convert: use "
                               f"input.to({self.core.dtype}) or layer.to({input.dtype})")

    def _eager_product(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        method = contraction_method(*self._key(), self.contraction, x.shape[0])
        if method == "dense":  # the bias fused into the product
            return rebuild_linear(x, self.core, self.factors, self.workspace, bias)
        if method == "lowrank":
            return lowrank_linear(x, self.core, self.factors, bias)
        y = factorized_product(x, self.core, self.factors, self._key(), method, self.max_intermediate_bytes)
        return y if bias is None else y + bias.to(y.dtype)  # autocast: keep the product's dtype

    def _traced_product(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """The product (+ bias) under torch.compile / export / jit.trace (bt_trace.py): a plan made outside the
        graph, no workspace, no pieces, ordinary differentiable ops; under torch.compile, opaque ops running the
        eager kernels where those are faster (the dense path, with its bias fused as eager's; the factorized
        paths where eager splits the batch)."""
        # jit.trace cannot record the chain's autograd.Function ("unordered_map::at"): it gets the einsum twin
        rows = plan_rows(x.shape[0])
        method, steps = traced_plan(*self._key(), self.contraction, rows, gemm_chain=not torch.jit.is_tracing())
        if method == "lowrank":  # ordinary ops: its own traced twin
            return lowrank_linear(x, self.core, self.factors, bias)
        compiling = torch.compiler.is_dynamo_compiling() and not torch.compiler.is_exporting()
        if compiling and method == "dense":
            return compiled_rebuild_linear(x, self.core, self.factors, self.workspace, bias)
        if compiling and eager_splits(*self._key(), method, rows, x.element_size(), self.max_intermediate_bytes,
                                      x.device.type):  # keep eager's pieces
            y = compiled_factorized_product(x, self.core, self.factors, self._key(), method,
                                            self.max_intermediate_bytes)
        elif method == "dense":
            y = rebuild_matmul(x, self.core, self.factors)
        elif method == "gemm":
            y = gemm_chain_contract(x, self.core, self.factors, self.in_shape, self.out_shape, self.ranks, steps)
        else:
            dtype = matmul_dtype(x, self.core)
            operands = [x.reshape(x.shape[0], *self.in_shape), self.core, *self.factors]
            y = contract_steps(steps, [t.to(dtype) for t in operands]).reshape(x.shape[0], self.out_features)
        return y if bias is None else y + bias.to(y.dtype)  # autocast: keep the product's dtype

    def chunk_size(self, batch: int, input: torch.Tensor | None = None) -> int:
        """Rows per piece of the factorized forward on CPU: the batch is split so that the largest
        intermediate stays under ``max_intermediate_bytes`` (8 MiB by default; why: see
        :mod:`accel.nn.bt._factorized`). GPU inputs are not split."""
        element = input.element_size() if input is not None else self.core.element_size()
        return chunk_rows(self._key(), self.factorized_method(batch), batch, element, self.max_intermediate_bytes,
                          "cpu" if input is None else input.device.type)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, in_shape={self.in_shape}, "
                f"out_shape={self.out_shape}, ranks={self.ranks}, num_blocks={self.num_blocks}, "
                f"bias={self.bias is not None}, compression_ratio={self.compression_ratio:.1f}")

    @classmethod
    def from_dense(cls, weight: torch.Tensor, bias: torch.Tensor | None = None, *, in_shape=None, out_shape=None,
                   ranks: int | Sequence[int] = 4, num_blocks: int = 2, contraction: str = "auto",
                   **decomposition_options) -> "BTLinear":
        r"""Compress a dense ``(out_features, in_features)`` weight through a block-term decomposition.

        Args:
            weight (Tensor): the ``(out_features, in_features)`` matrix, as ``nn.Linear.weight``.
            bias (Tensor, optional): ``(out_features,)``, copied; without it the layer has no bias.
            in_shape, out_shape, ranks, num_blocks, contraction: as for :class:`BTLinear`.
            **decomposition_options: ``n_iter``, ``tol``, ``num_restarts``, ``tucker_iter``, ``full_space_iter``,
                ``random_state``, ``progress`` of :func:`accel.nn.bt.decompose.block_term_decomposition`.

        The relative Frobenius error ``||W - W_bt|| / ||W||`` is stored in ``reconstruction_error``.
        """
        from accel.nn.bt.decompose import block_term_decomposition

        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            raise ValueError(f"weight must be a 2-D (out_features, in_features) tensor, "
                             f"got {getattr(weight, 'shape', type(weight))}")
        out_features, in_features = weight.shape
        if bias is not None and tuple(bias.shape) != (out_features,):
            raise ValueError(f"bias must have shape ({out_features},), got {tuple(bias.shape)}")
        layer = cls(in_features, out_features, in_shape=in_shape, out_shape=out_shape, ranks=ranks,
                    num_blocks=num_blocks, bias=bias is not None, contraction=contraction,
                    device=weight.device, dtype=weight.dtype)
        cores, factors, error = block_term_decomposition(
            weight, in_shape=layer.in_shape, out_shape=layer.out_shape, ranks=layer.ranks,
            num_blocks=num_blocks, **decomposition_options)
        with torch.no_grad():
            layer.core.copy_(cores)
            for parameter, factor in zip(layer.factors, factors):
                parameter.copy_(factor)
            if bias is not None:
                layer.bias.copy_(bias)
        layer.reconstruction_error = error
        return layer

    @classmethod
    def from_linear(cls, linear: nn.Linear, **kwargs) -> "BTLinear":
        """``from_dense(linear.weight, linear.bias, **kwargs)``: compress an ``nn.Linear``."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear expects an nn.Linear, got {type(linear).__name__}")
        return cls.from_dense(linear.weight.detach(), None if linear.bias is None else linear.bias.detach(), **kwargs)

