"""Paired statistics against hand-computed values: t quantiles from tables, intervals worked out
on paper, bootstrap percentiles enumerated exactly, McNemar's exact and χ² p-values."""

from __future__ import annotations

import math

import pytest

from distillery.eval.stats import (
    Interval,
    mcnemar,
    mcnemar_verdict,
    paired_bootstrap,
    paired_t,
    t_cdf,
    t_quantile,
    verdict,
)


@pytest.mark.parametrize(
    ("df", "expected"),  # Student t tables, 97.5% (two-sided 95%), and 95%
    [(1, 12.706), (2, 4.303), (4, 2.776), (9, 2.262), (29, 2.045), (1000, 1.962)],
)
def test_t_quantile_matches_tables(df: int, expected: float) -> None:
    assert t_quantile(0.975, df) == pytest.approx(expected, abs=1e-3)
    assert t_quantile(0.025, df) == pytest.approx(-expected, abs=1e-3)


def test_t_quantile_other_levels_and_cdf() -> None:
    assert t_quantile(0.95, 4) == pytest.approx(2.132, abs=1e-3)
    assert t_quantile(0.995, 2) == pytest.approx(9.925, abs=1e-3)
    assert t_quantile(0.5, 7) == pytest.approx(0.0, abs=1e-9)
    # df = 1 is the Cauchy distribution: F(t) = 1/2 + atan(t)/π.
    for t in (-3.0, -0.5, 0.7, 10.0):
        assert t_cdf(t, 1) == pytest.approx(0.5 + math.atan(t) / math.pi, abs=1e-10)
    with pytest.raises(ValueError):
        t_quantile(1.0, 3)


def test_paired_t_by_hand() -> None:
    # diffs 1, 2, 4: mean 7/3, sample variance 7/3, se sqrt(7/9), t(0.975, 2) = 4.303.
    iv = paired_t([10.0, 12.0, 14.0], [9.0, 10.0, 10.0])
    assert iv.mean == pytest.approx(7 / 3)
    assert iv.low == pytest.approx(-1.461, abs=2e-3) and iv.high == pytest.approx(6.128, abs=2e-3)
    assert iv.n == 3 and verdict(iv, lower_is_better=True) == "no difference detected at 3 seeds"
    # diffs -2, -3, -1, -2, -2: mean -2, variance 0.5, se sqrt(0.1), t(0.975, 4) = 2.776.
    iv = paired_t([98, 97, 99, 98, 98], [100, 100, 100, 100, 100])
    half = 2.776 * math.sqrt(0.1)
    assert iv.low == pytest.approx(-2 - half, abs=1e-3) and iv.high == pytest.approx(
        -2 + half, abs=1e-3
    )
    assert verdict(iv, lower_is_better=True) == "better"  # lower perplexity
    assert verdict(iv, lower_is_better=False) == "worse"  # lower accuracy
    # 10 seeds, diffs 0.1 · (1..10): mean 0.55, sd sqrt(55/6)/10, t(0.975, 9) = 2.262.
    iv = paired_t([0.1 * k for k in range(1, 11)], [0.0] * 10)
    half = 2.262 * math.sqrt(55 / 6) / 10 / math.sqrt(10)
    assert iv.low == pytest.approx(0.55 - half, abs=1e-3)
    assert verdict(iv, lower_is_better=True) == "worse"
    assert "[+0.33, +0.77] (95% t-interval, 10 paired seeds)" in iv.describe(2)


def test_paired_t_edges() -> None:
    one = paired_t([5.0], [3.0])
    assert one.mean == 2.0 and one.low == -math.inf
    assert verdict(one, lower_is_better=True) == "no difference detected at 1 seed"
    assert "no interval from one seed" in one.describe()
    same = paired_t([1.0, 2.0], [1.0, 2.0])  # identical arms: a zero-width interval at 0
    assert (same.low, same.high) == (0.0, 0.0)
    assert verdict(same, lower_is_better=True) == "no difference detected at 2 seeds"
    with pytest.raises(ValueError, match="same seeds"):
        paired_t([1.0, 2.0], [1.0])


def test_bootstrap_percentiles_enumerated() -> None:
    # diffs (0, 0, 3): a resampled mean is K with K ~ Binomial(3, 1/3), P(K ≤ 2) = 26/27:
    # the 2.5% / 97.5% percentiles are 0 and 3; the 5% / 95% ones 0 and 2.
    iv = paired_bootstrap([1.0, 2.0, 5.0], [1.0, 2.0, 2.0], samples=4000, seed=1)
    assert (iv.mean, iv.low, iv.high) == (1.0, 0.0, 3.0)
    narrow = paired_bootstrap(
        [1.0, 2.0, 5.0], [1.0, 2.0, 2.0], samples=4000, seed=1, confidence=0.9
    )
    assert (narrow.low, narrow.high) == (0.0, 2.0)
    assert iv.unit == "examples" and "bootstrap interval, 3 examples" in iv.describe()
    constant = paired_bootstrap([2.5] * 7, [2.0] * 7, samples=200)
    assert (constant.low, constant.high) == (0.5, 0.5)


def test_bootstrap_matches_normal_theory_and_is_seeded() -> None:
    # 400 examples, 0/1 differences with 120 ones: se = sqrt(0.3 · 0.7 / 400) ≈ 0.0229.
    a = [1.0] * 120 + [0.0] * 280
    b = [0.0] * 400
    iv = paired_bootstrap(a, b, samples=3000, seed=0)
    half = 1.96 * math.sqrt(0.3 * 0.7 / 400)
    assert iv.mean == pytest.approx(0.3)
    assert iv.high - iv.low == pytest.approx(2 * half, rel=0.1)
    assert paired_bootstrap(a, b, samples=3000, seed=0) == iv
    assert verdict(iv, lower_is_better=True) == "worse"


def test_mcnemar_exact_and_chi_square() -> None:
    # 1 discordant pair for a, 7 for b, 12 concordant: exact p = 2 · (1 + 8) / 2^8.
    a = [True] * 10 + [False] * 2 + [True] + [False] * 7
    b = [True] * 10 + [False] * 2 + [False] + [True] * 7
    result = mcnemar(a, b)
    assert (result["only"], result["against_only"], result["exact"]) == (1, 7, True)
    assert result["p_value"] == pytest.approx(18 / 256)
    assert result["difference"] == pytest.approx(-6 / 20)
    assert mcnemar_verdict(result) == "no difference detected at 20 examples"
    b6 = [False] * 6 + [True] * 6
    a6 = [True] * 6 + [True] * 6
    assert mcnemar(b6, a6)["p_value"] == pytest.approx(2 / 64)  # 0 vs 6 discordant
    assert mcnemar_verdict(mcnemar(b6, a6)) == "worse"
    assert mcnemar_verdict(mcnemar(a6, b6)) == "better"
    # 40 vs 20 discordant: χ² = (|40 − 20| − 1)² / 60 = 6.0167, p = 0.014171 (χ² tables, 1 df).
    big_a = [True] * 40 + [False] * 20 + [True] * 100
    big_b = [False] * 40 + [True] * 20 + [True] * 100
    result = mcnemar(big_a, big_b)
    assert not result["exact"] and result["p_value"] == pytest.approx(0.014171, abs=1e-6)
    assert mcnemar([True, False], [True, False])["p_value"] == 1.0


def test_interval_as_dict_round_trips() -> None:
    iv = Interval(1.0, 0.5, 1.5, 3)
    assert Interval(**iv.as_dict()) == iv  # type: ignore[arg-type]
    assert paired_t([1.0], [0.0]).as_dict()["low"] is None  # JSON has no infinity
