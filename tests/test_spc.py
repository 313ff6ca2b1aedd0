import math
import random
import statistics

import pytest

from accel.optim import ControlChart, ResidualChart
from accel.optim.charts import chart_from_state, make_chart


def reference(values, sigma):
    """Plain two-pass statistics of the window (the reference twin of the running updates)."""
    mean, std = statistics.fmean(values), statistics.stdev(values)
    return mean, std, mean + sigma * std


@pytest.mark.parametrize("offset", [0.0, 1e6])
def test_running_statistics_match_statistics_module(seed, offset):
    rng = random.Random(seed)
    window = rng.randint(2, 40)
    chart = ControlChart(window=window, sigma=2.5)
    history = []
    for _ in range(10 * window + rng.randint(0, window)):  # many evictions, several exact recomputations
        value = offset + rng.lognormvariate(0.0, 1.0) * rng.choice([1e-3, 1.0, 10.0])
        chart.observe(value)
        history.append(value)
        window_values = history[-window:]
        assert chart.values == window_values
        if len(window_values) >= 2:
            mean, std, limit = reference(window_values, 2.5)
            assert chart.mean == pytest.approx(mean, rel=1e-12, abs=1e-12)
            assert chart.std == pytest.approx(std, rel=1e-6, abs=1e-9 * max(1.0, offset))
            assert chart.limit == pytest.approx(limit, rel=1e-9, abs=1e-8 * max(1.0, offset))


def test_warmup_and_exceeds():
    chart = ControlChart(window=5, sigma=3.0, warmup=3)
    assert not chart.warm and math.isnan(chart.limit)
    assert not chart.exceeds(1e9)  # a cold chart never fires
    for value in (1.0, 1.2):
        chart.observe(value)
    assert not chart.warm and not chart.exceeds(1e9)
    chart.observe(0.8)
    assert chart.warm
    assert chart.exceeds(chart.limit + 1e-9) and not chart.exceeds(chart.limit)
    assert not chart.exceeds(math.nan) and not chart.exceeds(math.inf)  # non-finite losses never start a chase


def test_a_value_inside_its_own_small_window_cannot_exceed_three_sigma(seed):
    # why the optimizer judges a loss before observing it: max z-score in a window of n is (n-1)/sqrt(n)
    rng = random.Random(seed)
    for n in range(3, 11):
        chart = ControlChart(window=n, sigma=3.0, warmup=n - 1)
        for _ in range(n - 1):
            chart.observe(1.0 + rng.random() * 1e-3)
        outlier = 1e6
        assert chart.exceeds(outlier)  # judged before it enters the window: flagged
        chart.observe(outlier)
        assert not chart.exceeds(outlier)
        z_score = (outlier - chart.mean) / chart.std
        assert z_score <= (n - 1) / math.sqrt(n) + 1e-9


def test_state_dict_resumes_bit_identically(seed):
    rng = random.Random(seed)
    values = [rng.gauss(5.0, 2.0) for _ in range(137)]
    chart = ControlChart(window=16, sigma=3.0, warmup=4)
    for value in values[:70]:
        chart.observe(value)
    resumed = ControlChart(window=2)  # configuration comes from the state dict
    resumed.load_state_dict(chart.state_dict())
    assert (resumed.window, resumed.sigma, resumed.warmup) == (16, 3.0, 4)
    for value in values[70:]:
        chart.observe(value)
        resumed.observe(value)
        assert (resumed.mean, resumed.std, resumed.limit) == (chart.mean, chart.std, chart.limit)
    with pytest.raises(KeyError, match="lacks"):
        resumed.load_state_dict({"window": 3})


def test_reset_and_nonfinite():
    chart = ControlChart(window=3)
    chart.observe(2.0)
    with pytest.raises(ValueError, match="nan"):
        chart.observe(float("nan"))
    with pytest.raises(ValueError, match="inf"):
        chart.observe(float("inf"))
    assert len(chart) == 1
    chart.reset()
    assert len(chart) == 0 and math.isnan(chart.mean)


@pytest.mark.parametrize("kwargs, match", [
    ({"window": 1}, "window must be an int >= 2, got 1"),
    ({"window": 2.5}, "got 2.5"),
    ({"sigma": 0.0}, "sigma must be a finite number > 0, got 0.0"),
    ({"sigma": -1}, "got -1"),
    ({"sigma": math.inf}, "got inf"),
    ({"window": 5, "warmup": 6}, r"warmup must be an int in \[2, window=5\], got 6"),
    ({"warmup": 1}, "got 1"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ControlChart(**kwargs)


def residual_reference(values, sigma):
    """Least squares through the window by statistics.linear_regression, predicted one step ahead."""
    times = list(range(len(values)))
    slope, intercept = statistics.linear_regression(times, values)
    spread = math.sqrt(sum((y - intercept - slope * t) ** 2 for t, y in zip(times, values)) / (len(values) - 2))
    prediction = intercept + slope * len(values)
    return prediction, spread, prediction + sigma * spread


@pytest.mark.parametrize("offset", [0.0, 1e3])
def test_residual_chart_matches_a_fresh_fit(seed, offset):
    rng = random.Random(seed)
    window = rng.randint(3, 40)
    chart = ResidualChart(window=window, sigma=2.0)
    history = []
    for step in range(10 * window + rng.randint(0, window)):  # evictions and several exact recomputations
        value = offset + 5.0 * math.exp(-step / 50) + rng.gauss(0.0, 0.1) * rng.choice([0.01, 1.0, 10.0])
        chart.observe(value)
        history.append(value)
        window_values = history[-window:]
        assert chart.values == window_values
        if len(window_values) >= 3:
            prediction, spread, limit = residual_reference(window_values, 2.0)
            scale = max(1.0, offset)
            assert chart.center == pytest.approx(prediction, rel=1e-9, abs=1e-9 * scale)
            assert chart.std == pytest.approx(spread, rel=1e-5, abs=1e-7 * scale)
            assert chart.limit == pytest.approx(limit, rel=1e-9, abs=1e-6 * scale)


def test_residual_limit_follows_a_falling_loss_the_shewhart_limit_does_not(seed):
    """On a steadily falling loss with small noise, a batch 5 noise-widths above the trend is flagged by the
    residual chart only: the falling trend inflates the Shewhart window's standard deviation."""
    rng = random.Random(seed)
    window, noise = 50, 0.02
    losses = [2.0 - 0.01 * t + rng.gauss(0.0, noise) for t in range(window)]
    charts = [ControlChart(window=window), ResidualChart(window=window)]
    for chart in charts:
        for value in losses:
            chart.observe(value)
    outlier = 2.0 - 0.01 * window + 5 * noise
    shewhart, residual = charts
    assert residual.exceeds(outlier) and not shewhart.exceeds(outlier)
    assert residual.std < 2 * noise < shewhart.std
    assert residual.slope == pytest.approx(-0.01, abs=0.003)


def test_residual_chart_state_dict_and_factory(seed):
    rng = random.Random(seed)
    values = [rng.gauss(3.0, 1.0) - 0.01 * t for t in range(120)]
    chart = make_chart("residual", window=16, sigma=3.0, warmup=5)
    for value in values[:70]:
        chart.observe(value)
    resumed = chart_from_state(chart.state_dict())
    assert isinstance(resumed, ResidualChart) and (resumed.window, resumed.warmup) == (16, 5)
    for value in values[70:]:
        chart.observe(value)
        resumed.observe(value)
        assert (resumed.center, resumed.std, resumed.limit) == (chart.center, chart.std, chart.limit)
    old_checkpoint = ControlChart(window=4).state_dict()
    del old_checkpoint["kind"]  # written before charts had kinds: a Shewhart chart
    assert isinstance(chart_from_state(old_checkpoint), ControlChart)
    with pytest.raises(ValueError, match="chart must be one of .* got 'ewma'"):
        make_chart("ewma", window=4, sigma=3.0, warmup=None)
    with pytest.raises(ValueError, match="window must be an int >= 3 for the residual chart, got 2"):
        ResidualChart(window=2)
    with pytest.raises(ValueError, match=r"warmup must be an int in \[3, window=5\] .* got 2"):
        ResidualChart(window=5, warmup=2)
    with pytest.raises(ValueError, match="non-finite"):
        chart.observe(math.nan)
