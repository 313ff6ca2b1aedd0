"""Statistical process control for training losses: a fixed window of recent losses and its control limit.

Pure Python on purpose: the chart sees one float per batch, and knows nothing of torch or torch.distributed
(the optimizer hands it the already all-reduced loss, so every rank holds an identical chart).
"""
from __future__ import annotations

import math
from collections import deque
from typing import Any

__all__ = ["ControlChart"]


class ControlChart:
    r"""A Shewhart control chart over the last ``window`` batch losses.

    Keeps the losses in a FIFO queue and their running mean and sum of squared deviations
    (Welford's update on insertion and its inverse on eviction), so :meth:`observe`, :attr:`mean`,
    :attr:`std` and :attr:`limit` cost O(1). Adding and removing values accumulates rounding error,
    so the statistics are recomputed exactly (``math.fsum``, two-pass) every ``window`` evictions:
    amortised O(1), and the drift is bounded by the error of ``window`` updates.

    .. math::
        \text{limit} = \bar{\ell} + \sigma\, s, \qquad
        s = \sqrt{\tfrac{1}{n-1}\textstyle\sum_i (\ell_i - \bar{\ell})^2}

    (``s`` is the sample standard deviation, as :func:`statistics.stdev`.)

    Args:
        window (int): number of most recent losses kept (at least 2). The ISGD paper keeps one epoch
            of batch losses; pass the number of batches per epoch when it is known. (default: 100)
        sigma (float): width of the control limit in standard deviations (> 0). (default: 3.0)
        warmup (int, optional): losses needed before the chart is :attr:`warm` and its limit is to be
            trusted, between 2 and ``window``. ``None`` means a full window: early in training the
            losses fall fast, and a limit fitted to a short transient flags ordinary batches. (default: None)

    Example:
        >>> chart = ControlChart(window=4, sigma=3.0)
        >>> for loss in (1.0, 1.1, 0.9, 1.0):
        ...     chart.observe(loss)
        >>> chart.warm, round(chart.limit, 3)
        (True, 1.245)
    """

    def __init__(self, window: int = 100, sigma: float = 3.0, warmup: int | None = None) -> None:
        if isinstance(window, bool) or not isinstance(window, int) or window < 2:
            raise ValueError(f"window must be an int >= 2, got {window!r}")
        if not isinstance(sigma, (int, float)) or not math.isfinite(sigma) or sigma <= 0:
            raise ValueError(f"sigma must be a finite number > 0, got {sigma!r}")
        if warmup is None:
            warmup = window
        if isinstance(warmup, bool) or not isinstance(warmup, int) or not 2 <= warmup <= window:
            raise ValueError(f"warmup must be an int in [2, window={window}], got {warmup!r}")
        self.window = window
        self.sigma = float(sigma)
        self.warmup = warmup
        self._values: deque[float] = deque()
        self._mean = 0.0
        self._m2 = 0.0  # sum of squared deviations from the mean
        self._evictions_since_exact = 0

    # -- updates -----------------------------------------------------------------------------------
    def observe(self, loss: float) -> None:
        """Append one loss (evicting the oldest when the window is full).

        Raises:
            ValueError: if ``loss`` is NaN or infinite (one such value would poison the statistics).
        """
        loss = float(loss)
        if not math.isfinite(loss):
            raise ValueError(f"ControlChart.observe got a non-finite loss {loss}")
        if len(self._values) == self.window:
            self._remove(self._values.popleft())
        self._values.append(loss)
        count = len(self._values)
        delta = loss - self._mean
        self._mean += delta / count
        self._m2 += delta * (loss - self._mean)

    def _remove(self, value: float) -> None:
        # inverse Welford step; periodic exact recomputation bounds the drift it accumulates
        self._evictions_since_exact += 1
        if self._evictions_since_exact >= self.window:
            self._recompute()
            return
        count = len(self._values)  # ``value`` has already left the deque
        delta = value - self._mean
        self._mean -= delta / count
        self._m2 = max(self._m2 - delta * (value - self._mean), 0.0)

    def _recompute(self) -> None:
        values = list(self._values)
        self._evictions_since_exact = 0
        if not values:
            self._mean, self._m2 = 0.0, 0.0
            return
        self._mean = math.fsum(values) / len(values)
        self._m2 = math.fsum((v - self._mean) ** 2 for v in values)

    def reset(self) -> None:
        """Forget every loss."""
        self._values.clear()
        self._mean, self._m2, self._evictions_since_exact = 0.0, 0.0, 0

    # -- queries -----------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._values)

    @property
    def values(self) -> list[float]:
        """The losses in the window, oldest first (a copy)."""
        return list(self._values)

    @property
    def warm(self) -> bool:
        """Whether at least ``warmup`` losses have been observed."""
        return len(self._values) >= self.warmup

    @property
    def mean(self) -> float:
        """Mean of the window (``nan`` when empty)."""
        return self._mean if self._values else math.nan

    @property
    def std(self) -> float:
        """Sample standard deviation of the window (``nan`` with fewer than 2 losses)."""
        if len(self._values) < 2:
            return math.nan
        return math.sqrt(self._m2 / (len(self._values) - 1))

    @property
    def limit(self) -> float:
        """Upper control limit ``mean + sigma * std`` (``nan`` with fewer than 2 losses)."""
        return self.mean + self.sigma * self.std

    def exceeds(self, loss: float) -> bool:
        """True when the chart is warm and ``loss`` lies above :attr:`limit`.

        Call it *before* :meth:`observe` with the same loss: a value inside its own window of ``n``
        can reach a z-score of at most ``(n - 1) / sqrt(n)``, so it would hide itself.
        """
        return self.warm and math.isfinite(loss) and loss > self.limit

    # -- persistence -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The chart's configuration and exact running state (a resumed chart continues bit-identically)."""
        return {"window": self.window, "sigma": self.sigma, "warmup": self.warmup,
                "values": list(self._values), "mean": self._mean, "m2": self._m2,
                "evictions_since_exact": self._evictions_since_exact}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a state produced by :meth:`state_dict` (configuration included)."""
        missing = {"window", "sigma", "warmup", "values", "mean", "m2", "evictions_since_exact"} - set(state_dict)
        if missing:
            raise KeyError(f"ControlChart state_dict lacks {sorted(missing)}")
        restored = ControlChart(state_dict["window"], state_dict["sigma"], state_dict["warmup"])
        values = [float(v) for v in state_dict["values"]]
        if len(values) > restored.window:
            raise ValueError(f"state_dict holds {len(values)} values for a window of {restored.window}")
        self.window, self.sigma, self.warmup = restored.window, restored.sigma, restored.warmup
        self._values = deque(values)
        self._mean = float(state_dict["mean"])
        self._m2 = float(state_dict["m2"])
        self._evictions_since_exact = int(state_dict["evictions_since_exact"])

    def __repr__(self) -> str:
        return (f"ControlChart(window={self.window}, sigma={self.sigma}, warmup={self.warmup}, "
                f"count={len(self)}, mean={self.mean:.6g}, std={self.std:.6g}, limit={self.limit:.6g})")
