"""Scoring metrics without a store: exact match, token F1, the DSPy judge and GEPA's feedback."""

from __future__ import annotations

import dspy
import pytest
from dspy.utils.dummies import DummyLM

from flywheel.scoring import feedback_metric, field_exact, make_metric, token_f1


def _example(**fields: str) -> dspy.Example:
    return dspy.Example(**fields).with_inputs("ticket")


def test_metrics_compare_output_fields() -> None:
    gold = _example(ticket="refund please", category="billing")
    exact, f1 = make_metric("exact_match", ["category"]), make_metric("f1", ["category"])
    assert exact(gold, dspy.Prediction(category=" Billing ")) == 1.0  # case and spaces do not count
    assert exact(gold, dspy.Prediction(category="account")) == 0.0
    assert f1(gold, dspy.Prediction(category="billing")) == 1.0
    assert token_f1("the cat sat down", "the cat stood") == pytest.approx(
        2 * (2 / 3) * (2 / 4) / (2 / 3 + 2 / 4)
    )
    assert token_f1("", "") == 1.0 and token_f1("a", "") == 0.0
    assert field_exact({"a": "x", "b": "y"}, {"a": "x", "b": "z"}, ["a", "b"]) == 0.0
    with pytest.raises(ValueError, match="unknown metric"):
        make_metric("bleu", ["category"])


def test_judge_metric_asks_a_dspy_judge_on_the_ambient_lm() -> None:
    judged = make_metric("judge", ["category"])
    gold = _example(ticket="refund please", category="billing")
    with dspy.context(lm=DummyLM([{"acceptable": "True"}, {"acceptable": "False"}])):
        assert judged(gold, dspy.Prediction(category="billing")) == 1.0
        assert judged(gold, dspy.Prediction(category="shipping")) == 0.0


def test_gepa_feedback_carries_the_expected_answer_and_the_reviewers_comment() -> None:
    from flywheel.dataset import example_key

    gold = _example(ticket="where is my parcel", category="shipping")
    comments = {example_key(gold, ["ticket"]): "Parcels are always shipping."}
    metric = feedback_metric(make_metric("exact_match", ["category"]), ["category"], comments, ["ticket"])
    wrong = metric(gold, dspy.Prediction(category="billing"), None, "predict", None)
    assert wrong.score == 0.0
    assert "expected category='shipping', got 'billing'" in wrong.feedback
    assert "Reviewer comment: Parcels are always shipping." in wrong.feedback
    right = metric(gold, dspy.Prediction(category="shipping"))
    assert right.score == 1.0 and right.feedback.startswith("Correct.")
