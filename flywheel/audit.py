"""The audit trail: who moved what in the registry, when, why, and on what evidence.

Every promotion, rollback, alias move and traffic-plan change (canary, shadow) is one
entry; so is an alias move flywheel finds made outside it (`moved-outside`), a version a host
refused to load (`refused-load`) and a version a person adopted (`trust`). An entry is an
MLflow run in the experiment `<FLYWHEEL_EXPERIMENT>-audit`, so it
is durable, shared by every host and browsable in the MLflow UI; the registry also
tags the version it concerns (`registry._tag_audit`), so the version itself says what
happened to it. The models dashboard draws `timeline(...)` from the runs.

Values are kept small on purpose: a run tag holds at most TAG_CHARS, and evidence
(run ids, intervals, figures) is JSON that a person can read in the UI.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from flywheel.store import Store

ACTIONS = (
    "promote",
    "rollback",
    "alias",
    "canary",
    "shadow",
    "model-tag",
    "moved-outside",  # an alias or stage found moved by something other than flywheel
    "refused-load",  # a host refused to load a version flywheel did not register, or whose files changed
    "trust",  # a person adopted a version after inspecting it (`flywheel trust`)
)
TAG_CHARS = 4800  # below MLflow's 5,000 for model version tags and 8,000 for run tags
SYSTEM = "system"
_MODEL_KEY = "flywheel.audit.model_key"
_PREFIX = "flywheel.audit."


def now_ms() -> int:
    return int(time.time() * 1000)


def model_key(model: str) -> str:
    # a hash: user text never enters an MLflow filter string (its syntax cannot escape quotes)
    return hashlib.sha256(model.encode()).hexdigest()[:24]


def _json(value: Any, limit: int = TAG_CHARS) -> str:
    text = json.dumps(value, default=str, ensure_ascii=False, sort_keys=True)
    return text if len(text) <= limit else text[: limit - 1] + "…"


@dataclass(frozen=True)
class AuditEntry:
    at_ms: int
    model: str
    action: str
    version: str | None
    actor: str
    reason: str
    evidence: dict[str, Any] = field(default_factory=dict)
    run_id: str | None = None

    @property
    def tag_key(self) -> str:
        """The registry version tag this entry is kept under (time first: tags sort by time)."""
        return f"{_PREFIX}{self.at_ms}.{self.action}"

    def tag_value(self) -> str:
        return _json(
            {"actor": self.actor, "reason": self.reason, "evidence": self.evidence, "run_id": self.run_id}
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "at_ms": self.at_ms,
            "model": self.model,
            "action": self.action,
            "version": self.version,
            "actor": self.actor,
            "reason": self.reason,
            "evidence": self.evidence,
            "run_id": self.run_id,
        }


def experiment_id(store: Store) -> str:
    from flywheel.store import ensure_experiment

    return ensure_experiment(store.settings, f"{store.settings.flywheel_experiment}-audit")


def record(
    store: Store,
    model: str,
    action: str,
    version: str | None,
    *,
    actor: str | None = None,
    reason: str = "",
    evidence: Mapping[str, Any] | None = None,
) -> AuditEntry:
    """Write one entry as a finished MLflow run and return it (with its run id)."""
    entry = AuditEntry(
        now_ms(), model, action, version, (actor or SYSTEM)[:200], reason[:TAG_CHARS], dict(evidence or {})
    )
    tags = {
        _MODEL_KEY: model_key(model),
        f"{_PREFIX}model": model[:TAG_CHARS],
        f"{_PREFIX}action": action,
        f"{_PREFIX}version": version or "",
        f"{_PREFIX}actor": entry.actor,
        f"{_PREFIX}reason": entry.reason,
        f"{_PREFIX}evidence": _json(entry.evidence),
        "mlflow.runName": f"{action} {model}" + (f" v{version}" if version else ""),
        "mlflow.user": entry.actor,
    }
    client = store.client
    run = client.create_run(experiment_id(store), start_time=entry.at_ms, tags=tags)
    client.set_terminated(run.info.run_id, "FINISHED", end_time=entry.at_ms)
    return AuditEntry(**{**entry.__dict__, "run_id": run.info.run_id})


def timeline(store: Store, model: str, limit: int = 200) -> list[AuditEntry]:
    """The model's entries, newest first (read from the runs: complete even if a tag was cut)."""
    runs = store.client.search_runs(
        [experiment_id(store)],
        filter_string=f"tags.`{_MODEL_KEY}` = '{model_key(model)}'",
        max_results=limit,
        order_by=["attributes.start_time DESC"],
    )
    entries = []
    for run in runs:
        tags = run.data.tags
        try:
            evidence = json.loads(tags.get(f"{_PREFIX}evidence") or "{}")
        except ValueError:  # cut at TAG_CHARS
            evidence = {"truncated": tags.get(f"{_PREFIX}evidence")}
        entries.append(
            AuditEntry(
                int(run.info.start_time or 0),
                tags.get(f"{_PREFIX}model", model),
                tags.get(f"{_PREFIX}action", ""),
                tags.get(f"{_PREFIX}version") or None,
                tags.get(f"{_PREFIX}actor", SYSTEM),
                tags.get(f"{_PREFIX}reason", ""),
                evidence if isinstance(evidence, dict) else {"value": evidence},
                run.info.run_id,
            )
        )
    return entries
