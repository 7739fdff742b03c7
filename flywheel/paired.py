"""The promotion gate's statistics: a paired comparison of two versions on the same rows.

Pure functions over per-row scores (no MLflow, no DSPy), so the rules can be read and
tested on constructed data. scipy does the statistics; nothing here re-derives a test.

Why paired: the candidate and the baseline answer the *same* held-out rows, so each row
is its own control. Comparing two means as if they were independent samples ignores that
and, on a handful of rows, mistakes noise for a change (the old gate promoted on a tie).

Why McNemar's exact test when every score is 0 or 1: only the discordant rows (one version
right, the other wrong) carry information about which version is better; under "no
difference" each discordant row is a fair coin, so the exact binomial test on the
candidate's wins among them (`scipy.stats.binomtest`, which *is* McNemar's exact test) is
valid for any number of rows, with no large-sample approximation.

Why a paired bootstrap otherwise: partial-credit scores (token F1) are bounded, lumpy and
skewed, so no distribution is assumed; `scipy.stats.bootstrap(paired=True)` resamples whole
rows and gives a confidence interval of mean(candidate - baseline). It is also used for
binary scores when a margin or non-inferiority is asked for, which McNemar cannot express.
For binary scores with no margin the exact test decides, not the interval: a percentile or
BCa interval is too optimistic on few rows (four wins and no loss out of ten "passes" the
interval but not the exact test).

Why three verdicts: "not significantly better" is not "worse". `promote` needs significant
evidence that the candidate is better (or, in non-inferiority mode, not worse by more than
the margin), `refuse` needs significant evidence that it is worse, and everything else,
including too few rows and any row that failed to evaluate, is `inconclusive`, which keeps
Production. A failed row (the LM was unreachable, the program raised) is not a wrong
answer: scoring it 0 would blame whichever version happened to hit the outage.

How many more rows: when inconclusive, `rows_needed` estimates the rows a decision would
take at 80% power if the observed effect is real: Connor's (1987) normal-approximation
sample size for McNemar's test from the observed discordance, or, for the bootstrap, the
paired z sample size ((z_{1-alpha} + z_{power}) * sd / effect)^2 from the observed mean and
standard deviation of the differences. It is an estimate to plan traffic with, not a promise.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

PROMOTE, REFUSE, INCONCLUSIVE = "promote", "refuse", "inconclusive"
SUPERIORITY, NON_INFERIORITY = "superiority", "non-inferiority"
MCNEMAR, BOOTSTRAP, NO_BASELINE = "mcnemar-exact", "paired-bootstrap", "no-baseline"
POWER = 0.8  # for the rows-needed estimate
_EPS = 1e-9  # scores closer than this are a tie (float noise is not a difference)


@dataclass(frozen=True)
class Rules:
    """What the gate asks for. Defaults match the GATE_* settings' defaults (see docs/configuration.md).

    alpha: one-sided significance level of each direction (better, worse); the interval is the
        two-sided (1 - 2 * alpha) one, so each of its ends is a one-sided (1 - alpha) bound.
    margin: superiority: the lower bound must exceed +margin; non-inferiority: -margin
        (the loss tolerated). Never negative.
    min_rows: fewer complete rows than this is inconclusive, whatever the scores.
    non_inferiority: promote a candidate that is not worse by more than `margin`.
    resamples, seed: of the bootstrap (fixed, so a verdict can be reproduced).
    """

    alpha: float = 0.05
    margin: float = 0.0
    min_rows: int = 10
    non_inferiority: bool = False
    resamples: int = 9999
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.alpha <= 0.5:
            raise ValueError(f"alpha must be in (0, 0.5], got {self.alpha}")
        if not 0 <= self.margin <= 1:
            raise ValueError(
                f"margin must be in [0, 1], got {self.margin} (use non_inferiority to tolerate a loss)"
            )
        if self.min_rows < 1 or self.resamples < 100:
            raise ValueError("min_rows must be >= 1 and resamples >= 100")

    @property
    def mode(self) -> str:
        return NON_INFERIORITY if self.non_inferiority else SUPERIORITY

    @property
    def confidence(self) -> float:
        return 1 - 2 * self.alpha

    @property
    def promote_above(self) -> float:
        """The lower bound of the interval must be above this to promote."""
        return -self.margin if self.non_inferiority else self.margin

    @property
    def refuse_below(self) -> float:
        """The upper bound of the interval must be below this to refuse."""
        return -self.margin if self.non_inferiority else 0.0


@dataclass(frozen=True)
class Comparison:
    """The verdict and its evidence. Differences are candidate - baseline; means are over complete rows.

    wins/losses are the discordant pairs (rows where the candidate scored higher / lower than
    the baseline), ties the rest. p_better/p_worse are McNemar's one-sided exact p-values
    (binary scores only). rows_needed is the estimated total of complete rows a decision
    would take (None when decided, or when no number of rows would be expected to decide).
    """

    verdict: str
    reason: str
    method: str
    mode: str
    rows: int
    failed_rows: int
    candidate_mean: float | None
    baseline_mean: float | None
    difference: float | None
    wins: int
    losses: int
    ties: int
    ci_low: float | None
    ci_high: float | None
    confidence: float
    p_better: float | None
    p_worse: float | None
    rows_needed: int | None
    alpha: float
    margin: float
    min_rows: int
    binary: bool

    @property
    def more_rows(self) -> int | None:
        return None if self.rows_needed is None else max(0, self.rows_needed - self.rows)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def mcnemar_exact(wins: int, losses: int) -> tuple[float, float]:
    """(p candidate better, p candidate worse): McNemar's exact test, one-sided each way.

    Under "no difference" the candidate's wins among the wins + losses discordant rows are
    Binomial(wins + losses, 1/2); scipy's exact binomial test is the test.
    """
    from scipy.stats import binomtest

    n = wins + losses
    if n == 0:
        return 1.0, 1.0
    better = binomtest(wins, n, 0.5, alternative="greater").pvalue
    worse = binomtest(losses, n, 0.5, alternative="greater").pvalue
    return float(better), float(worse)


def paired_interval(
    candidate: Sequence[float], baseline: Sequence[float], confidence: float, resamples: int, seed: int
) -> tuple[float, float]:
    """Paired bootstrap confidence interval of mean(candidate - baseline), rows resampled together.

    scipy's BCa interval (its default method), seeded; when every difference is the same the
    data has no spread and the interval is that one value (scipy would return NaN). Should
    BCa still give NaN, `compare` reads it as no interval: inconclusive, never a promotion.
    """
    import numpy as np
    from scipy.stats import bootstrap

    c, b = np.asarray(candidate, dtype=float), np.asarray(baseline, dtype=float)
    diffs = c - b
    if len(diffs) == 0:
        return math.nan, math.nan
    if np.ptp(diffs) <= _EPS:
        value = float(diffs.mean())
        return value, value
    result = bootstrap(
        (c, b),
        _mean_difference,
        paired=True,
        vectorized=True,
        confidence_level=confidence,
        n_resamples=resamples,
        method="BCa",
        rng=np.random.default_rng(seed),
    )
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def _mean_difference(c: Any, b: Any, axis: int = -1) -> Any:
    return (c - b).mean(axis=axis)


def rows_needed_mcnemar(wins: int, losses: int, rows: int, alpha: float, power: float = POWER) -> int | None:
    """Connor (1987): N = (z_{1-a} sqrt(psi) + z_{power} sqrt(psi - delta^2))^2 / delta^2.

    psi = (wins + losses) / rows is the observed discordance, delta = (wins - losses) / rows
    the observed difference. None when no difference was observed.
    """
    from scipy.stats import norm

    if rows == 0 or wins == losses:
        return None
    psi, delta = (wins + losses) / rows, (wins - losses) / rows
    z_a, z_b = norm.ppf(1 - alpha), norm.ppf(power)
    n = (z_a * math.sqrt(psi) + z_b * math.sqrt(max(0.0, psi - delta * delta))) ** 2 / (delta * delta)
    return math.ceil(n)


def rows_needed_mean(diffs: Sequence[float], effect: float, alpha: float, power: float = POWER) -> int | None:
    """Paired z sample size: ((z_{1-a} + z_{power}) * sd(diffs) / effect)^2; None when effect <= 0."""
    import numpy as np
    from scipy.stats import norm

    if effect <= _EPS or len(diffs) < 2:
        return None
    sd = float(np.std(np.asarray(diffs, dtype=float), ddof=1))
    return math.ceil(((norm.ppf(1 - alpha) + norm.ppf(power)) * sd / effect) ** 2)


def _is_binary(values: Sequence[float]) -> bool:
    return all(v in (0.0, 1.0) for v in values)


def compare(
    candidate: Sequence[float | None], baseline: Sequence[float | None] | None, rules: Rules | None = None
) -> Comparison:
    """Compare per-row scores of the same rows (same order); None marks a row that failed to evaluate.

    `baseline` None means there is no version to protect (nothing in Production): the candidate
    is promoted unless one of its rows failed.
    """
    rules = rules or Rules()
    if baseline is not None and len(baseline) != len(candidate):
        raise ValueError(f"paired scores need the same rows: {len(candidate)} vs {len(baseline)}")
    pairs = list(zip(candidate, baseline if baseline is not None else [0.0] * len(candidate), strict=True))
    complete = [(float(c), float(b)) for c, b in pairs if c is not None and b is not None]
    failed = len(pairs) - len(complete)
    cs, bs = [c for c, _ in complete], [b for _, b in complete]
    diffs = [c - b for c, b in complete]
    n = len(complete)
    wins = sum(d > _EPS for d in diffs)
    losses = sum(d < -_EPS for d in diffs)
    binary = n > 0 and _is_binary(cs) and _is_binary(bs)
    base: dict[str, Any] = dict(
        mode=rules.mode,
        rows=n,
        failed_rows=failed,
        candidate_mean=_mean(cs),
        baseline_mean=None,
        difference=None,
        wins=0,
        losses=0,
        ties=0,
        ci_low=None,
        ci_high=None,
        confidence=rules.confidence,
        p_better=None,
        p_worse=None,
        rows_needed=None,
        alpha=rules.alpha,
        margin=rules.margin,
        min_rows=rules.min_rows,
        binary=binary,
    )
    if baseline is None:
        if failed:
            return Comparison(
                verdict=INCONCLUSIVE,
                reason=f"{failed} of {len(pairs)} rows failed to evaluate",
                method=NO_BASELINE,
                **base,
            )
        return Comparison(
            verdict=PROMOTE, reason="no baseline version to compare with", method=NO_BASELINE, **base
        )

    base.update(
        baseline_mean=_mean(bs), difference=_mean(diffs), wins=wins, losses=losses, ties=n - wins - losses
    )
    use_mcnemar = binary and not rules.non_inferiority and rules.margin == 0
    method = MCNEMAR if use_mcnemar else BOOTSTRAP
    if n >= 2:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # scipy's degenerate-data warnings: handled in paired_interval
            low, high = paired_interval(cs, bs, rules.confidence, rules.resamples, rules.seed)
        base.update(ci_low=low, ci_high=high)
    if binary:
        p_better, p_worse = mcnemar_exact(wins, losses)
        base.update(p_better=p_better, p_worse=p_worse)

    if failed:
        return Comparison(
            verdict=INCONCLUSIVE,
            reason=(
                f"{failed} of {len(pairs)} rows failed to evaluate (no answer or no score: the LM "
                "or the program raised); a comparison with missing rows could favour either version"
            ),
            method=method,
            **base,
        )

    needed = _rows_needed(method, rules, wins, losses, n, diffs)
    if n < rules.min_rows:
        base.update(rows_needed=max(rules.min_rows, needed or 0))
        return Comparison(
            verdict=INCONCLUSIVE,
            reason=f"only {n} rows; the gate decides on at least {rules.min_rows}",
            method=method,
            **base,
        )

    verdict, reason = _decide(method, rules, base)
    if verdict == INCONCLUSIVE:
        base.update(rows_needed=None if needed is None else max(needed, n + 1))
        if needed is None:
            reason += "; the observed difference would not decide it with more rows"
    return Comparison(verdict=verdict, reason=reason, method=method, **base)


def _decide(method: str, rules: Rules, ev: dict[str, Any]) -> tuple[str, str]:
    a = rules.alpha
    if method == MCNEMAR:
        wins, losses, p_better, p_worse = ev["wins"], ev["losses"], ev["p_better"], ev["p_worse"]
        counts = f"{wins} wins, {losses} losses"
        if wins > losses and p_better < a:
            return PROMOTE, f"better: {counts}, McNemar exact one-sided p={p_better:.4f} < {a}"
        if losses > wins and p_worse < a:
            return REFUSE, f"worse: {counts}, McNemar exact one-sided p={p_worse:.4f} < {a}"
        return (
            INCONCLUSIVE,
            f"no significant difference: {counts}, p(better)={p_better:.4f}, p(worse)={p_worse:.4f}",
        )
    low, high = ev["ci_low"], ev["ci_high"]
    if low is None or math.isnan(low) or math.isnan(high):
        return INCONCLUSIVE, "no interval: too few rows"
    interval = f"{rules.confidence:.0%} interval of the difference [{low:+.4f}, {high:+.4f}]"
    if low > rules.promote_above + _EPS:
        what = "not worse than the margin allows" if rules.non_inferiority else "better"
        return PROMOTE, f"{what}: {interval} is above {rules.promote_above:+g}"
    if high < rules.refuse_below - _EPS:
        return REFUSE, f"worse: {interval} is below {rules.refuse_below:+g}"
    return INCONCLUSIVE, f"no significant difference: {interval}"


def _rows_needed(
    method: str, rules: Rules, wins: int, losses: int, n: int, diffs: Sequence[float]
) -> int | None:
    if method == MCNEMAR:
        return rows_needed_mcnemar(wins, losses, n, rules.alpha)
    mean = _mean(diffs)
    if mean is None:
        return None
    if mean > rules.promote_above:
        return rows_needed_mean(diffs, mean - rules.promote_above, rules.alpha)
    if mean < rules.refuse_below:
        return rows_needed_mean(diffs, rules.refuse_below - mean, rules.alpha)
    return None


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None
