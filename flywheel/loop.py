"""One turn of the flywheel: export -> compile -> register -> evaluate -> gated promote.

The new version starts from the program now serving (`baseline_ref`, Production by
default), learns from every rated prediction of the model (thumbs up as they were
served, thumbs down only where a reviewer supplied the right output), and replaces
the serving version only when it is not worse on rated rows it never trained on.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import date
from typing import TYPE_CHECKING, Any

import dspy

from flywheel import registry
from flywheel.compile import Cancelled, CancelToken, CompileResult, compile_program, is_cancelled
from flywheel.errors import LoopError
from flywheel.export import CORRECTED, export_rows
from flywheel.gate import GateResult, gate

if TYPE_CHECKING:
    from flywheel.runtime import Runtime


@dataclass(frozen=True)
class LoopTurn:
    model: str
    rows_exported: int
    rows_used: int
    baseline_version: str | None
    compiled: CompileResult
    gate: GateResult

    @property
    def candidate_version(self) -> str:
        return self.compiled.version.version

    @property
    def promoted(self) -> bool:
        return self.gate.promoted_to is not None

    def summary(self) -> str:
        g = self.gate
        base = "none" if g.baseline_score is None else f"{g.baseline_score:.3f} (v{g.baseline_version})"
        verdict = f"promoted to {g.promoted_to}" if self.promoted else f"gate {g.result}, not promoted"
        return (
            f"{self.model}: v{self.candidate_version} from {self.rows_used} rated rows "
            f"(train {self.compiled.train_size}, dev {self.compiled.dev_size}); "
            f"{g.metric} {g.candidate_score:.3f} vs {base}: {verdict}"
        )


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
    margin: float = 0.0,
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
    """Run one turn and return what happened; the candidate stays registered (stage None) when refused."""
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
    compiled = compile_program(
        rows,
        program,
        model,
        optimizer=optimizer,
        optimizer_params=optimizer_params,
        metric=metric,
        dev_fraction=dev_fraction,
        seed=seed,
        lm=lm,
        tags={"parent_version": base.version, "flywheel.loop": "true"},
        progress=progress,
        cancel=cancel,
        store=store,
    )
    if is_cancelled(cancel):
        raise Cancelled("evaluate")  # the candidate stays registered, unevaluated, in stage None
    verdict = gate(
        model,
        compiled.version.version,
        compiled.dev,
        target_stage=target_stage,
        baseline_ref=baseline_ref,
        margin=margin,
        metric=gate_metric,
        lm=lm,
        store=store,
    )
    return LoopTurn(model, exported, len(rows), base.version, compiled, verdict)
