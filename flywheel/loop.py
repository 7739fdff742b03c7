"""One turn of the flywheel: export -> compile -> register -> evaluate -> gated promote.

The new version starts from the program now serving (`baseline_ref`, Production by
default), learns from every rated prediction of the model (thumbs up as they were
served, thumbs down only where a reviewer supplied the right output), and replaces
the serving version only when the gate finds it significantly better on the held-out
rated rows (flywheel.paired).

The held-out set grows across turns and is never trained on: each loop compile logs the
train/dev side of every row it split (compile.SIDES_ARTIFACT), the next turn reads the
newest loop version's sides and pins those rows to their side, whatever the seed or
dev_fraction now. The gate evaluates on every held-out row rated so far.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import date
from typing import TYPE_CHECKING, Any

import dspy

from flywheel import registry
from flywheel.compile import (
    HELDOUT_TAG,
    SIDES_ARTIFACT,
    Cancelled,
    CancelToken,
    CompileResult,
    compile_program,
    is_cancelled,
)
from flywheel.errors import EvaluationFailed, LoopError
from flywheel.export import CORRECTED, export_rows
from flywheel.gate import GateResult, gate
from flywheel.paired import INCONCLUSIVE

if TYPE_CHECKING:
    from flywheel.runtime import Runtime
    from flywheel.store import Store


@dataclass(frozen=True)
class LoopTurn:
    """One turn. `compiled` and `gate` are None when the compile got no answers to score (the LM
    was down): nothing was registered, Production is unchanged and the verdict is inconclusive."""

    model: str
    rows_exported: int
    rows_used: int
    baseline_version: str | None
    compiled: CompileResult | None
    gate: GateResult | None
    failure: str | None = None

    @property
    def candidate_version(self) -> str | None:
        return self.compiled.version.version if self.compiled else None

    @property
    def promoted(self) -> bool:
        return self.gate is not None and self.gate.promoted_to is not None

    @property
    def verdict(self) -> str:
        return self.gate.verdict if self.gate else INCONCLUSIVE

    @property
    def reason(self) -> str:
        return self.gate.reason if self.gate else str(self.failure)

    def summary(self) -> str:
        if self.compiled is None or self.gate is None:
            return (
                f"{self.model}: {self.verdict}, no candidate from {self.rows_used} rated rows: "
                f"{self.failure}; Production v{self.baseline_version} unchanged"
            )
        g = self.gate
        action = f"promoted to {g.promoted_to}" if self.promoted else "not promoted"
        return (
            f"{self.model}: v{self.candidate_version} from {self.rows_used} rated rows "
            f"(train {self.compiled.train_size}, held out {self.compiled.dev_size}); {g.summary()}; {action}"
        )


def heldout_sides(model: str, store: Store) -> dict[str, str]:
    """Train/dev side of every row earlier loop turns split (example key -> side), from the newest
    loop version's compile run; empty before the first turn."""
    try:
        versions = registry.list_versions(model, store)
    except registry.ModelNotFound:
        return {}
    for info in versions:  # newest first: each loop compile carried the sides of the one before
        if info.tags.get("flywheel.loop") != "true" or HELDOUT_TAG not in info.tags or not info.run_id:
            continue
        with tempfile.TemporaryDirectory(prefix="flywheel-sides-") as tmp:
            try:
                path = store.client.download_artifacts(info.run_id, SIDES_ARTIFACT, tmp)
            except Exception:  # the artifact is gone (e.g. a deleted run): try the one before
                continue
            with open(path, encoding="utf-8") as handle:
                return {str(k): str(v) for k, v in json.load(handle).items()}
    return {}


def training_rows(
    runtime: Runtime,
    model: str,
    *,
    rating: str = "any",
    start_date: date | None = None,
    end_date: date | None = None,
    limit: int | None = None,
) -> tuple[list[dict[str, Any]], int]:
    """(rows worth learning from, rows exported): a thumbs down without a correction is dropped,
    because its output is known to be wrong and the right one is unknown."""
    rows = export_rows(
        runtime,
        model,
        rating=rating,
        start_date=start_date,
        end_date=end_date,
        limit=limit,
        with_corrected=True,
    )
    usable = [r for r in rows if r["rating"] != "thumbs_down" or r[CORRECTED]]
    for row in rows:
        del row[CORRECTED]
    return usable, len(rows)


def loop(
    runtime: Runtime,
    model: str,
    *,
    optimizer: str = "LabeledFewShot",
    optimizer_params: Mapping[str, Any] | None = None,
    metric: str = "exact_match",
    gate_metric: str = "agreement",
    target_stage: str = "Production",
    baseline_ref: str = "Production",
    margin: float | None = None,
    alpha: float | None = None,
    min_rows: int | None = None,
    non_inferiority: bool | None = None,
    rating: str = "any",
    start_date: date | None = None,
    end_date: date | None = None,
    limit: int | None = None,
    dev_fraction: float = 0.25,
    seed: int = 0,
    lm: dspy.BaseLM | None = None,
    progress: bool | Callable[[str], None] | None = None,
    cancel: CancelToken = None,
) -> LoopTurn:
    """Run one turn and return what happened; the candidate stays registered (stage None) unless promoted.

    margin/alpha/min_rows/non_inferiority default to the GATE_* settings. When the compile gets
    no answer to score (the LM is down), nothing is registered and the turn is inconclusive.
    """
    store = runtime.store
    lm = lm or runtime.lm
    rows, exported = training_rows(
        runtime, model, rating=rating, start_date=start_date, end_date=end_date, limit=limit
    )
    if len(rows) < 2:
        raise LoopError(
            f"{model} has {len(rows)} usable rated prediction(s); rate at least two (thumbs up, or thumbs "
            "down with a corrected output) before running the loop"
        )
    try:
        base = registry.resolve(model, baseline_ref, store)
    except registry.ModelNotFound:
        base = registry.resolve(model, "latest", store)  # nothing serving yet: start from the newest
    program = runtime.programs.load(model, base.version).program
    try:
        compiled = compile_program(
            rows,
            program,
            model,
            optimizer=optimizer,
            optimizer_params=optimizer_params,
            metric=metric,
            dev_fraction=dev_fraction,
            seed=seed,
            sides=heldout_sides(model, store),
            lm=lm,
            tags={"parent_version": base.version, "flywheel.loop": "true"},
            progress=progress,
            cancel=cancel,
            store=store,
        )
    except EvaluationFailed as exc:
        return LoopTurn(model, exported, len(rows), base.version, None, None, str(exc))
    if is_cancelled(cancel):
        raise Cancelled("evaluate")  # the candidate stays registered, unevaluated, in stage None
    verdict = gate(
        model,
        compiled.version.version,
        compiled.dev,
        target_stage=target_stage,
        baseline_ref=baseline_ref,
        margin=margin,
        alpha=alpha,
        min_rows=min_rows,
        non_inferiority=non_inferiority,
        metric=gate_metric,
        lm=lm,
        store=store,
    )
    return LoopTurn(model, exported, len(rows), base.version, compiled, verdict)
