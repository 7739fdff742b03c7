"""The audit trail on a real sqlite MLflow store: every registry move is an MLflow run and a version tag."""

from __future__ import annotations

import json

import dspy
import pytest

from flywheel import audit, canary, registry
from flywheel.store import Store

NAME = 'it\'s "quoted"'  # user text never enters a filter string: the model is found by a hash


@pytest.fixture(scope="module")
def store(module_store: Store) -> Store:
    for answer in ("a", "b"):
        program = dspy.Predict("question -> answer")
        program.demos = [dspy.Example(question="q", answer=answer)]
        registry.register_program(program, NAME, store=module_store)
    return module_store


def test_promotions_alias_moves_and_canary_changes_are_entries(store: Store) -> None:
    registry.promote(NAME, "1", "Production", store, actor="ann", reason="first", evidence={"run": "r1"})
    registry.promote(NAME, "2", "Production", store, actor="bo", reason="won the gate")
    registry.set_alias(NAME, "canary", "1", store, actor="cy", reason="try again")
    canary.set_canary(store, NAME, "canary", 0.25, actor="cy", reason="quarter")
    entries = audit.timeline(store, NAME)
    assert [e.action for e in entries[:4]] == ["canary", "alias", "promote", "promote"]  # newest first
    second, first = entries[2], entries[3]
    assert (first.actor, first.reason, first.version) == ("ann", "first", "1")
    assert first.evidence["run"] == "r1" and first.evidence["previous"] is None
    assert (second.actor, second.version, second.evidence["previous"]) == ("bo", "2", "1")
    assert entries[1].evidence == {"alias": "canary", "previous": None}
    assert entries[0].evidence["share"] == 0.25 and entries[0].evidence["resolves_to"] == "1"
    assert all(a.at_ms >= b.at_ms for a, b in zip(entries, entries[1:], strict=False))
    # each entry is a finished MLflow run in the audit experiment
    run = store.client.get_run(second.run_id)
    assert run.info.experiment_id == audit.experiment_id(store) and run.info.status == "FINISHED"
    assert run.data.tags["flywheel.audit.reason"] == "won the gate"
    # and the registry version carries it, so the version itself says what happened to it
    tags = registry.get_version(NAME, "2", store).tags
    key = next(k for k in tags if k.startswith("flywheel.audit.") and k.endswith(".promote"))
    assert json.loads(tags[key])["actor"] == "bo" and json.loads(tags[key])["run_id"] == second.run_id
    assert tags[registry.PREVIOUS_TAG] == "1" and tags[registry.PROMOTED_AT_TAG].isdigit()


def test_a_model_timeline_holds_only_its_own_entries(store: Store) -> None:
    audit.record(store, "another model", "promote", "1", actor="x")
    assert all(e.model == NAME for e in audit.timeline(store, NAME))
    assert [e.actor for e in audit.timeline(store, "another model")] == ["x"]


def test_long_evidence_is_cut_to_what_every_backend_holds(store: Store) -> None:
    entry = audit.record(store, NAME, "canary", None, reason="r" * 10_000, evidence={"big": "x" * 20_000})
    assert len(entry.tag_value()) <= audit.TAG_CHARS and len(entry.reason) <= audit.TAG_CHARS
    shown = next(e for e in audit.timeline(store, NAME) if e.run_id == entry.run_id)
    assert "truncated" in shown.evidence  # cut JSON is shown as such, never lost silently
