import pytest

from bench.stats import median_and_spread, percentile


def test_percentiles_on_known_samples():
    values = list(range(1, 101))  # 1..100
    assert percentile(values, 50) == pytest.approx(50.5)
    assert percentile(values, 99) == pytest.approx(99.01)
    assert percentile(values, 0) == 1 and percentile(values, 100) == 100
    assert percentile([7.0], 99) == 7.0
    with pytest.raises(ValueError, match="no values"):
        percentile([], 50)
    with pytest.raises(ValueError, match="within"):
        percentile([1.0], 101)


def test_median_spread_and_noise_flag():
    steady = median_and_spread([100.0, 104.0, 98.0])
    assert steady["median"] == 100.0
    assert steady["spread"] == pytest.approx(0.06)
    assert not steady["noisy"]
    noisy = median_and_spread([100.0, 130.0, 90.0, 110.0])
    assert noisy["median"] == 105.0
    assert noisy["spread"] == pytest.approx(40 / 105)
    assert noisy["noisy"]
