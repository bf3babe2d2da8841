"""Paired comparisons for the lab's tables: a mean difference, its 95% t interval and p.

The unit of a claim is the independent replicate of the thing claimed (a purification, not a
fine-tuning seed): `paired` takes one value per replicate of each setting, paired by replicate
(the same training seed), e.g. each purification's mean AASR over its fine-tuning seeds.
Student's t is computed here (regularized incomplete beta, Lentz's continued fraction) so the
lab needs no SciPy; tests check it against published quantiles.
"""

from __future__ import annotations

import math
import statistics


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        m2 = 2 * m
        for aa in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_sf2(t: float, df: int) -> float:
    """Two-sided p of Student's t statistic `t` with `df` degrees of freedom."""
    return betainc(df / 2.0, 0.5, df / (df + t * t))


def t_quantile(q: float, df: int) -> float:
    """The `q` quantile (q > 0.5) of Student's t with `df` degrees of freedom, by bisection."""
    lo, hi = 0.0, 1e4
    for _ in range(200):
        mid = (lo + hi) / 2
        if t_sf2(mid, df) / 2 > 1 - q:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def paired(a: list[float], b: list[float]) -> dict:
    """a - b paired by replicate: {"mean_diff", "ci95": [lo, hi], "p", "n", "diffs"}; with n < 2
    the interval and p are undefined (None): one replicate supports no claim."""
    if len(a) != len(b):
        raise ValueError(f"paired: {len(a)} replicates against {len(b)}; pair them by replicate")
    diffs = [x - y for x, y in zip(a, b)]
    n = len(diffs)
    mean = statistics.fmean(diffs) if diffs else float("nan")
    if n < 2:
        return {"mean_diff": mean, "ci95": None, "p": None, "n": n, "diffs": diffs}
    se = statistics.stdev(diffs) / math.sqrt(n)
    if se <= 1e-9 * max(1.0, abs(mean)):  # identical differences (up to rounding): no measured spread, no claim
        return {"mean_diff": mean, "ci95": None, "p": None, "n": n, "diffs": diffs}
    half = t_quantile(0.975, n - 1) * se
    return {"mean_diff": mean, "ci95": [mean - half, mean + half], "p": t_sf2(mean / se, n - 1), "n": n, "diffs": diffs}


def established(comparison: dict) -> bool:
    """A difference is called established only where its 95% interval excludes 0."""
    ci = comparison.get("ci95")
    return bool(ci) and (ci[0] > 0 or ci[1] < 0)
