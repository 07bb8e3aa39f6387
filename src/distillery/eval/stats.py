"""Paired statistics for comparing arms: verdicts come from intervals, never from stds.

- ``paired_t``: arms run on the same seeds (same data order, same teacher per seed) → the
  per-seed differences arm − comparison, their mean and a Student-t interval;
- ``paired_bootstrap``: two models scored on one shared, fixed test set → the mean per-example
  difference with a percentile interval from resampling examples (the same draws for both);
  ``percentile_interval`` for any other statistic resampled elsewhere (e.g. binned ECE);
- ``mcnemar``: accuracy of two classifiers on one shared test set → the discordant counts and
  an exact binomial p-value (χ² with continuity correction for large counts);
- ``verdict``: "better" / "worse" / "no difference detected at n seeds" from an interval and
  the metric's direction (lower is better for perplexity and loss).

Pure Python (``math``) so the library does not need SciPy.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass

EXACT_MCNEMAR_BELOW = 25  # discordant pairs: exact binomial test below this, χ² from it on


@dataclass(frozen=True)
class Interval:
    """A difference (arm − comparison) with a two-sided confidence interval over ``n`` units."""

    mean: float
    low: float
    high: float
    n: int
    confidence: float = 0.95
    unit: str = "seeds"  # what ``n`` counts: paired seeds, or examples of a shared test set
    method: str = "t"  # "t" or "bootstrap"

    def as_dict(self) -> dict[str, float | int | str | None]:
        """For JSON: an unbounded end (one seed) is ``None``."""
        return {k: (None if isinstance(v, float) and math.isinf(v) else v)
                for k, v in asdict(self).items()}  # fmt: skip

    def describe(self, digits: int = 1) -> str:
        """``+3.2 [-1.0, +7.4] (95% t-interval, 3 paired seeds)``."""
        method = "t-interval" if self.method == "t" else "bootstrap interval"
        span = f"[{self.low:+.{digits}f}, {self.high:+.{digits}f}]"
        if not math.isfinite(self.low):
            span = "[no interval from one seed]"
        paired = "paired " if self.unit == "seeds" else ""
        what = f"{self.n} {paired}{_plural(self.unit, self.n)}"
        return f"{self.mean:+.{digits}f} {span} ({self.confidence:.0%} {method}, {what})"


def _plural(unit: str, n: int) -> str:
    return unit[:-1] if n == 1 and unit.endswith("s") else unit


# ----------------------------------------------------------------- Student's t distribution
def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularized incomplete beta (modified Lentz)."""
    tiny, eps = 1e-300, 1e-15
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        m2 = 2 * m
        for num in (m * (b - m) * x / ((qam + m2) * (a + m2)),
                    -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):  # fmt: skip
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < eps:
            break
    return h


def regularized_beta(x: float, a: float, b: float) -> float:
    """I_x(a, b), the regularized incomplete beta function, for 0 ≤ x ≤ 1."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = (
        math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
        + a * math.log(x) + b * math.log1p(-x)
    )  # fmt: skip
    front = math.exp(log_front)
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T ≤ t) for Student's t with ``df`` degrees of freedom."""
    tail = 0.5 * regularized_beta(df / (df + t * t), df / 2.0, 0.5)
    return 1.0 - tail if t > 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom (bisection on the cdf)."""
    if not 0.0 < p < 1.0 or df <= 0:
        raise ValueError(f"t_quantile needs 0 < p < 1 and df > 0 (got p={p}, df={df})")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    low, high = 0.0, 1.0
    while t_cdf(high, df) < p:
        high *= 2.0
    for _ in range(200):
        mid = 0.5 * (low + high)
        if t_cdf(mid, df) < p:
            low = mid
        else:
            high = mid
        if high - low < 1e-12 * max(1.0, high):
            break
    return 0.5 * (low + high)


# ----------------------------------------------------------------- intervals
def t_interval(mean: float, std: float, n: int, confidence: float = 0.95) -> Interval:
    """The Student-t interval of a mean of ``n`` paired differences with sample std ``std``
    (``n − 1`` degrees of freedom); one difference: unbounded."""
    if n < 2:
        return Interval(mean, -math.inf, math.inf, max(n, 1), confidence)
    half = t_quantile(0.5 + confidence / 2, n - 1) * std / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, n, confidence)


def paired_t(
    values: Sequence[float], against: Sequence[float], confidence: float = 0.95
) -> Interval:
    """The mean of the per-seed differences ``values[i] − against[i]`` with its Student-t
    interval (``t_interval``)."""
    if len(values) != len(against) or not values:
        raise ValueError(
            f"paired_t needs the same seeds in both arms (got {len(values)} and {len(against)})"
        )
    diffs = [float(a) - float(b) for a, b in zip(values, against, strict=True)]
    n = len(diffs)
    mean = math.fsum(diffs) / n
    std = math.sqrt(math.fsum((d - mean) ** 2 for d in diffs) / (n - 1)) if n > 1 else 0.0
    return t_interval(mean, std, n, confidence)


def paired_bootstrap(
    values: Sequence[float],
    against: Sequence[float],
    *,
    samples: int = 2000,
    seed: int = 0,
    confidence: float = 0.95,
) -> Interval:
    """Two models scored per example on one shared test set (``values[i]``, ``against[i]``:
    e.g. losses or 0/1 correctness on example ``i``): the mean difference and a percentile
    interval from ``samples`` resamplings of the examples (seeded; the same draw for both)."""
    if len(values) != len(against) or not values:
        raise ValueError("paired_bootstrap needs both models scored on the same examples")
    diffs = [float(a) - float(b) for a, b in zip(values, against, strict=True)]
    n, rng = len(diffs), random.Random(seed)
    means = [math.fsum(rng.choices(diffs, k=n)) / n for _ in range(samples)]
    return percentile_interval(math.fsum(diffs) / n, means, n, confidence=confidence)


def percentile_interval(
    estimate: float,
    resampled: Sequence[float],
    n: int,
    *,
    confidence: float = 0.95,
    unit: str = "examples",
) -> Interval:
    """A bootstrap percentile interval around ``estimate`` (the statistic on the whole sample)
    from the statistic on each resample (any order; B of them): the ⌊α·B⌋-th and
    (⌈(1−α)·B⌉−1)-th smallest, α = (1 − confidence)/2; ``n`` units were resampled."""
    values = sorted(float(v) for v in resampled)
    if not values:
        raise ValueError("percentile_interval needs at least one resample")
    b, alpha = len(values), (1.0 - confidence) / 2
    low = values[max(0, math.floor(alpha * b))]
    high = values[min(b - 1, math.ceil((1.0 - alpha) * b) - 1)]
    return Interval(estimate, low, high, n, confidence, unit=unit, method="bootstrap")


def binomial_two_sided(k: int, n: int) -> float:
    """Exact two-sided p-value of ``k`` successes in ``n`` fair coin flips (twice the smaller
    tail, at most 1)."""
    k = min(k, n - k)
    tail = math.fsum(math.comb(n, i) for i in range(k + 1)) / 2.0**n
    return min(1.0, 2.0 * tail)


def mcnemar(correct: Sequence[bool], against: Sequence[bool]) -> dict[str, float | int | bool]:
    """McNemar's test for two classifiers on one shared test set: ``only`` (this one right, the
    other wrong), ``against_only`` (the reverse), the accuracy difference and a two-sided
    p-value — exact binomial below ``EXACT_MCNEMAR_BELOW`` discordant pairs, else χ²(1) with
    continuity correction."""
    if len(correct) != len(against) or not correct:
        raise ValueError("mcnemar needs both classifiers scored on the same examples")
    only = sum(1 for a, b in zip(correct, against, strict=True) if a and not b)
    against_only = sum(1 for a, b in zip(correct, against, strict=True) if b and not a)
    discordant = only + against_only
    exact = discordant < EXACT_MCNEMAR_BELOW
    if discordant == 0:
        p = 1.0
    elif exact:
        p = binomial_two_sided(only, discordant)
    else:
        chi2 = (abs(only - against_only) - 1.0) ** 2 / discordant
        p = math.erfc(math.sqrt(chi2 / 2.0))  # survival function of χ² with 1 df
    return {
        "only": only,
        "against_only": against_only,
        "difference": (only - against_only) / len(correct),
        "p_value": p,
        "exact": exact,
        "n": len(correct),
    }


# ----------------------------------------------------------------- verdicts
def verdict(interval: Interval, *, lower_is_better: bool) -> str:
    """ "better" / "worse" (the interval excludes 0, read in the metric's direction) or
    "no difference detected at n seeds"."""
    if interval.high < 0.0 or interval.low > 0.0:
        lower = interval.high < 0.0
        return "better" if lower == lower_is_better else "worse"
    return f"no difference detected at {interval.n} {_plural(interval.unit, interval.n)}"


def mcnemar_verdict(result: dict[str, float | int | bool], alpha: float = 0.05) -> str:
    """ "better" / "worse" (accuracy, p < ``alpha``) or "no difference detected at n examples"."""
    if result["p_value"] < alpha and result["only"] != result["against_only"]:
        return "better" if result["only"] > result["against_only"] else "worse"
    return f"no difference detected at {result['n']} examples"
