"""Mean, sample std and 95 % confidence intervals of differences, with exact Student-t quantiles; two-sided
p-values of the same t statistics, and Holm's step-down adjustment for a family of them.

No scipy: the t distribution's CDF is the regularised incomplete beta function (continued fraction, as in
Numerical Recipes 6.4), and its quantile is found by bisection on that CDF, which is monotone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

LEVEL = 0.95


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def sample_std(values: list[float]) -> float | None:
    """Standard deviation with the n - 1 denominator; None for a single value (no spread to estimate)."""
    if len(values) < 2:
        return None
    m = mean(values)
    return math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


def summary(values: list[float]) -> dict:
    return {"mean": mean(values), "std": sample_std(values), "n": len(values), "values": list(values)}


# ------------------------------------------------------------------------------------------ Student t


def _beta_continued_fraction(x: float, a: float, b: float) -> float:
    """The continued fraction of I_x(a, b), evaluated by the modified Lentz method."""
    tiny, eps = 1e-300, 1e-15

    def guard(v: float) -> float:
        return tiny if abs(v) < tiny else v

    c, d = 1.0, 1.0 / guard(1.0 - (a + b) * x / (a + 1.0))
    h = d
    for m in range(1, 1000):
        even = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        d, c = 1.0 / guard(1.0 + even * d), guard(1.0 + even / c)
        h *= d * c
        odd = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))
        d, c = 1.0 / guard(1.0 + odd * d), guard(1.0 + odd / c)
        h *= d * c
        if abs(d * c - 1.0) < eps:
            return h
    raise ArithmeticError(f"incomplete beta did not converge (x={x}, a={a}, b={b})")


def regularized_beta(x: float, a: float, b: float) -> float:
    """I_x(a, b) = B(x; a, b) / B(a, b) for 0 <= x <= 1, a, b > 0."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):  # the fraction converges fast on this side; use symmetry on the other
        return math.exp(log_front) * _beta_continued_fraction(x, a, b) / a
    return 1.0 - math.exp(log_front) * _beta_continued_fraction(1.0 - x, b, a) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with df > 0 degrees of freedom (df need not be an integer: Welch)."""
    tail = 0.5 * regularized_beta(df / (df + t * t), df / 2.0, 0.5)  # P(T > |t|)
    return 1.0 - tail if t > 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The t with P(T <= t) = p, by bisection: the CDF is monotone, so this cannot fail to converge."""
    if not 0.0 < p < 1.0 or not df > 0:
        raise ValueError(f"t_quantile needs 0 < p < 1 and df > 0, got p={p}, df={df}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    low, high = 0.0, 1.0
    while t_cdf(high, df) < p:
        low, high = high, high * 2.0
    for _ in range(200):
        mid = 0.5 * (low + high)
        if t_cdf(mid, df) < p:
            low = mid
        else:
            high = mid
        if high - low <= 1e-12 * max(1.0, high):
            break
    return 0.5 * (low + high)


def two_sided_p(t: float, df: float) -> float:
    """P(|T| >= |t|): below 1 - level exactly when the level-interval excludes 0."""
    return min(1.0, 2.0 * t_cdf(-abs(t), df))


def holm(pvalues: list[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values, in the input order: the i-th smallest of m is multiplied by
    m - i + 1 (i from 1), kept monotone and capped at 1. Rejecting where adjusted p < alpha keeps the chance of
    any false rejection in the family below alpha, whatever the dependence between the tests."""
    m = len(pvalues)
    adjusted, running = [0.0] * m, 0.0
    for rank, i in enumerate(sorted(range(m), key=lambda i: pvalues[i])):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        adjusted[i] = running
    return adjusted


# ------------------------------------------------------------------------------------------ intervals


NO_SPREAD = "no spread (all {n} values equal): no interval"


@dataclass(frozen=True)
class Interval:
    """A difference (arm - baseline) and its confidence interval; low/high are None when none is possible."""

    diff: float
    low: float | None
    high: float | None
    kind: str  # "paired", "welch", "one-sample" or "none"
    n: int  # pairs (paired), values (one-sample), or the smaller arm's seeds (welch, none)
    df: float | None = None
    note: str = ""
    p: float | None = None  # two-sided p-value of "no difference" (the same t as the interval)

    @property
    def has_interval(self) -> bool:
        return self.low is not None

    @property
    def within_noise(self) -> bool:
        """The interval contains 0: the seeds disagree as much as the arms do."""
        return self.has_interval and self.low <= 0.0 <= self.high

    def describe(self) -> str:
        if not self.has_interval:
            return self.note
        return f"CI [{self.low:.3g}, {self.high:.3g}]"

    def as_dict(self) -> dict:
        return {"diff": self.diff, "low": self.low, "high": self.high, "kind": self.kind, "n": self.n,
                "df": self.df, "within_noise": self.within_noise if self.has_interval else None,
                "p": self.p, "note": self.note}


def _t_interval(centre: float, se: float, df: float, kind: str, n: int, level: float) -> Interval:
    if se == 0:  # equal values by chance (a quantised metric at a few seeds), not a noiseless measurement
        return Interval(centre, None, None, kind, n, df, note=NO_SPREAD.format(n=n))
    half = t_quantile(0.5 + level / 2.0, df) * se
    return Interval(centre, centre - half, centre + half, kind, n, df, p=two_sided_p(centre / se, df))


def mean_interval(values: list[float], level: float = LEVEL) -> Interval:
    """One-sample t-interval of the mean (for claims about one arm's value, e.g. a share below 2 %)."""
    n = len(values)
    if n < 2:
        return Interval(mean(values), None, None, "none", n, note="one seed: no interval possible")
    return _t_interval(mean(values), sample_std(values) / math.sqrt(n), n - 1, "one-sample", n, level)


def paired_interval(arm: dict, base: dict, level: float = LEVEL) -> Interval:
    """t-interval of the mean per-seed difference; arm and base map seed -> value over the same seeds."""
    if set(arm) != set(base):
        raise ValueError(f"paired intervals need the same seeds, got {sorted(arm)} and {sorted(base)}")
    diffs = [arm[s] - base[s] for s in sorted(arm)]
    n = len(diffs)
    if n < 2:
        return Interval(diffs[0], None, None, "none", n, note="one seed per arm: no interval possible")
    return _t_interval(mean(diffs), sample_std(diffs) / math.sqrt(n), n - 1, "paired", n, level)


def welch_interval(arm: list[float], base: list[float], level: float = LEVEL) -> Interval:
    """Welch's t-interval of mean(arm) - mean(base): unequal variances, Welch-Satterthwaite df."""
    diff = mean(arm) - mean(base)
    n1, n2 = len(arm), len(base)
    if min(n1, n2) < 2:
        return Interval(diff, None, None, "none", min(n1, n2),
                        note="an arm with one seed: no interval possible")
    v1, v2 = sample_std(arm) ** 2 / n1, sample_std(base) ** 2 / n2
    se = math.sqrt(v1 + v2)
    if se == 0:
        return Interval(diff, None, None, "welch", min(n1, n2), note=NO_SPREAD.format(n=n1 + n2))
    df = (v1 + v2) ** 2 / (v1**2 / (n1 - 1) + v2**2 / (n2 - 1))
    return _t_interval(diff, se, df, "welch", min(n1, n2), level)


def difference(arm: dict, base: dict, level: float = LEVEL) -> Interval:
    """arm - base (seed -> value each): paired by seed when both have the same seeds, Welch otherwise."""
    if set(arm) == set(base):
        return paired_interval(arm, base, level)
    return welch_interval(list(arm.values()), list(base.values()), level)


def holm_family(diffs: list[dict], alpha: float = 1.0 - LEVEL) -> list[dict]:
    """The differences (as_dict rows) with p_holm over the family of those that have a p-value, and
    `significant` (p_holm < alpha); rows without an interval are not tests and stay out of the family."""
    tested = [d for d in diffs if d.get("p") is not None]
    for d, adjusted in zip(tested, holm([d["p"] for d in tested]), strict=True):
        d["p_holm"], d["significant"] = adjusted, adjusted < alpha
    for d in diffs:
        d.setdefault("p_holm", None)
        d.setdefault("significant", None)
        d["family"] = len(tested)
    return diffs
