"""Block-Term tensor algebra: :class:`BTLinear` (``linear``), the cost model's :class:`CostProfile`, shapes and ranks
(``shapes``) and the decomposition of a dense weight into block terms (``decompose``). Modules starting with ``_``
are the strategies that compute the product; users never import them."""
from accel.nn.bt._paths import CostProfile
from accel.nn.bt.linear import BTLinear

__all__ = ["BTLinear", "CostProfile"]
