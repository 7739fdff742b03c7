"""The gate's statistics on constructed per-row scores: verdicts, intervals, p-values, rows needed."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from flywheel.paired import (
    BOOTSTRAP,
    INCONCLUSIVE,
    MCNEMAR,
    NO_BASELINE,
    PROMOTE,
    REFUSE,
    Rules,
    compare,
    mcnemar_exact,
    paired_interval,
    rows_needed_mcnemar,
)


def _binary(wins: int, losses: int, both_right: int, both_wrong: int) -> tuple[list[float], list[float]]:
    """Per-row 0/1 scores with the given discordant (wins, losses) and concordant rows."""
    cand = [1.0] * wins + [0.0] * losses + [1.0] * both_right + [0.0] * both_wrong
    base = [0.0] * wins + [1.0] * losses + [1.0] * both_right + [0.0] * both_wrong
    return cand, base


def test_a_clear_win_promotes() -> None:
    cand, base = _binary(wins=9, losses=1, both_right=8, both_wrong=2)
    result = compare(cand, base)
    assert result.verdict == PROMOTE and result.method == MCNEMAR
    assert (result.wins, result.losses, result.ties, result.rows) == (9, 1, 10, 20)
    assert result.p_better < 0.05 and result.rows_needed is None
    # partial-credit scores go to the paired bootstrap
    cont = compare([0.8 + 0.01 * (i % 5) for i in range(15)], [0.5 + 0.02 * (i % 3) for i in range(15)])
    assert cont.verdict == PROMOTE and cont.method == BOOTSTRAP and cont.ci_low > 0


def test_a_clear_loss_refuses() -> None:
    cand, base = _binary(wins=0, losses=8, both_right=6, both_wrong=2)
    result = compare(cand, base)
    assert result.verdict == REFUSE and result.p_worse < 0.05 and result.p_better == 1.0
    cont = compare([0.3, 0.35, 0.2, 0.4, 0.3] * 3, [0.7, 0.75, 0.8, 0.6, 0.7] * 3)
    assert cont.verdict == REFUSE and cont.ci_high < 0


def test_a_tie_with_few_rows_is_inconclusive() -> None:
    cand, base = _binary(wins=1, losses=1, both_right=2, both_wrong=0)
    result = compare(cand, base)
    assert result.verdict == INCONCLUSIVE and "only 4 rows" in result.reason
    assert result.rows_needed == 10 and result.more_rows == 6  # at least GATE_MIN_ROWS
    # few rows even when every one is a win: four wins out of four is not evidence yet
    assert compare([1.0] * 4, [0.0] * 4).verdict == INCONCLUSIVE
    # and a tie on many rows stays inconclusive, with no finite estimate of rows to decide it
    cand, base = _binary(wins=5, losses=5, both_right=20, both_wrong=10)
    tie = compare(cand, base)
    assert tie.verdict == INCONCLUSIVE and tie.rows_needed is None
    assert "would not decide it" in tie.reason


def test_same_mean_different_spread_gives_different_intervals() -> None:
    base = [0.5] * 12
    steady = compare([0.6] * 12, base)  # +0.1 on every row
    spread = compare([1.0, 0.2] * 6, base)  # +0.5, -0.3, ...: the same mean, +0.1
    assert steady.difference == pytest.approx(spread.difference) == pytest.approx(0.1)
    assert steady.ci_low == pytest.approx(0.1) and steady.ci_high == pytest.approx(0.1)
    assert spread.ci_low < 0 < spread.ci_high
    assert (spread.ci_high - spread.ci_low) > 0.2
    assert steady.verdict == PROMOTE and spread.verdict == INCONCLUSIVE
    assert spread.rows_needed is not None and spread.rows_needed > 12


def test_a_failed_row_makes_the_verdict_inconclusive() -> None:
    cand, base = _binary(wins=12, losses=0, both_right=6, both_wrong=0)
    assert compare(cand, base).verdict == PROMOTE
    cand[3] = None  # the candidate got no answer on one row (LM error)
    result = compare(cand, base)
    assert result.verdict == INCONCLUSIVE and result.failed_rows == 1 and result.rows == 17
    assert "1 of 18 rows failed" in result.reason and result.rows_needed is None
    base[5] = None  # a failure on either side counts; one row is one failure
    assert compare(cand, base).failed_rows == 2
    # with nothing in Production the candidate is promoted, unless one of its rows failed
    assert compare([1.0, 0.0], None).verdict == PROMOTE
    assert compare([1.0, None], None).verdict == INCONCLUSIVE
    assert compare([1.0, 0.0], None).method == NO_BASELINE


def test_p_values_and_intervals_are_scipys() -> None:
    cand, base = _binary(wins=7, losses=2, both_right=5, both_wrong=3)
    result = compare(cand, base)
    assert result.p_better == stats.binomtest(7, 9, 0.5, alternative="greater").pvalue
    assert result.p_worse == stats.binomtest(2, 9, 0.5, alternative="greater").pvalue
    assert mcnemar_exact(7, 2) == (result.p_better, result.p_worse)
    # McNemar's exact test is the binomial test on the discordant pairs: twice the smaller tail
    assert stats.binomtest(2, 9, 0.5).pvalue == pytest.approx(2 * stats.binom.cdf(2, 9, 0.5))

    rng = np.random.default_rng(5)
    c, b = rng.random(20).round(2), rng.random(20).round(2)
    rules = Rules()
    result = compare(list(c), list(b), rules)
    expected = stats.bootstrap(
        (c, b),
        lambda x, y, axis=-1: (x - y).mean(axis=axis),
        paired=True,
        vectorized=True,
        confidence_level=1 - 2 * rules.alpha,
        n_resamples=rules.resamples,
        method="BCa",
        rng=np.random.default_rng(rules.seed),
    ).confidence_interval
    assert (result.ci_low, result.ci_high) == (expected.low, expected.high)
    assert paired_interval(c, b, 0.9, rules.resamples, rules.seed) == (expected.low, expected.high)


def test_margin_and_non_inferiority() -> None:
    cand = [0.62, 0.58, 0.6, 0.61, 0.59] * 4
    base = [0.55, 0.5, 0.52, 0.54, 0.51] * 4  # about +0.076 on every row
    assert compare(cand, base, Rules(margin=0.05)).verdict == PROMOTE
    needs_more = compare(cand, base, Rules(margin=0.1))  # better, but not by the margin asked for
    assert needs_more.verdict == INCONCLUSIVE and needs_more.rows_needed is None

    slightly_worse = [b - 0.02 + 0.005 * (i % 3) for i, b in enumerate(base)]
    assert compare(slightly_worse, base).verdict == REFUSE  # superiority: worse is worse
    tolerant = compare(slightly_worse, base, Rules(margin=0.05, non_inferiority=True))
    assert tolerant.verdict == PROMOTE and tolerant.mode == "non-inferiority"
    assert tolerant.ci_low > -0.05
    much_worse = [b - 0.2 for b in base]
    assert compare(much_worse, base, Rules(margin=0.05, non_inferiority=True)).verdict == REFUSE
    # binary scores with a margin (or non-inferiority) are judged by the interval: McNemar has no margin
    cand, base = _binary(wins=9, losses=1, both_right=8, both_wrong=2)
    assert compare(cand, base, Rules(margin=0.1)).method == BOOTSTRAP
    with pytest.raises(ValueError, match="non_inferiority"):
        Rules(margin=-0.1)


def test_rows_needed_is_connors_estimate_from_the_observed_discordance() -> None:
    cand, base = _binary(wins=4, losses=1, both_right=5, both_wrong=2)
    result = compare(cand, base)
    assert result.verdict == INCONCLUSIVE
    psi, delta = 5 / 12, 3 / 12
    z_a, z_b = stats.norm.ppf(0.95), stats.norm.ppf(0.8)
    n = (z_a * math.sqrt(psi) + z_b * math.sqrt(psi - delta**2)) ** 2 / delta**2
    assert result.rows_needed == math.ceil(n) == rows_needed_mcnemar(4, 1, 12, 0.05)
    assert result.more_rows == math.ceil(n) - 12 > 0
    # that many rows in the observed proportions (4 x 12 = 48 >= 40) do decide it
    scaled = compare(*_binary(wins=4 * 4, losses=1 * 4, both_right=5 * 4, both_wrong=2 * 4))
    assert 48 >= math.ceil(n) and scaled.verdict == PROMOTE
