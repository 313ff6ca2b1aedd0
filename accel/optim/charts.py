"""Statistical process control for training losses: a fixed window of recent losses and its control limit.

Pure Python on purpose: the chart sees one float per batch, and knows nothing of torch or torch.distributed
(the optimizer hands it the already all-reduced loss, so every rank holds an identical chart).
"""
from __future__ import annotations

import math
from collections import deque
from typing import Any

__all__ = ["ControlChart", "ResidualChart", "CHARTS", "make_chart", "chart_from_state"]


class _WindowChart:
    """What every chart shares: a FIFO window of losses, a warm-up, and the rule that fires."""

    kind = ""
    min_window = 2  # fewest losses the chart's statistics need

    def _configure(self, window: int, sigma: float, warmup: int | None) -> None:
        least, detail = self.min_window, "" if self.min_window == 2 else f" for the {self.kind} chart"
        if isinstance(window, bool) or not isinstance(window, int) or window < least:
            raise ValueError(f"window must be an int >= {least}{detail}, got {window!r}")
        if not isinstance(sigma, (int, float)) or not math.isfinite(sigma) or sigma <= 0:
            raise ValueError(f"sigma must be a finite number > 0, got {sigma!r}")
        if warmup is None:
            warmup = window
        if isinstance(warmup, bool) or not isinstance(warmup, int) or not least <= warmup <= window:
            raise ValueError(f"warmup must be an int in [{least}, window={window}]{detail}, got {warmup!r}")
        self.window, self.sigma, self.warmup = window, float(sigma), warmup

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

    def exceeds(self, loss: float) -> bool:
        """True when the chart is warm and ``loss`` lies above :attr:`limit`.

        Call it *before* :meth:`observe` with the same loss: a value inside its own window of ``n``
        can reach a z-score of at most ``(n - 1) / sqrt(n)``, so it would hide itself.
        """
        return self.warm and math.isfinite(loss) and loss > self.limit


class ControlChart(_WindowChart):
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

    kind = "shewhart"

    def __init__(self, window: int = 100, sigma: float = 3.0, warmup: int | None = None) -> None:
        self._configure(window, sigma, warmup)
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
    def center(self) -> float:
        """The center line the next loss is judged against: the window mean."""
        return self.mean

    @property
    def limit(self) -> float:
        """Upper control limit ``mean + sigma * std`` (``nan`` with fewer than 2 losses)."""
        return self.mean + self.sigma * self.std

    # -- persistence -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The chart's configuration and exact running state (a resumed chart continues bit-identically)."""
        return {"kind": self.kind, "window": self.window, "sigma": self.sigma, "warmup": self.warmup,
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


class ResidualChart(_WindowChart):
    r"""A control chart around the loss *trend*: a least-squares line through the last ``window`` losses.

    The Shewhart chart (:class:`ControlChart`) measures the spread of a window around its mean, so while the loss
    falls the trend itself inflates the standard deviation and the limit sits far above every batch. This chart
    fits ``loss ~ a + b * t`` over the window (``t`` counts observations), predicts the next loss, and measures
    the spread of the residuals around the line:

    .. math::
        \text{limit} = \hat{\ell}_{t+1} + \sigma\, s_r, \qquad
        s_r = \sqrt{\tfrac{1}{n-2}\textstyle\sum_i (\ell_i - a - b\,t_i)^2}.

    Running sums make :meth:`observe` O(1); they are recomputed exactly (``math.fsum``) every ``window``
    evictions, and the time origin moves with them so ``t`` stays small. Same interface as :class:`ControlChart`
    (``center`` is the predicted loss); needs ``window >= 3`` and ``warmup >= 3`` (a line through 2 points has no
    residual).

    Args:
        window (int): number of most recent losses kept, >= 3 (default: 100).
        sigma (float): width of the limit in residual standard deviations, > 0 (default: 3.0).
        warmup (int, optional): losses needed before the chart is :attr:`warm`, in ``[3, window]``; ``None`` means
            a full window (default: None).
    """

    kind = "residual"
    min_window = 3

    def __init__(self, window: int = 100, sigma: float = 3.0, warmup: int | None = None) -> None:
        self._configure(window, sigma, warmup)
        self.reset()

    def reset(self) -> None:
        """Forget every loss."""
        self._values: deque[float] = deque()
        self._next_t = 0  # time of the next observation, relative to the current origin
        self._sums = [0.0] * 5  # sum t, sum y, sum t^2, sum t*y, sum y^2 over the window
        self._evictions_since_exact = 0
        self._fitted: tuple[float, float, float] | None = None  # the fit of the current window, once asked for

    def observe(self, loss: float) -> None:
        """Append one loss (evicting the oldest when the window is full); non-finite losses raise ``ValueError``."""
        loss = float(loss)
        if not math.isfinite(loss):
            raise ValueError(f"ResidualChart.observe got a non-finite loss {loss}")
        self._fitted = None
        if len(self._values) == self.window:
            oldest = self._values.popleft()
            self._evictions_since_exact += 1
            if self._evictions_since_exact >= self.window:
                self._values.append(loss)
                self._next_t += 1
                self._recompute()
                return
            self._accumulate(self._next_t - len(self._values) - 1, oldest, -1.0)
        self._values.append(loss)
        self._accumulate(self._next_t, loss, 1.0)
        self._next_t += 1

    def _accumulate(self, t: float, y: float, sign: float) -> None:
        for index, term in enumerate((t, y, t * t, t * y, y * y)):
            self._sums[index] += sign * term

    def _recompute(self) -> None:
        # exact sums with the origin moved to the oldest value in the window
        values = list(self._values)
        self._evictions_since_exact = 0
        self._next_t = len(values)
        times = range(len(values))
        self._sums = [math.fsum(times), math.fsum(values), math.fsum(t * t for t in times),
                      math.fsum(t * y for t, y in zip(times, values)), math.fsum(y * y for y in values)]

    def _fit(self) -> tuple[float, float, float]:
        """(prediction for the next loss, residual standard deviation, slope); nan with fewer than 3 losses."""
        if self._fitted is not None:
            return self._fitted
        n = len(self._values)
        if n < 3:
            return math.nan, math.nan, math.nan
        st, sy, stt, sty, syy = self._sums
        ctt, cty, cyy = stt - st * st / n, sty - st * sy / n, syy - sy * sy / n
        slope = cty / ctt
        residual = max(cyy - slope * cty, 0.0)
        prediction = sy / n + slope * (self._next_t - st / n)
        self._fitted = (prediction, math.sqrt(residual / (n - 2)), slope)
        return self._fitted

    @property
    def mean(self) -> float:
        """Mean of the window (``nan`` when empty)."""
        return self._sums[1] / len(self._values) if self._values else math.nan

    @property
    def center(self) -> float:
        """The trend's prediction for the next loss (``nan`` with fewer than 3 losses)."""
        return self._fit()[0]

    @property
    def slope(self) -> float:
        """The trend's change in loss per observation."""
        return self._fit()[2]

    @property
    def std(self) -> float:
        """Standard deviation of the residuals around the trend (``nan`` with fewer than 3 losses)."""
        return self._fit()[1]

    @property
    def limit(self) -> float:
        """Upper control limit ``prediction + sigma * residual std``."""
        prediction, spread, _ = self._fit()
        return prediction + self.sigma * spread

    def state_dict(self) -> dict[str, Any]:
        """Configuration and exact running state (a resumed chart continues bit-identically)."""
        return {"kind": self.kind, "window": self.window, "sigma": self.sigma, "warmup": self.warmup,
                "values": list(self._values), "next_t": self._next_t, "sums": list(self._sums),
                "evictions_since_exact": self._evictions_since_exact}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a state produced by :meth:`state_dict` (configuration included)."""
        missing = {"window", "sigma", "warmup", "values", "next_t", "sums", "evictions_since_exact"} - set(state_dict)
        if missing:
            raise KeyError(f"ResidualChart state_dict lacks {sorted(missing)}")
        restored = ResidualChart(state_dict["window"], state_dict["sigma"], state_dict["warmup"])
        if len(state_dict["values"]) > restored.window:
            raise ValueError(f"state_dict holds {len(state_dict['values'])} values for a window of {restored.window}")
        self.window, self.sigma, self.warmup = restored.window, restored.sigma, restored.warmup
        self._values = deque(float(v) for v in state_dict["values"])
        self._next_t = int(state_dict["next_t"])
        self._sums = [float(v) for v in state_dict["sums"]]
        self._evictions_since_exact = int(state_dict["evictions_since_exact"])
        self._fitted = None

    def __repr__(self) -> str:
        return (f"ResidualChart(window={self.window}, sigma={self.sigma}, warmup={self.warmup}, count={len(self)}, "
                f"center={self.center:.6g}, std={self.std:.6g}, limit={self.limit:.6g})")


CHARTS = {"shewhart": ControlChart, "residual": ResidualChart}


def make_chart(kind: str, window: int, sigma: float, warmup: int | None):
    """The chart named ``kind`` (``"shewhart"``: the paper's mean + sigma * std; ``"residual"``: around the trend)."""
    if kind not in CHARTS:
        raise ValueError(f"chart must be one of {tuple(CHARTS)}, got {kind!r}")
    return CHARTS[kind](window=window, sigma=sigma, warmup=warmup)


def chart_from_state(state_dict: dict[str, Any]):
    """Rebuild whichever chart wrote ``state_dict`` (a state without ``kind`` is a Shewhart chart's)."""
    kind = state_dict.get("kind", "shewhart")
    chart = make_chart(kind, state_dict["window"], state_dict["sigma"], state_dict["warmup"])
    chart.load_state_dict(state_dict)
    return chart
