"""
Statistics for comparing runs over seeds, with nothing beyond the standard library: the
mean and sd, Student's t distribution (through the regularised incomplete beta function),
the paired t-test with its effect and 95% interval, and Holm's correction for a family of
tests.
"""

import math
from dataclasses import dataclass


def mean_sd(values):
    """(mean, sample standard deviation); sd is 0 for a single value."""
    n = len(values)
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return mean, sd


def _beta_fraction(a, b, x, iterations=300, eps=1e-15):
    """The continued fraction of I_x(a, b), evaluated by the modified Lentz method."""
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, iterations + 1):
        # the even and the odd term of the fraction
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1 + numerator * d
            d = 1 / (d if abs(d) > tiny else tiny)
            c = 1 + numerator / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1) < eps:
            break
    return h


def incomplete_beta(a, b, x):
    """I_x(a, b), the regularised incomplete beta function, for a, b > 0 and 0 <= x <= 1."""
    if x <= 0:
        return 0.0
    if x >= 1:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1) / (a + b + 2):        # where the fraction converges fast; else by symmetry
        return front * _beta_fraction(a, b, x) / a
    return 1 - front * _beta_fraction(b, a, 1 - x) / b


def t_cdf(t, df):
    """P(T <= t) for Student's t with df degrees of freedom."""
    tail = 0.5 * incomplete_beta(df / 2, 0.5, df / (df + t * t))
    return 1 - tail if t > 0 else tail


def t_quantile(p, df):
    """The t with P(T <= t) = p (bisection: t_cdf is monotone)."""
    lo, hi = -1e4, 1e4
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_cdf(mid, df) < p else (lo, mid)
    return (lo + hi) / 2


@dataclass
class Paired:
    effect: float          # mean of b - a over the pairs
    low: float             # its 95% interval
    high: float
    t: float
    p: float               # two-sided
    n: int


def paired_t_test(a, b):
    """Paired t-test of b against a (the same seeds and batches in the same order)."""
    if len(a) != len(b) or len(a) < 2:
        raise ValueError(f"a paired test needs two equal lists of at least 2 values, got {len(a)} and {len(b)}")
    diffs = [y - x for x, y in zip(a, b)]
    n = len(diffs)
    effect, sd = mean_sd(diffs)
    half = t_quantile(0.975, n - 1) * sd / math.sqrt(n)
    if sd == 0:
        return Paired(effect, effect, effect, math.copysign(math.inf, effect) if effect else 0.0,
                      0.0 if effect else 1.0, n)
    t = effect / (sd / math.sqrt(n))
    return Paired(effect, effect - half, effect + half, t, 2 * (1 - t_cdf(abs(t), n - 1)), n)


def holm(p_values):
    """Holm's step-down adjusted p-values, in the order given."""
    order = sorted(range(len(p_values)), key=lambda i: p_values[i])
    adjusted, running = [0.0] * len(p_values), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(p_values) - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted
