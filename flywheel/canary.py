"""Traffic after promotion: the canary share, shadow runs, and per-version live figures.

The plan lives on the registered model as tags (`flywheel.canary`: `{"ref": ..., "share": ...}`,
`flywheel.shadow`: a reference), so every host reads the same plan; each runtime
remembers it for FLYWHEEL_RESOLVE_TTL seconds (`TrafficPlans`), and a change made in
this process is seen at once (`registry.generation`).

Routing applies only to requests that name no version, stage or alias: an explicit
reference is served as asked. A request with a routing key (`user_id` or `routing_key`)
is routed by a hash of the model and the key, so the same key gets the same version
for as long as the share stays (raising the share only moves more keys to the
candidate, never back); a request without one is split at random.

Live figures are read from the traces and their assessments (never from counters a
host keeps): requests, error rate, p50/p99 latency and the thumbs-up rate with its
Wilson interval, per version. Shadow traces do not carry the model key tag, so they
never enter these figures, the export, the review queue or the gate.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from flywheel import host_reads, registry
from flywheel.errors import InputError
from flywheel.feedback import RATING, assessment_value
from flywheel.tracing import model_filter

if TYPE_CHECKING:
    from flywheel.runtime import Runtime
    from flywheel.store import Store

CANARY_TAG = "flywheel.canary"
SHADOW_TAG = "flywheel.shadow"
STABLE, CANARY, EXPLICIT, SHADOW = "stable", "canary", "explicit", "shadow"
PAGE = 5000  # local SQL stores; a tracking server answers at most REST_PAGE per request
REST_PAGE = 500
MAX_TRACES = 200_000  # live figures read at most this many traces per call
log = logging.getLogger("flywheel.canary")


@dataclass(frozen=True)
class TrafficPlan:
    """Where a model's unpinned traffic goes: `share` of it to `canary_ref`, and a shadow copy."""

    canary_ref: str | None = None
    share: float = 0.0
    shadow_ref: str | None = None

    @classmethod
    def from_tags(cls, tags: dict[str, str]) -> TrafficPlan:
        """Read leniently: a tag another writer mangled means no canary, never a failed request."""
        ref, share = None, 0.0
        try:
            canary = json.loads(tags.get(CANARY_TAG) or "{}")
            ref = str(canary["ref"]) if canary.get("ref") else None
            share = float(canary.get("share", 0.0))
        except (ValueError, TypeError, AttributeError, KeyError):
            ref, share = None, 0.0
        if not math.isfinite(share) or not 0.0 <= share <= 1.0:
            share = 0.0
        return cls(ref, share if ref else 0.0, tags.get(SHADOW_TAG) or None)

    def to_dict(self) -> dict[str, Any]:
        return {"canary": self.canary_ref, "share": self.share, "shadow": self.shadow_ref}


def key_point(model: str, key: str) -> float:
    """A key's fixed point in [0, 1): the same key always lands on the same side of any share."""
    digest = hashlib.sha256(f"{model}\0{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def choose(plan: TrafficPlan, model: str, key: str | None) -> str:
    """STABLE or CANARY for one unpinned request (sticky by key; random without one)."""
    if not plan.canary_ref or plan.share <= 0.0:
        return STABLE
    point = key_point(model, key) if key else random.random()
    return CANARY if point < plan.share else STABLE


class TrafficPlans:
    """A runtime's view of every model's plan: one registry read per model per resolve TTL.

    Stale-while-revalidate: once a model's plan has been read, a request never waits for
    the registry again (an outage would otherwise stall every request for MLflow's timeout);
    a stale plan is served while one background read refreshes it. A change made in this
    process (`registry.generation`) is read at once, and the very first read of a model
    waits for it (`apredict` runs that in a thread, off the event loop).
    """

    def __init__(self, store: Store, ttl: float) -> None:
        self.store = store
        self.ttl = ttl
        self._lock = threading.Lock()
        self._seen: dict[str, tuple[float, int, TrafficPlan]] = {}
        self._refreshing: set[str] = set()
        self.host = host_reads.for_store(store)

    def peek(self, model: str) -> TrafficPlan | None:
        """The plan without waiting: fresh or stale (refreshed in the background); None when this
        runtime never read it or this process changed it since (call `get`, in a thread)."""
        with self._lock:
            seen = self._seen.get(model)
        if seen is None or seen[1] != registry.generation(self.store, model):
            return None
        if time.monotonic() - seen[0] >= self.ttl:
            self._refresh_in_background(model)
        return seen[2]

    def get(self, model: str, *, shared: bool = False) -> TrafficPlan:
        """The plan, read now (the last one read when the registry does not answer; none if never);
        `shared` (a renewal): the answer another process of this host read less than half a TTL
        ago will do (host_reads), dated when it was read."""
        generation = registry.generation(self.store, model)
        with self._lock:
            seen = self._seen.get(model)
        at = time.monotonic()
        try:
            if shared and seen is not None and seen[1] == generation:
                tags, wall = self.host.read(
                    f"tags\0{model}", self.ttl / 2, lambda: registry.model_tags(model, self.store)
                )
                at = host_reads.monotonic_at(wall)
            else:
                tags = registry.model_tags(model, self.store)
            plan = TrafficPlan.from_tags(tags)
        except Exception as exc:  # unknown model (serving says so) or MLflow down: no routing
            log.debug("no traffic plan for %s: %s", model, exc)
            plan = seen[2] if seen is not None else TrafficPlan()
        with self._lock:
            self._seen[model] = (at, generation, plan)
        return plan

    def _refresh_in_background(self, model: str) -> None:
        with self._lock:
            if model in self._refreshing:
                return
            self._refreshing.add(model)

        def refresh() -> None:
            try:
                self.get(model, shared=True)
            finally:
                with self._lock:
                    self._refreshing.discard(model)

        threading.Thread(target=refresh, name="flywheel-traffic-plan", daemon=True).start()


def _actor_reason(actor: str | None, reason: str) -> dict[str, Any]:
    return {"actor": actor, "reason": reason}


def set_canary(
    store: Store, model: str, ref: str | None, share: float, *, actor: str | None = None, reason: str = ""
) -> TrafficPlan:
    """Send `share` (0..1) of the unpinned traffic to `ref`; share 0 or no ref ends the canary.

    The reference must resolve now (a typo would otherwise silently serve nothing);
    the change is audited with the version the reference named at that moment.
    """
    if not isinstance(share, int | float) or not math.isfinite(share) or not 0.0 <= share <= 1.0:
        raise InputError(f"share must be a number from 0 to 1, not {share!r}")
    value = None
    version = None
    if ref and share > 0:
        version = registry.resolve(model, ref, store).version
        value = json.dumps({"ref": ref, "share": share})
    registry.set_model_tag(
        model,
        CANARY_TAG,
        value,
        store,
        action="canary",
        evidence={"ref": ref, "share": share, "resolves_to": version},
        **_actor_reason(actor, reason),
    )
    return plan_of(store, model)


def set_shadow(
    store: Store, model: str, ref: str | None, *, actor: str | None = None, reason: str = ""
) -> TrafficPlan:
    """Run `ref` beside Production on the same inputs (its answer never returned); None stops it."""
    version = registry.resolve(model, ref, store).version if ref else None
    registry.set_model_tag(
        model,
        SHADOW_TAG,
        ref or None,
        store,
        action="shadow",
        evidence={"ref": ref, "resolves_to": version},
        **_actor_reason(actor, reason),
    )
    return plan_of(store, model)


def plan_of(store: Store, model: str) -> TrafficPlan:
    """The plan as the registry holds it now (no cache)."""
    return TrafficPlan.from_tags(registry.model_tags(model, store))


# --- live figures ------------------------------------------------------------------------


@dataclass(frozen=True)
class LiveFigures:
    """One version's live traffic: what the watcher and the models dashboard judge it by."""

    version: str
    requests: int
    errors: int
    p50_ms: float | None
    p99_ms: float | None
    thumbs_up: int
    thumbs_down: int

    @property
    def rated(self) -> int:
        return self.thumbs_up + self.thumbs_down

    @property
    def error_rate(self) -> float | None:
        return self.errors / self.requests if self.requests else None

    @property
    def up_rate(self) -> float | None:
        return self.thumbs_up / self.rated if self.rated else None

    @property
    def down_rate(self) -> float | None:
        return self.thumbs_down / self.rated if self.rated else None

    def up_interval(self, alpha: float = 0.05) -> tuple[float, float] | None:
        """Wilson interval of the thumbs-up rate (scipy), None without ratings."""
        if not self.rated:
            return None
        from scipy.stats import binomtest

        ci = binomtest(self.thumbs_up, self.rated).proportion_ci(1 - alpha, method="wilson")
        return float(ci.low), float(ci.high)

    def to_dict(self) -> dict[str, Any]:
        interval = self.up_interval()
        return {
            "version": self.version,
            "requests": self.requests,
            "errors": self.errors,
            "error_rate": self.error_rate,
            "p50_ms": self.p50_ms,
            "p99_ms": self.p99_ms,
            "thumbs_up": self.thumbs_up,
            "thumbs_down": self.thumbs_down,
            "thumbs_up_rate": self.up_rate,
            "thumbs_up_interval": list(interval) if interval else None,
        }


def _rating(info: Any) -> str | None:
    valid = [a for a in info.assessments or [] if a.name == RATING and a.valid is not False]
    newest = max(valid, key=lambda a: a.create_time_ms or 0, default=None)
    value = assessment_value(newest) if newest is not None else None
    return value if value in ("thumbs_up", "thumbs_down") else None


def live_figures(
    store: Store,
    model: str,
    *,
    version: str | None = None,
    since_ms: int | None = None,
    until_ms: int | None = None,
) -> dict[str, LiveFigures]:
    """version -> LiveFigures from the model's traces in [since_ms, until_ms) (all when None).

    Raises what MLflow raises: a caller that cannot read the figures must say so
    (the watcher reports `inconclusive`), never judge on zeros.
    """
    import numpy as np

    from flywheel.trace_sql import supports

    page = PAGE if supports(store.tracking) else REST_PAGE
    flt = model_filter(model, version)
    if since_ms is not None:
        flt += f" AND trace.timestamp_ms >= {int(since_ms)}"
    if until_ms is not None:
        flt += f" AND trace.timestamp_ms < {int(until_ms)}"
    durations: dict[str, list[float]] = {}
    counts: dict[str, list[int]] = {}  # errors, up, down
    token = None
    read = 0
    while read < MAX_TRACES:
        infos, token = store.tracking.search_traces(
            locations=[store.experiment_id], filter_string=flt, max_results=page, page_token=token
        )
        for info in infos:
            tags = info.tags or {}
            v = tags.get("flywheel.model_version", "")
            durations.setdefault(v, []).append(float(info.execution_duration or 0))
            c = counts.setdefault(v, [0, 0, 0])
            c[0] += str(getattr(info.state, "value", info.state)) == "ERROR"
            rating = _rating(info)
            c[1] += rating == "thumbs_up"
            c[2] += rating == "thumbs_down"
        read += len(infos)
        if not token or not infos:
            break
    figures = {}
    for v, times in durations.items():
        errors, up, down = counts[v]
        p50, p99 = np.percentile(times, [50, 99]) if times else (None, None)
        figures[v] = LiveFigures(
            v,
            len(times),
            errors,
            None if p50 is None else round(float(p50), 2),
            None if p99 is None else round(float(p99), 2),
            up,
            down,
        )
    return figures


def live_report(runtime: Runtime, model: str, since_ms: int | None = None) -> dict[str, Any]:
    """What /models/{name}/live answers: the plan and every version's live figures."""
    runtime.outbox.deliver_available(max_batches=20)  # this host's own recent traces count too
    figures = live_figures(runtime.store, model, since_ms=since_ms)
    plan = plan_of(runtime.store, model)
    ordered = sorted(figures.values(), key=lambda f: int(f.version) if f.version.isdigit() else 0)
    return {"model": model, "plan": plan.to_dict(), "versions": [f.to_dict() for f in ordered]}


# --- pairs for the A/B review of a shadow ----------------------------------------------------


@dataclass(frozen=True)
class ShadowPair:
    """A = the answer served (Production), B = the shadow's answer on the same inputs."""

    inputs: dict[str, Any]
    a_trace: str
    a_version: str
    a_outputs: dict[str, Any]
    b_trace: str
    b_version: str
    b_outputs: dict[str, Any]


def shadow_pairs(
    runtime: Runtime, model: str, reviewer: str | None = None, limit: int = 20
) -> list[ShadowPair]:
    """Shadow traces (oldest first) with their answered trace, that `reviewer` has not compared yet.

    Failed shadow runs are left out (there is no answer to prefer); so is a pair whose answered
    trace is not in MLflow (yet).
    """
    from flywheel.feedback import PREFERENCE
    from flywheel.tracing import served_call, shadow_filter

    runtime.outbox.deliver_available(max_batches=20)
    tracking = runtime.store.tracking
    infos, _ = tracking.search_traces(
        locations=[runtime.store.experiment_id],
        filter_string=f"{shadow_filter(model)} AND trace.status = 'OK'",
        max_results=500,
        order_by=["timestamp_ms ASC"],
    )
    pairs = []
    for info in infos:
        done = [
            a
            for a in info.assessments or []
            if a.name == PREFERENCE
            and a.valid is not False
            and (reviewer is None or (a.source is not None and a.source.source_id == reviewer))
        ]
        if done:
            continue
        try:
            answered = tracking.get_trace_info(info.tags["flywheel.shadow_of"])
        except Exception:
            continue
        a, b = served_call(answered), served_call(info)
        if a is None or b is None:
            continue
        pairs.append(
            ShadowPair(b.inputs, answered.trace_id, a.version, a.outputs, info.trace_id, b.version, b.outputs)
        )
        if len(pairs) >= limit:
            break
    return pairs
