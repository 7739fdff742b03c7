"""How much reviewers agree, per label schema, from the MLflow assessments alone; and which
answer of an item counts (the export policy).

Answers. A reviewer's answer to a question is their newest valid assessment of that name on
the trace (source HUMAN, their id, role `reviewer`: `feedback.role_of`). Adjudicators' decisions
(role `adjudicator`, source id `adjudicator:<name>`) are not answers: they are the consensus where
there is one. End users' ratings (role `end_user`: `/feedback`, the workbench) are not answers
either: an end user "alice" is not the reviewer "alice", and no statistic counts end users.

Statistics, per label (`user_rating` and each `<model>:<label>` that is not free text), computed
by the libraries, never by hand:

- percent agreement: the share of items with two or more answers on which every answer is the same;
- Cohen's kappa for each reviewer pair, over the items both answered (`statsmodels.stats.
  inter_rater.cohens_kappa`, unweighted: answers are categories);
- Fleiss' kappa over the items answered by the most common number of reviewers (>= 2), since
  Fleiss' kappa needs the same number of raters per item (`statsmodels ... fleiss_kappa`);
- Krippendorff's alpha over every item, missing answers allowed (`krippendorff.alpha`): nominal for
  thumbs, pass/fail and categorical questions, interval for numeric ones;
- each reviewer against consensus: the consensus of an item, for one reviewer, is the
  adjudicator's decision when there is one, else the strict majority of the *other* reviewers'
  answers (none on a tie); the reviewer's percent agreement and Cohen's kappa with it.

A value that is undefined (one category only, too few items) is None, never a made-up number.

The export policy. `decide` picks the answer a training row is made of, trying the rules of
`EXPORT_POLICY` in order (default `adjudicated,majority,single,latest`):

- `adjudicated`: the newest adjudicator's decision;
- `majority`: more than half of the reviewers gave the same rating (two or more reviewers; end
  users never count); the row is one reviewer of that majority (the newest who gave a
  correction, else the newest);
- `single`: exactly one person (end user or reviewer) rated the item;
- `latest`: the newest rating of an end user or a reviewer (an unresolved disagreement; leave it
  out of the policy to hold such items back until they are adjudicated).

The rating, the correction and the comment of a row always come from the one source the rule chose
(the same id in the same role).
"""

from __future__ import annotations

import math
import warnings
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from itertools import combinations
from typing import TYPE_CHECKING, Any

from flywheel.config import EXPORT_RULES
from flywheel.feedback import (
    ADJUDICATOR,
    ADJUDICATOR_ROLE,
    COMMENT,
    CORRECTION,
    END_USER,
    PREFERENCE,
    RATING,
    REVIEWER,
    assessment_value,
    role_of,
)
from flywheel.tracing import model_filter

if TYPE_CHECKING:
    from flywheel.store import Store

RULES = EXPORT_RULES  # adjudicated, majority, single, latest
DEFAULT_POLICY = RULES
NOT_COMPARED = (CORRECTION, COMMENT, PREFERENCE)  # free text and objects: no agreement statistic
NOMINAL, INTERVAL = "nominal", "interval"
PAGE = 500

# label -> trace id -> reviewer -> value
Answers = dict[str, dict[str, dict[str, Any]]]


def is_adjudicator(source_id: str | None) -> bool:
    return bool(source_id) and str(source_id).startswith(ADJUDICATOR)


def _source(a: Any) -> str | None:
    return a.source.source_id if a.source is not None else None


def _human(a: Any) -> bool:
    return a.source is not None and str(a.source.source_type).endswith("HUMAN")


def newest_per_source(
    assessments: Iterable[Any], name: str, roles: Iterable[str] | None = None
) -> dict[str, Any]:
    """{source id: its newest valid HUMAN assessment `name`}, of the `roles` only when given
    (ask per role: an end user and a reviewer may share an id)."""
    wanted = set(roles) if roles is not None else None
    out: dict[str, Any] = {}
    for a in assessments:
        if a.name != name or a.valid is False or not _human(a):
            continue
        if wanted is not None and role_of(a) not in wanted:
            continue
        who = _source(a) or ""
        if who not in out or (a.create_time_ms or 0) >= (out[who].create_time_ms or 0):
            out[who] = a
    return out


# --- reading answers from MLflow ----------------------------------------------------------------


def _value(a: Any) -> Any:
    return assessment_value(a)


def answers_from_infos(
    infos: Iterable[Any],
    *,
    reviewers: Iterable[str] | None = None,
    labels: Iterable[str] | None = None,
    model: str | None = None,
) -> tuple[Answers, dict[str, dict[str, Any]]]:
    """(answers, decisions) from trace infos' assessments.

    `answers[label][trace][reviewer]` is a reviewer's newest valid answer; `decisions[label][trace]`
    the newest adjudicator's decision; end users' ratings are neither. Only `reviewers` count
    when given (a queue's); `labels` limits the questions, else `user_rating` and the model's
    own (`<model>:...`), or every name but the free-text ones when no model is given.
    """
    people = {r.strip().lower() for r in reviewers} if reviewers is not None else None
    wanted = set(labels) if labels is not None else None
    answers: Answers = {}
    decisions: dict[str, dict[str, Any]] = {}
    for info in infos:
        assessments = list(info.assessments or [])
        names = {a.name for a in assessments}
        for name in names:
            if wanted is not None:
                if name not in wanted:
                    continue
            elif name in NOT_COMPARED or (
                model is not None and name != RATING and not name.startswith(f"{model}:")
            ):
                continue
            judged = newest_per_source(assessments, name, (ADJUDICATOR_ROLE,)).values()
            if judged:
                newest = max(judged, key=lambda a: a.create_time_ms or 0)
                decisions.setdefault(name, {})[info.trace_id] = _value(newest)
            for who, a in newest_per_source(assessments, name, (REVIEWER,)).items():
                if people is None or who in people:
                    answers.setdefault(name, {}).setdefault(info.trace_id, {})[who] = _value(a)
    return answers, decisions


def reviewed_infos(store: Store, model: str, trace_ids: Iterable[str] | None = None) -> list[Any]:
    """Trace infos (with assessments, without spans) of `model` that carry a rating, or of
    `trace_ids` (a queue's items) when given."""
    tracking = store.tracking
    if trace_ids is not None:
        return [tracking.get_trace_info(t) for t in dict.fromkeys(trace_ids)]
    found: list[Any] = []
    token = None
    while True:
        infos, token = tracking.search_traces(
            locations=[store.experiment_id],
            filter_string=f"{model_filter(model)} AND feedback.`{RATING}` IS NOT NULL",
            max_results=PAGE,
            order_by=["timestamp_ms ASC"],
            page_token=token,
        )
        found.extend(infos)
        if not token or not infos:
            return found


# --- statistics --------------------------------------------------------------------------------


@dataclass(frozen=True)
class PairAgreement:
    a: str
    b: str
    items: int  # items both answered
    percent: float | None
    kappa: float | None  # Cohen's


@dataclass(frozen=True)
class ConsensusAgreement:
    reviewer: str
    answered: int
    items: int  # items this reviewer answered that have a consensus (without them)
    percent: float | None
    kappa: float | None  # Cohen's, reviewer vs consensus


@dataclass(frozen=True)
class LabelAgreement:
    label: str
    level: str  # nominal or interval (Krippendorff's alpha)
    items: int  # items with two or more answers
    reviewers: tuple[str, ...]
    percent: float | None  # share of those items on which all answers agree
    fleiss_kappa: float | None
    fleiss_items: int
    krippendorff_alpha: float | None
    pairs: tuple[PairAgreement, ...] = ()
    vs_consensus: tuple[ConsensusAgreement, ...] = ()
    disagreements: tuple[str, ...] = ()  # trace ids whose answers differ

    def pair(self, a: str, b: str) -> PairAgreement | None:
        return next((p for p in self.pairs if {p.a, p.b} == {a, b}), None)

    def reviewer(self, name: str) -> ConsensusAgreement | None:
        return next((r for r in self.vs_consensus if r.reviewer == name), None)


@dataclass(frozen=True)
class AgreementReport:
    model: str
    queue: str | None
    labels: dict[str, LabelAgreement] = field(default_factory=dict)

    def __getitem__(self, label: str) -> LabelAgreement:
        return self.labels[label]

    def to_frame(self) -> Any:
        """One row per label and reviewer pair (pair "all" holds the label's overall figures)."""
        import pandas as pd

        rows = []
        for lab in self.labels.values():
            rows.append(
                {
                    "label": lab.label,
                    "pair": "all",
                    "items": lab.items,
                    "percent": lab.percent,
                    "cohen_kappa": None,
                    "fleiss_kappa": lab.fleiss_kappa,
                    "krippendorff_alpha": lab.krippendorff_alpha,
                }
            )
            for p in lab.pairs:
                rows.append(
                    {
                        "label": lab.label,
                        "pair": f"{p.a} / {p.b}",
                        "items": p.items,
                        "percent": p.percent,
                        "cohen_kappa": p.kappa,
                        "fleiss_kappa": None,
                        "krippendorff_alpha": None,
                    }
                )
            for r in lab.vs_consensus:
                rows.append(
                    {
                        "label": lab.label,
                        "pair": f"{r.reviewer} / consensus",
                        "items": r.items,
                        "percent": r.percent,
                        "cohen_kappa": r.kappa,
                        "fleiss_kappa": None,
                        "krippendorff_alpha": None,
                    }
                )
        return pd.DataFrame(rows)


def _finite(x: Any) -> float | None:
    try:
        value = float(x)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def answer_key(value: Any) -> Any:
    """A hashable, comparable stand-in for an answer (lists and objects as JSON)."""
    if isinstance(value, (dict, list)):
        import json

        return json.dumps(value, sort_keys=True)
    return value


def cohen_kappa(first: list[Any], second: list[Any]) -> float | None:
    """Cohen's kappa of two raters' answers to the same items (statsmodels), None when undefined."""
    if len(first) != len(second) or not first:
        return None
    import numpy as np
    from statsmodels.stats.inter_rater import cohens_kappa

    cats = sorted({answer_key(v) for v in [*first, *second]}, key=repr)
    if len(cats) < 2:
        return None  # one category: chance agreement is 1, kappa is 0/0
    index = {c: i for i, c in enumerate(cats)}
    table = np.zeros((len(cats), len(cats)))
    for x, y in zip(first, second, strict=True):
        table[index[answer_key(x)], index[answer_key(y)]] += 1
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        return _finite(cohens_kappa(table, return_results=False))


def fleiss(items: list[list[Any]]) -> float | None:
    """Fleiss' kappa (statsmodels) of items each answered by the same number of raters."""
    if len(items) < 2 or len({len(i) for i in items}) != 1 or len(items[0]) < 2:
        return None
    import numpy as np
    from statsmodels.stats.inter_rater import fleiss_kappa

    cats = sorted({answer_key(v) for item in items for v in item}, key=repr)
    if len(cats) < 2:
        return None
    index = {c: i for i, c in enumerate(cats)}
    table = np.zeros((len(items), len(cats)))
    for row, item in enumerate(items):
        for v in item:
            table[row, index[answer_key(v)]] += 1
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        return _finite(fleiss_kappa(table, method="fleiss"))


def krippendorff_alpha(by_item: Mapping[str, Mapping[str, Any]], level: str = NOMINAL) -> float | None:
    """Krippendorff's alpha (the `krippendorff` package) of {item: {rater: answer}}, missing allowed."""
    import krippendorff
    import numpy as np

    raters = sorted({r for answers in by_item.values() for r in answers})
    items = sorted(by_item)
    if len(raters) < 2 or not items:
        return None
    if level == INTERVAL:
        code: dict[Any, float] = {}
    else:
        cats = sorted({answer_key(v) for a in by_item.values() for v in a.values()}, key=repr)
        code = {c: float(i) for i, c in enumerate(cats)}
    data = np.full((len(raters), len(items)), np.nan)
    for j, item in enumerate(items):
        for i, rater in enumerate(raters):
            if rater in by_item[item]:
                v = by_item[item][rater]
                data[i, j] = float(v) if level == INTERVAL else code[answer_key(v)]
    try:
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore")
            return _finite(krippendorff.alpha(reliability_data=data, level_of_measurement=level))
    except (ValueError, ZeroDivisionError):
        return None  # fewer than two values or no pairable item


def level_of(values: Iterable[Any]) -> str:
    """Interval for numeric answers (not booleans), else nominal."""
    vals = list(values)
    numeric = vals and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals)
    return INTERVAL if numeric else NOMINAL


def majority(values: Iterable[Any]) -> Any | None:
    """The answer more than half of `values` gave, else None."""
    vals = [answer_key(v) for v in values]
    if not vals:
        return None
    top, count = Counter(vals).most_common(1)[0]
    return top if count * 2 > len(vals) else None


def label_agreement(
    label: str,
    by_item: Mapping[str, Mapping[str, Any]],
    decisions: Mapping[str, Any] | None = None,
    level: str | None = None,
) -> LabelAgreement:
    """Every statistic of one label from {item: {reviewer: answer}} (and adjudicated decisions)."""
    decisions = decisions or {}
    level = level or level_of(v for a in by_item.values() for v in a.values())
    multi = {t: a for t, a in by_item.items() if len(a) >= 2}
    reviewers = tuple(sorted({r for a in by_item.values() for r in a}))
    agree = [len({answer_key(v) for v in a.values()}) == 1 for a in multi.values()]
    percent = sum(agree) / len(agree) if agree else None
    disagreements = tuple(sorted(t for t, ok in zip(multi, agree, strict=True) if not ok))

    pairs = []
    for a, b in combinations(reviewers, 2):
        shared = sorted(t for t, ans in by_item.items() if a in ans and b in ans)
        xs = [by_item[t][a] for t in shared]
        ys = [by_item[t][b] for t in shared]
        same = sum(answer_key(x) == answer_key(y) for x, y in zip(xs, ys, strict=True))
        pairs.append(
            PairAgreement(a, b, len(shared), same / len(shared) if shared else None, cohen_kappa(xs, ys))
        )

    vs = []
    for r in reviewers:
        mine, theirs = [], []
        for t, ans in by_item.items():
            if r not in ans:
                continue
            if t in decisions:
                consensus = answer_key(decisions[t])
            else:
                consensus = majority(v for who, v in ans.items() if who != r)
            if consensus is None:
                continue
            mine.append(answer_key(ans[r]))
            theirs.append(consensus)
        answered = sum(r in ans for ans in by_item.values())
        same = sum(x == y for x, y in zip(mine, theirs, strict=True))
        vs.append(
            ConsensusAgreement(
                r, answered, len(mine), same / len(mine) if mine else None, cohen_kappa(mine, theirs)
            )
        )

    counts = Counter(len(a) for a in multi.values())
    width = max(counts, key=lambda n: (counts[n], n)) if counts else 0
    fleiss_items = [list(a.values()) for a in multi.values() if len(a) == width]
    return LabelAgreement(
        label=label,
        level=level,
        items=len(multi),
        reviewers=reviewers,
        percent=percent,
        fleiss_kappa=fleiss(fleiss_items),
        fleiss_items=len(fleiss_items) if width else 0,
        krippendorff_alpha=krippendorff_alpha(multi, level) if multi else None,
        pairs=tuple(pairs),
        vs_consensus=tuple(vs),
        disagreements=disagreements,
    )


def report(
    store: Store,
    model: str,
    *,
    queue: str | None = None,
    reviewers: Iterable[str] | None = None,
    trace_ids: Iterable[str] | None = None,
    labels: Iterable[str] | None = None,
    levels: Mapping[str, str] | None = None,
) -> AgreementReport:
    """Agreement per label of `model` (of one queue's items and reviewers when given)."""
    infos = reviewed_infos(store, model, trace_ids)
    answers, decisions = answers_from_infos(infos, reviewers=reviewers, labels=labels, model=model)
    levels = levels or {}
    out = {
        name: label_agreement(name, answers[name], decisions.get(name), levels.get(name))
        for name in sorted(answers, key=lambda n: (n != RATING, n))
    }
    return AgreementReport(model, queue, out)


# --- the export policy ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Decision:
    rule: str  # one of RULES
    rating: Any  # the assessment chosen
    source: str  # whose correction and comment go with it (this id in this role)
    voters: tuple[str, ...] = ()
    role: str = REVIEWER  # feedback.END_USER, REVIEWER or ADJUDICATOR_ROLE


def decide(assessments: Iterable[Any], policy: Iterable[str] = DEFAULT_POLICY) -> Decision | None:
    """The rating a row is made of, by the first rule of `policy` that applies; None when none does."""
    assessments = list(assessments)
    judged = newest_per_source(assessments, RATING, (ADJUDICATOR_ROLE,))
    reviewers = newest_per_source(assessments, RATING, (REVIEWER,))
    users = newest_per_source(assessments, RATING, (END_USER,))
    people = [(REVIEWER, w, a) for w, a in reviewers.items()] + [(END_USER, w, a) for w, a in users.items()]
    if not judged and not people:
        return None

    def newest(pool: Mapping[str, Any]) -> tuple[str, Any]:
        return max(pool.items(), key=lambda kv: kv[1].create_time_ms or 0)

    for rule in policy:
        if rule == "adjudicated" and judged:
            who, a = newest(judged)
            return Decision(rule, a, who, (who,), ADJUDICATOR_ROLE)
        if rule == "single" and len(people) == 1:
            ((role, who, a),) = people
            return Decision(rule, a, who, (who,), role)
        if rule == "majority" and len(reviewers) >= 2:
            top = majority(assessment_value(a) for a in reviewers.values())
            if top is None:
                continue
            voters = {w: a for w, a in reviewers.items() if answer_key(assessment_value(a)) == top}
            corrected = set(newest_per_source(assessments, CORRECTION, (REVIEWER,)))
            pool = {w: a for w, a in voters.items() if w in corrected} or voters
            who, a = newest(pool)
            return Decision(rule, a, who, tuple(sorted(voters)), REVIEWER)
        if rule == "latest" and people:
            role, who, a = max(people, key=lambda p: p[2].create_time_ms or 0)
            return Decision(rule, a, who, (who,), role)
    return None
