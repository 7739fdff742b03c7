"""One step back: restore the previous Production, by hand or by a watcher that judges live traffic.

A promotion into Production tags the new version with the one it replaced and when
(`registry.PREVIOUS_TAG`, `registry.PROMOTED_AT_TAG`), so a rollback needs no guess.

Exactly once, across hosts: a rollback names the Production version it means to undo
(the watcher: the version it judged) and first takes a claim on that promotion
(`Store.claim`, unique in MLflow), so two watchers on two hosts, or a watcher and a
person clicking at the same moment, roll back once; the other gets RollbackError (409)
or, for a watcher, a verdict that says someone else acted. If Production is no longer
the judged version, nothing is done.

The watcher compares the new Production's live error rate and thumbs-down rate (its
traffic since the promotion) with the previous version's (its traffic in
WATCH_BASELINE_WINDOW before the promotion): it rolls back when the lower bound of a
one-sided (1 - WATCH_ALPHA) bootstrap interval of the difference (scipy) is above
WATCH_MARGIN. Too little traffic, or figures it cannot read, is
`inconclusive`: it never acts on zeros.
"""

from __future__ import annotations

import logging
import math
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from flywheel import registry
from flywheel.canary import LiveFigures, live_figures
from flywheel.errors import ModelNotFound, RollbackError
from flywheel.tracing import model_key

if TYPE_CHECKING:
    from flywheel.runtime import Runtime
    from flywheel.store import Store

log = logging.getLogger("flywheel.rollback")
ROLLBACK, KEEP, INCONCLUSIVE, STALE = "rollback", "keep", "inconclusive", "stale"


def rollback(
    store: Store,
    model: str,
    *,
    expected: str | None = None,
    actor: str | None = None,
    reason: str = "",
    evidence: dict[str, Any] | None = None,
) -> registry.VersionInfo:
    """Put the version the current Production replaced back into Production; returns it.

    `expected`: act only while Production is still this version (the one the caller judged).
    RollbackError (409) when there is nothing to roll back to, Production moved, or this
    promotion was already rolled back (by another host, a watcher or a second click).
    """
    try:
        current = registry.resolve(model, "Production", store)
    except ModelNotFound:
        registry.list_versions(model, store)  # an unknown model stays a 404
        raise RollbackError(f"{model} has no Production version to roll back") from None
    if expected is not None and current.version != str(expected):
        raise RollbackError(
            f"{model}: Production is version {current.version} now, not {expected}; nothing rolled back"
        )
    target = current.tags.get(registry.PREVIOUS_TAG)
    if not target:
        raise RollbackError(
            f"{model} version {current.version} has no previous Production version recorded; "
            "promote the version you want instead"
        )
    promoted_at = current.tags.get(registry.PROMOTED_AT_TAG, "0")
    if not store.claim(f"rollback/{model_key(model)}/{current.version}/{promoted_at}"):
        raise RollbackError(
            f"{model} version {current.version} was already rolled back (by another host or request)"
        )
    return registry.promote(
        model,
        target,
        "Production",
        store,
        actor=actor,
        reason=reason or f"rollback of version {current.version}",
        evidence={"rolled_back": current.version, **(evidence or {})},
        action="rollback",
    )


@dataclass(frozen=True)
class Verdict:
    """What one look at a model decided, and why (the evidence goes into the audit entry)."""

    model: str
    decision: str  # rollback, keep, inconclusive or stale
    reason: str
    judged: str | None = None  # the Production version judged
    previous: str | None = None
    evidence: dict[str, Any] = field(default_factory=dict)
    acted: bool = False  # this call rolled back (exactly one racing watcher sees True)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "decision": self.decision,
            "reason": self.reason,
            "judged": self.judged,
            "previous": self.previous,
            "evidence": self.evidence,
            "acted": self.acted,
        }


def worse_beyond(new: tuple[int, int], old: tuple[int, int], alpha: float, seed: int = 0) -> float:
    """The lower bound of a one-sided (1 - alpha) interval of new rate - old rate ((count, n) each).

    `scipy.stats.bootstrap` over the two independent 0/1 samples (percentile method: it stays
    defined when a side has no events at all), seeded so a verdict can be reproduced. The new
    version is shown worse beyond a margin when this bound exceeds it.
    """
    import numpy as np
    from scipy.stats import bootstrap

    def sample(count: int, n: int) -> Any:
        return np.r_[np.ones(count), np.zeros(n - count)]

    result = bootstrap(
        (sample(*new), sample(*old)),
        lambda a, b, axis: a.mean(axis=axis) - b.mean(axis=axis),
        confidence_level=1 - alpha,
        alternative="greater",
        method="percentile",
        n_resamples=5000,
        vectorized=True,
        random_state=seed,
    )
    low = float(result.confidence_interval.low)
    return low if math.isfinite(low) else -1.0


def judge(new: LiveFigures | None, old: LiveFigures | None, settings: Any) -> tuple[str, str, dict[str, Any]]:
    """(decision, reason, evidence) from two versions' live figures (no registry access)."""
    evidence: dict[str, Any] = {
        "new": new.to_dict() if new else None,
        "old": old.to_dict() if old else None,
        "margin": settings.watch_margin,
        "alpha": settings.watch_alpha,
    }
    need = settings.watch_min_requests
    if new is None or old is None or new.requests < need or old.requests < need:
        have = (new.requests if new else 0, old.requests if old else 0)
        return (
            INCONCLUSIVE,
            f"too little traffic to judge (new {have[0]}, previous {have[1]}; need {need})",
            evidence,
        )
    checks = [("error rate", (new.errors, new.requests), (old.errors, old.requests))]
    enough_ratings = min(new.rated, old.rated) >= settings.watch_min_ratings
    if enough_ratings:
        checks.append(("thumbs-down rate", (new.thumbs_down, new.rated), (old.thumbs_down, old.rated)))
    worse = []
    for name, a, b in checks:
        low = worse_beyond(a, b, settings.watch_alpha)
        evidence[f"{name} difference lower bound"] = round(low, 4)
        if low > settings.watch_margin:
            worse.append(
                f"{name} {a[0] / a[1]:.1%} vs {b[0] / b[1]:.1%} (worse by at least {low:.1%} "
                f"at {1 - settings.watch_alpha:.0%} confidence)"
            )
    if worse:
        return ROLLBACK, "worse than the previous version beyond the margin: " + "; ".join(worse), evidence
    if not enough_ratings:
        evidence["ratings"] = "too few to compare"
    return KEEP, "not shown worse beyond the margin", evidence


def watch_once(store: Store, model: str, *, watcher: str = "watcher") -> Verdict:
    """Judge `model`'s Production against the version it replaced; roll back when shown worse."""
    settings = store.settings
    try:
        current = registry.resolve(model, "Production", store)
    except ModelNotFound:
        return Verdict(model, INCONCLUSIVE, "no Production version")
    except Exception as exc:
        return Verdict(model, INCONCLUSIVE, f"registry not readable: {exc}")
    previous = current.tags.get(registry.PREVIOUS_TAG)
    promoted_at = current.tags.get(registry.PROMOTED_AT_TAG)
    if not previous or not promoted_at or not promoted_at.isdigit():
        return Verdict(model, INCONCLUSIVE, "no previous Production recorded", current.version)
    if current.tags.get(registry.PROMOTED_BY_TAG) == "rollback":
        return Verdict(
            model,
            KEEP,
            "Production was restored by a rollback: the watcher never rolls forward",
            current.version,
        )
    since = int(promoted_at)
    try:
        new = live_figures(store, model, version=current.version, since_ms=since).get(current.version)
        baseline_from = since - int(settings.watch_baseline_window * 1000)
        old = live_figures(store, model, version=previous, since_ms=baseline_from, until_ms=since).get(
            previous
        )
    except Exception as exc:  # never judge on figures that could not be read
        return Verdict(model, INCONCLUSIVE, f"live figures not readable: {exc}", current.version, previous)
    decision, reason, evidence = judge(new, old, settings)
    evidence["promoted_at"] = since
    if decision != ROLLBACK:
        return Verdict(model, decision, reason, current.version, previous, evidence)
    try:
        rollback(store, model, expected=current.version, actor=watcher, reason=reason, evidence=evidence)
    except RollbackError as exc:
        return Verdict(model, STALE, str(exc), current.version, previous, evidence)
    log.warning(
        "flywheel: rolled %s back from version %s to %s: %s", model, current.version, previous, reason
    )
    return Verdict(model, ROLLBACK, reason, current.version, previous, evidence, acted=True)


class Watcher:
    """A daemon thread of one runtime: every WATCH_INTERVAL, `watch_once` on every model."""

    def __init__(self, runtime: Runtime, name: str | None = None) -> None:
        import os
        import socket

        self.runtime = runtime
        self.name = name or f"watcher@{socket.gethostname()}:{os.getpid()}"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.last: dict[str, Verdict] = {}

    def start(self) -> Watcher:
        self._thread = threading.Thread(target=self._run, name="flywheel-watcher", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def look(self) -> list[Verdict]:
        """One look at every model (what the thread does each interval)."""
        store = self.runtime.store
        verdicts = []
        for info in registry.list_models(store):
            verdict = watch_once(store, info.name, watcher=self.name)
            self.last[info.name] = verdict
            verdicts.append(verdict)
        return verdicts

    def _run(self) -> None:
        while not self._stop.wait(self.runtime.settings.watch_interval):
            try:
                self.look()
            except Exception as exc:  # MLflow away: look again next interval
                log.warning("flywheel: the rollback watcher could not look: %s", exc)
