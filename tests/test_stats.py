"""stats.py against printed table values and closed forms."""

import math

import pytest

import stats


@pytest.mark.parametrize("df, critical", [(1, 12.706), (2, 4.303), (3, 3.182), (5, 2.571), (10, 2.228),
                                          (30, 2.042), (120, 1.980)])
def test_t_quantiles_match_the_printed_table(df, critical):
    assert stats.t_quantile(0.975, df) == pytest.approx(critical, abs=5e-4)


def test_t_cdf_against_closed_forms():
    # df = 1 is the Cauchy distribution, df = 2 has F(t) = 1/2 + t / (2 sqrt(2 + t^2))
    for t in (-3.0, -0.5, 0.0, 0.7, 4.0):
        assert stats.t_cdf(t, 1) == pytest.approx(0.5 + math.atan(t) / math.pi, abs=1e-12)
        assert stats.t_cdf(t, 2) == pytest.approx(0.5 + t / (2 * math.sqrt(2 + t * t)), abs=1e-12)


def test_paired_t_test_by_hand():
    a, b = [4.796, 4.744, 4.715], [4.679, 4.655, 4.673]
    result = stats.paired_t_test(a, b)
    diffs = [y - x for x, y in zip(a, b)]
    mean = sum(diffs) / 3
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / 2)
    t = mean / (sd / math.sqrt(3))
    assert result.effect == pytest.approx(mean) and result.t == pytest.approx(t)
    assert result.p == pytest.approx(2 * (1 - stats.t_cdf(abs(t), 2)))
    assert result.low == pytest.approx(mean - 4.3027 * sd / math.sqrt(3), abs=1e-4)
    # three seeds do not decide it: the 95% interval holds 0 exactly when p > 0.05
    assert result.low < result.effect < 0 < result.high and result.p > 0.05
    with pytest.raises(ValueError):
        stats.paired_t_test([1.0], [2.0])


def test_holm_steps_down_and_stays_monotone():
    assert stats.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert stats.holm([0.5, 0.001]) == pytest.approx([0.5, 0.002])
