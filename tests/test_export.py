"""export_rows and its formats, as notebooks use them (no HTTP)."""

from __future__ import annotations

import csv
import io
import json

import dspy
import pytest

from flywheel import export, tracing
from flywheel.runtime import export_rows, get_runtime, predict, submit_feedback
from flywheel.store import Store

pytestmark = pytest.mark.backends("sqlite", "postgres")


def test_rows_formats_dataframe_and_examples(demo_store_rw: Store) -> None:
    answer = predict("support-router", {"ticket": "My parcel, with a comma, is late"})
    submit_feedback(
        answer.trace_id, "thumbs_down", corrected_output={"category": "shipping"}, comment='say "hi"'
    )
    rows = export_rows("support-router")
    row = next(r for r in rows if r["trace_id"] == answer.trace_id)
    meta = ["trace_id", "model_version", "rating", "comment", "decision_rule"]
    assert list(row) == ["ticket", "category", *meta]
    assert row["decision_rule"] == "single"  # one reviewer: the single-answer rule
    assert row["category"] == "shipping"
    parsed = list(csv.DictReader(io.StringIO(export.to_csv([row]))))
    assert parsed[0]["ticket"] == "My parcel, with a comma, is late" and parsed[0]["comment"] == 'say "hi"'
    assert json.loads(export.to_json([row]))[0] == row
    assert export.to_dataframe([row]).shape == (1, 7)
    (example,) = export.to_examples([row], ["ticket"])
    assert isinstance(example, dspy.Example)
    assert example.inputs().toDict() == {"ticket": row["ticket"]} and example.category == "shipping"
    assert "trace_id" not in example.toDict()
    assert export_rows("support-router", rating="thumbs_up") == [
        r for r in rows if r["rating"] == "thumbs_up"
    ]
    assert export.safe_filename("a b/c's") == "a_b_c_s"


def test_a_field_longer_than_a_trace_tag_is_exported_whole(demo_store_rw: Store) -> None:
    """MLflow cuts trace tags (4,096 characters through a tracking server; PostgreSQL's column holds
    8,000): flywheel's tag holds a marked preview, and export reads the field whole from the span."""
    ticket = "My parcel is late and nobody answers. " * 250  # 9,500 characters
    answer = predict("support-router", {"ticket": ticket})
    submit_feedback(answer.trace_id, "thumbs_up")
    row = next(r for r in export_rows("support-router") if r["trace_id"] == answer.trace_id)
    assert row["ticket"] == ticket and row["category"] == answer.result["category"]
    info = get_runtime().store.tracking.get_trace_info(answer.trace_id)
    assert info.tags[tracing.TRUNCATED_TAG] == "inputs"  # the tag holds a preview, marked as one
    stored = json.loads(info.tags[tracing.INPUTS_TAG])
    assert len(info.tags[tracing.INPUTS_TAG]) <= tracing.TAG_CHARS
    assert stored["ticket"].endswith(f"[truncated, {len(ticket)} chars]")
    assert json.loads(info.tags[tracing.OUTPUTS_TAG]) == answer.result
