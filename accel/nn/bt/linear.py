"""``BTLinear``: a linear layer whose weight is a Block-Term (BT) tensor.

The weight ``W`` (``in_features x out_features``, ``in_features = prod(in_shape)``,
``out_features = prod(out_shape)``) is folded into a d-order tensor with modes ``I_k * J_k`` and
written as a sum of ``N`` Tucker blocks (Ye et al., CVPR 2018)::

    W[i_1..i_d, j_1..j_d] = sum_n sum_r core[n, r_1..r_d] * prod_k factors[k][n, i_k, j_k, r_k]

Three strategies compute ``x @ W``, picked per batch size by a cost model (:mod:`accel.nn.bt._paths`, weighed by a
:class:`~accel.nn.bt.CostProfile`): the GEMM chain through the factors (:mod:`accel.nn.bt._contract`), the rebuilt
weight (:mod:`accel.nn.bt._dense`) and the weight's two thin factors in turn (:mod:`accel.nn.bt._lowrank`). Each has
one eager form and, where tracing needs another, one traced form (:mod:`accel.nn.bt._traced`).
"""
from __future__ import annotations

import math
import warnings
from typing import Sequence

import torch
from torch import nn

from accel.nn._interop import is_conv1d
from accel.nn.bt._compiled import compiled_dense, compiled_gemm_chain
from accel.nn.bt._contract import chain_product, chunk_rows, gemm_chain_contract
from accel.nn.bt._dense import RebuildWorkspace, rebuild_linear, rebuild_matmul, rebuild_operands
from accel.nn.bt._lowrank import lowrank_linear
from accel.nn.bt._paths import METHODS, CostProfile, contraction_costs, contraction_method
from accel.nn.bt._traced import is_tracing, plan_rows, traced_plan
from accel.nn.bt.shapes import auto_num_modes, balanced_factors, check_shape, resolve_ranks, weight_parameters

__all__ = ["BTLinear", "CostProfile", "balanced_factors"]

_CONTRACTIONS = ("auto", *METHODS)
_REMOVED = {"einsum": "gemm", "factorized": "gemm"}


def _check_contraction(contraction) -> str:
    if contraction in _REMOVED:
        raise ValueError(f"contraction={contraction!r} is no longer offered: use {_REMOVED[contraction]!r} (the "
                         f"same product through the factors) or 'auto'")
    if contraction not in _CONTRACTIONS:
        raise ValueError(f"contraction must be one of {_CONTRACTIONS}, got {contraction!r}")
    return contraction


class BTLinear(nn.Module):
    r"""Applies ``y = x W^T + b`` with ``W`` stored as a Block-Term tensor.

    Args:
        in_features (int): size of each input sample, ``prod(in_shape)``.
        out_features (int): size of each output sample, ``prod(out_shape)``.
        in_shape (sequence of int, optional): the factorisation ``I_1..I_d`` of ``in_features``.
            Chosen automatically (balanced factors, d <= 4) when not given.
        out_shape (sequence of int, optional): the factorisation ``J_1..J_d`` of ``out_features``,
            with the same ``d`` as ``in_shape``. Chosen automatically when not given.
        ranks (int, float, str or sequence of int): the Tucker ranks ``R_1..R_d`` of every block. An int is
            used for every mode and capped at each mode's size ``I_k * J_k`` (with a warning); a float in
            (0, 1] is a fraction of the dense weight's parameters and ``"same"`` the fraction 1 (tensorly-torch's
            spellings): the largest rank, the same for every mode and capped likewise, whose weight fits in it; a
            sequence must have one entry per mode, each at most ``I_k * J_k``. Default: 4.
        num_blocks (int): the number ``N`` of Tucker blocks. Default: 2.
        bias (bool): if ``False``, the layer learns no additive bias. Default: ``True``.
        contraction (str): the strategy: ``"auto"`` (per batch size, the one the cost model weighs least),
            ``"gemm"`` (the GEMM chain through the factors, d >= 2), ``"dense"`` (rebuild ``W`` into
            ``workspace``, then multiply) or ``"lowrank"`` (``W``'s two thin factors in turn, ``W`` never
            built). Default: ``"auto"``.
        cost_profile (CostProfile, optional): the weights of the cost model behind ``"auto"``; default
            ``CostProfile()``.
        device, dtype: of the parameters, as for ``nn.Linear``.

    Shape:
        - Input: ``(*, in_features)``; Output: ``(*, out_features)``.

    Attributes:
        core (Parameter): ``(N, R_1, ..., R_d)``.
        factors (ParameterList): ``d`` tensors, the k-th of shape ``(N, I_k, J_k, R_k)``.
        bias (Parameter or None): ``(out_features,)``.
        reconstruction_error (float or None): relative Frobenius error of ``from_dense``.
        workspace (RebuildWorkspace): the dense path keeps ``W`` and its gradient here between calls
            (2 x ``in_features * out_features`` elements once used), and under ``torch.compile`` the GEMM chain
            its intermediates between forward and backward; ``layer.workspace.clear()`` frees them.
        max_intermediate_bytes (int): on CPU the GEMM chain splits the batch so that its largest intermediate
            stays under this (8 MiB): pieces that stay in cache run faster.

    The weight uses ``N * (sum_k I_k J_k R_k + prod_k R_k)`` parameters (``num_weight_parameters``); a layer
    larger than the dense weight is built with a warning giving both figures. As for ``nn.Linear``, the input
    must have the parameters' dtype (autocast aside).

    Under ``torch.compile``, ``torch.export`` (a dynamic batch included), ``torch.onnx.export(dynamo=True)``,
    ``torch.jit.trace`` or on tensor subclasses (FakeTensors) the layer's plan is made outside the graph
    (:mod:`accel.nn.bt._traced`). ``torch.compile`` runs the dense path and the GEMM chain as custom ops
    (``torch.ops.accel.bt_dense_v1``, ``bt_gemm_chain_v1``) with the eager kernels (the dense one with
    ``workspace``); the others run the same product with ordinary differentiable ops and never touch ``workspace``.
    """

    def __init__(self, in_features: int, out_features: int, *, in_shape: Sequence[int] | None = None,
                 out_shape: Sequence[int] | None = None, ranks: int | float | str | Sequence[int] = 4,
                 num_blocks: int = 2, bias: bool = True, contraction: str = "auto",
                 cost_profile: CostProfile | None = None, device=None, dtype=None):
        super().__init__()
        for name, value in (("in_features", in_features), ("out_features", out_features), ("num_blocks", num_blocks)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        _check_contraction(contraction)
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
        self.in_features, self.out_features, self.num_blocks = in_features, out_features, num_blocks
        self.contraction = contraction
        self.cost_profile = CostProfile() if cost_profile is None else cost_profile
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
    def contraction(self) -> str:
        """The strategy setting (see the class docstring); assigning it is checked as in the constructor."""
        return self._contraction

    @contraction.setter
    def contraction(self, value: str) -> None:
        _check_contraction(value)
        if value == "gemm" and len(self.in_shape) < 2:
            raise ValueError(f"contraction='gemm' needs at least 2 modes, got in_shape={self.in_shape}")
        self._contraction = value

    @property
    def cost_profile(self) -> CostProfile:
        """The :class:`CostProfile` that ``contraction="auto"`` weighs strategies with."""
        return self._cost_profile

    @cost_profile.setter
    def cost_profile(self, value: CostProfile) -> None:
        if not isinstance(value, CostProfile):
            raise TypeError(f"cost_profile must be an accel.nn.bt.CostProfile, got {type(value).__name__}")
        self._cost_profile = value
        self._profile_values = tuple(getattr(value, f) for f in value.__dataclass_fields__)

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
        return self.method(batch) == "dense"

    def method(self, batch: int) -> str:
        """The strategy of an eager forward pass over ``batch`` rows: ``"dense"``, ``"lowrank"`` or ``"gemm"``."""
        return contraction_method(*self._key(), self.contraction, batch, self.cost_profile)

    def cost(self, batch: int) -> dict:
        """The cost model's view of a forward pass over ``batch`` rows: the flops of each strategy
        (``"gemm"``, ``"rebuild"`` + ``"matmul"`` for the dense path, ``"lowrank"``), the elements each writes and
        the weighed totals ``"auto_gemm"`` / ``"auto_dense"`` / ``"auto_lowrank"`` that ``"auto"`` compares
        (:func:`accel.nn.bt._paths.contraction_costs`)."""
        return dict(contraction_costs(*self._key(), batch, self.cost_profile))

    def to_dense(self) -> torch.Tensor:
        """The weight as an ``(out_features, in_features)`` matrix, like ``nn.Linear.weight``."""
        left, right = rebuild_operands(self.core, list(self.factors))
        built = (left @ right).view(self.out_shape[0], self.in_features, -1)  # (J_0, I, J')
        return built.permute(1, 0, 2).reshape(self.in_features, self.out_features).t()

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input(input)
        leading = input.shape[:-1]
        x = input.reshape(-1, self.in_features)
        product = self._traced_product if is_tracing(x, self.core) else self._eager_product
        return product(x, self.bias).reshape(*leading, self.out_features)

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
        method = self.method(x.shape[0])
        if method == "dense":  # the bias fused into the product
            return rebuild_linear(x, self.core, self.factors, self.workspace, bias)
        if method == "lowrank":
            return lowrank_linear(x, self.core, self.factors, bias)
        y = chain_product(x, self.core, self.factors, self._key(), self.max_intermediate_bytes)
        return y if bias is None else y + bias.to(y.dtype)  # autocast: keep the product's dtype

    def _traced_product(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """The product (+ bias) when traced (:mod:`accel.nn.bt._traced`): a plan made outside the graph; under
        torch.compile the dense path and the chain as custom ops running the eager kernels
        (:mod:`accel.nn.bt._compiled`), elsewhere ordinary ops over the whole batch at once, no workspace."""
        method = traced_plan(*self._key(), self.contraction, plan_rows(x.shape[0]), self._profile_values,
                             gemm_chain=not torch.jit.is_tracing())
        if method == "lowrank":
            return lowrank_linear(x, self.core, self.factors, bias)
        # torch.compile: the eager kernels as custom ops; an exported program (export, ONNX, jit.trace) holds
        # ordinary ops only
        as_ops = torch.compiler.is_compiling() and not torch.compiler.is_exporting()
        if method == "dense":
            if as_ops:
                return compiled_dense(x, self.core, self.factors, self.workspace, bias)
            return rebuild_matmul(x, self.core, self.factors, bias)
        if as_ops:
            y = compiled_gemm_chain(x, self.core, self.factors, self.in_shape, self.out_shape, self.ranks,
                                    self.max_intermediate_bytes, self.workspace)
        else:
            y = gemm_chain_contract(x, self.core, self.factors, self.in_shape, self.out_shape, self.ranks)
        return y if bias is None else y + bias.to(y.dtype)  # autocast: keep the product's dtype

    def chunk_size(self, batch: int, input: torch.Tensor | None = None) -> int:
        """Rows per piece of the GEMM chain over ``batch`` rows on CPU (see ``max_intermediate_bytes``); GPU
        inputs are not split."""
        element = input.element_size() if input is not None else self.core.element_size()
        return chunk_rows(self._key(), batch, element, self.max_intermediate_bytes,
                          "cpu" if input is None else input.device.type)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, in_shape={self.in_shape}, "
                f"out_shape={self.out_shape}, ranks={self.ranks}, num_blocks={self.num_blocks}, "
                f"bias={self.bias is not None}, compression_ratio={self.compression_ratio:.1f}")

    @classmethod
    def from_dense(cls, weight: torch.Tensor, bias: torch.Tensor | None = None, *, in_shape=None, out_shape=None,
                   ranks: int | float | str | Sequence[int] = 4, num_blocks: int = 2, contraction: str = "auto",
                   cost_profile: CostProfile | None = None, **decomposition_options) -> "BTLinear":
        r"""Compress a dense ``(out_features, in_features)`` weight through a block-term decomposition.

        Args:
            weight (Tensor): the ``(out_features, in_features)`` matrix, as ``nn.Linear.weight``.
            bias (Tensor, optional): ``(out_features,)``, copied; without it the layer has no bias.
            in_shape, out_shape, ranks, num_blocks, contraction, cost_profile: as for :class:`BTLinear`.
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
                    cost_profile=cost_profile, device=weight.device, dtype=weight.dtype)
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
    def from_linear(cls, linear: nn.Module, **kwargs) -> "BTLinear":
        """Compress an ``nn.Linear`` (or transformers' ``Conv1D``, whose weight is stored transposed):
        ``from_dense(weight, bias, **kwargs)``."""
        if isinstance(linear, nn.Linear):
            weight = linear.weight
        elif is_conv1d(linear):
            weight = linear.weight.t()  # Conv1D stores (in_features, out_features) and computes x @ weight + bias
        else:
            raise TypeError(f"from_linear expects an nn.Linear or transformers' Conv1D, got {type(linear).__name__}")
        bias = None if linear.bias is None else linear.bias.detach()
        return cls.from_dense(weight.detach(), bias, **kwargs)

    @classmethod
    def from_tltorch(cls, layer: nn.Module, **kwargs) -> "BTLinear":
        """The same layer as a ``BTLinear``, exactly, from tensorly-torch's ``FactorizedLinear`` with a Tucker
        or CP weight (``kwargs``: ``contraction``, ``cost_profile``).

        Its weight is a tensor of shape ``(*out_tensorized_features, *in_tensorized_features)``; mode ``k`` of the
        block term pairs ``in_tensorized_features[k]`` with ``out_tensorized_features[k]``. A Tucker weight is one
        block whose rank ``R_k`` is the product of the two Tucker ranks of those modes (each factor the outer
        product of the two Tucker factors); a CP weight of rank ``R`` is ``R`` blocks of rank 1. Tensor-train
        weights (``"tt"``, ``"blocktt"``) are not sums of Tucker blocks: they raise, and
        ``BTLinear.from_dense(layer.weight.to_matrix(), layer.bias)`` approximates them instead.
        """
        name = type(layer).__name__
        if name != "FactorizedLinear" or not type(layer).__module__.startswith("tltorch"):
            raise TypeError(f"from_tltorch expects tltorch.FactorizedLinear, got {name}")
        if getattr(layer, "n_layers", 1) != 1:
            raise ValueError(f"from_tltorch converts one linear layer; this FactorizedLinear parametrizes "
                             f"n_layers={layer.n_layers} (convert layer[i] of each)")
        in_shape, out_shape = tuple(layer.in_tensorized_features), tuple(layer.out_tensorized_features)
        if len(in_shape) != len(out_shape):
            raise ValueError(f"from_tltorch needs as many input as output tensorized modes to pair them, got "
                             f"in_tensorized_features={in_shape} and out_tensorized_features={out_shape}")
        d, weight = len(in_shape), layer.weight
        kind = type(weight).__name__
        with torch.no_grad():
            if kind == "TuckerTensorized":
                g = weight.core  # modes: J_1..J_d, I_1..I_d
                out_f, in_f = list(weight.factors[:d]), list(weight.factors[d:])
                ranks = tuple(in_f[k].shape[1] * out_f[k].shape[1] for k in range(d))
                factors = [torch.einsum("ia,jb->ijab", in_f[k], out_f[k]).reshape(1, in_shape[k], out_shape[k],
                                                                                   ranks[k]) for k in range(d)]
                order = [x for k in range(d) for x in (d + k, k)]  # (a_1, b_1, a_2, b_2, ...)
                core = g.permute(order).reshape(1, *ranks)
                num_blocks = 1
            elif kind == "CPTensorized":
                w, out_f, in_f = weight.weights, list(weight.factors[:d]), list(weight.factors[d:])
                num_blocks, ranks = w.shape[0], (1,) * d
                factors = [torch.einsum("in,jn->nij", in_f[k], out_f[k]).unsqueeze(-1) for k in range(d)]
                core = w.reshape(num_blocks, *ranks)
            else:
                raise ValueError(f"from_tltorch converts Tucker and CP weights (sums of Tucker blocks); this layer's "
                                 f"weight is {kind}, which is not: use BTLinear.from_dense(layer.weight.to_matrix(), "
                                 f"layer.bias) to approximate it")
            with warnings.catch_warnings():  # a Tucker of large ranks can exceed the dense size: still exact
                warnings.simplefilter("ignore")
                bt = cls(math.prod(in_shape), math.prod(out_shape), in_shape=in_shape, out_shape=out_shape,
                         ranks=ranks, num_blocks=num_blocks, bias=layer.bias is not None, device=core.device,
                         dtype=core.dtype, **kwargs)
            bt.core.copy_(core)
            for parameter, factor in zip(bt.factors, factors):
                parameter.copy_(factor)
            if layer.bias is not None:
                bt.bias.copy_(layer.bias)
        return bt

    def to_tltorch(self) -> nn.Module:
        """The same layer, exactly, as tensorly-torch's ``FactorizedLinear`` with a Tucker weight (needs tltorch).

        Mode ``k`` becomes the two Tucker modes ``in_shape[k]`` and ``out_shape[k]``. Their Tucker factors are
        orthonormal bases of what the block term spans in each (so the conversion is exact) and have at most
        ``min(I_k, N J_k R_k)`` and ``min(J_k, N I_k R_k)`` columns; the Tucker core is the block term projected on
        them. That core can hold more parameters than the block term: a warning gives both figures when it
        holds more than the dense weight.
        """
        from accel._optional import require

        tltorch = require("tltorch", extra="tltorch", feature="BTLinear.to_tltorch")
        d, n = self.num_modes, self.num_blocks
        with torch.no_grad():
            bases_in, bases_out, projected = [], [], []
            for factor in self.factors:
                i, j = factor.shape[1:3]
                q_in = torch.linalg.qr(factor.permute(1, 0, 2, 3).reshape(i, -1))[0]  # (I_k, a_k)
                q_out = torch.linalg.qr(factor.permute(2, 0, 1, 3).reshape(j, -1))[0]  # (J_k, b_k)
                bases_in.append(q_in)
                bases_out.append(q_out)
                projected.append(torch.einsum("nijr,ia,jb->nabr", factor, q_in, q_out))
            letters = "abcdefghijklmnopqrstuvwxyz"
            a, b, r = letters[:d], letters[d:2 * d], letters[2 * d:3 * d]
            equation = (f"Z{r}," + ",".join(f"Z{a[k]}{b[k]}{r[k]}" for k in range(d)) + f"->{b}{a}")
            core = torch.einsum(equation, self.core, *projected)
            tucker_parameters = core.numel() + sum(q.numel() for q in bases_in + bases_out)
            if tucker_parameters > self.in_features * self.out_features:
                warnings.warn(f"to_tltorch: the exact Tucker form of this block term ({n} block(s), ranks "
                              f"{self.ranks}) has {tucker_parameters:,} parameters, more than the "
                              f"{self.in_features * self.out_features:,} of the dense weight", stacklevel=2)
            rank = tuple(core.shape)
            factors = [nn.Parameter(q.contiguous()) for q in bases_out + bases_in]
            tensorized = (tuple(self.out_shape), tuple(self.in_shape))
            weight = tltorch.factorized_tensors.TuckerTensorized(nn.Parameter(core.contiguous()), factors,
                                                                 tensorized, rank=rank)
            layer = tltorch.FactorizedLinear(tuple(self.in_shape), tuple(self.out_shape), bias=self.bias is not None,
                                             factorization=weight, device=self.core.device, dtype=self.core.dtype)
            if self.bias is not None:
                layer.bias.copy_(self.bias)
        return layer
