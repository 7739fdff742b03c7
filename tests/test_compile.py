"""Compile on a real sqlite store: export -> split -> optimize -> one MLflow run -> a new version."""

from __future__ import annotations

import json
import random
import threading
from collections.abc import Iterator
from pathlib import Path

import dspy
import mlflow
import pytest

from flywheel import registry
from flywheel.compile import (
    Cancelled,
    CompileError,
    available_optimizers,
    compile_program,
    make_optimizer,
)
from flywheel.dataset import example_key, split_examples
from flywheel.demo.data import JOKES, ticket_splits
from flywheel.demo.seed import ROUTER_MODEL, router_program
from flywheel.demo.simulate import simulate_reviews
from flywheel.export import to_csv
from flywheel.lm import make_lm
from flywheel.runtime import export_rows, get_runtime, reset_runtime
from flywheel.scoring import make_metric
from flywheel.store import Store


@pytest.fixture
def store(fresh_store: Store) -> Iterator[Store]:
    reset_runtime()  # the runtime (outbox, LM) must follow the fresh store
    yield fresh_store
    reset_runtime()


def _router_in_production(store: Store, k: int = 2) -> registry.VersionInfo:
    info = registry.register_program(router_program(k), ROUTER_MODEL, lm=make_lm(), store=store)
    return registry.promote(ROUTER_MODEL, info.version, "Production", store)


def _examples(texts: list[str]) -> list[dspy.Example]:
    return [dspy.Example(ticket=t, category="billing").with_inputs("ticket") for t in texts]


def test_split_is_deterministic_deduplicated_and_leak_free() -> None:
    texts = [f"ticket number {i}" for i in range(40)]
    dupes = ["  TICKET   number 3 ", "ticket number 7"]  # same inputs once normalised
    examples = _examples(texts + dupes)
    split = split_examples(examples, ["ticket"], dev_fraction=0.25, seed=3)
    assert split.duplicates == 2
    assert len(split.train) + len(split.dev) == 40
    train_keys = {example_key(e, ["ticket"]) for e in split.train}
    dev_keys = {example_key(e, ["ticket"]) for e in split.dev}
    assert not train_keys & dev_keys and split.dev and split.train

    shuffled = examples[:]
    random.Random(1).shuffle(shuffled)
    again = split_examples(shuffled, ["ticket"], dev_fraction=0.25, seed=3)

    def keys(part: list[dspy.Example]) -> list[str]:
        return [example_key(e, ["ticket"]) for e in part]

    assert keys(again.train) == keys(split.train) and keys(again.dev) == keys(split.dev)  # order too
    assert split_examples(examples, ["ticket"], seed=4).dev != split.dev  # the seed matters

    # as feedback accumulates, an example never moves from dev into train
    grown = split_examples(_examples(texts + [f"new ticket {i}" for i in range(30)]), ["ticket"], seed=3)
    assert dev_keys <= {example_key(e, ["ticket"]) for e in grown.dev}


def test_split_keeps_one_example_on_each_side_of_small_sets() -> None:
    two = split_examples(_examples(["a", "b"]), ["ticket"], dev_fraction=0.9)
    assert (len(two.train), len(two.dev)) == (1, 1)
    one = split_examples(_examples(["a"]), ["ticket"])
    assert (len(one.train), len(one.dev)) == (1, 0)
    none = split_examples(_examples(["a", "b", "c"]), ["ticket"], dev_fraction=0)
    assert len(none.dev) == 0


def test_earlier_sides_are_pinned_so_the_held_out_set_only_grows() -> None:
    first = split_examples(_examples([f"ticket number {i}" for i in range(20)]), ["ticket"], seed=3)
    held_out = {example_key(e, ["ticket"]) for e in first.dev}
    trained = {example_key(e, ["ticket"]) for e in first.train}
    assert held_out == first.heldout_keys and set(first.sides) == held_out | trained
    # a later turn: more rows, another seed and fraction; earlier rows keep their side
    more = _examples([f"ticket number {i}" for i in range(40)])
    later = split_examples(more, ["ticket"], seed=99, dev_fraction=0.6, sides=first.sides)
    later_train = {example_key(e, ["ticket"]) for e in later.train}
    assert held_out <= {example_key(e, ["ticket"]) for e in later.dev} and not held_out & later_train
    assert trained <= later_train
    assert later.heldout_keys >= held_out and set(later.sides) >= set(first.sides)
    # rows held out earlier stay out of training even when this export no longer contains them
    fewer = split_examples(more[25:], ["ticket"], seed=99, sides=later.sides)
    assert later.heldout_keys <= fewer.heldout_keys
    assert not {example_key(e, ["ticket"]) for e in fewer.train} & later.heldout_keys


def test_a_compile_whose_lm_is_down_registers_nothing_and_says_why(store: Store) -> None:
    from dspy.utils.dummies import DummyLM

    from flywheel.errors import EvaluationFailed
    from flywheel.lm import RetrievalEngine

    class Down(RetrievalEngine):
        def complete(self, request: object) -> object:
            raise ConnectionError("connection refused (test)")

    production = _router_in_production(store)
    rows = [{"ticket": f"ticket number {i}", "category": "billing"} for i in range(12)]
    with pytest.raises(EvaluationFailed) as info:
        down = dspy.LM("x/down", engine=Down())
        compile_program(rows, router_program(2), ROUTER_MODEL, lm=down, progress=False, store=store)
    message = str(info.value)
    assert "'score before' failed on row 1 of" in message and "nothing was registered" in message
    assert "the LM failed" in message and "connection refused" in message
    assert [v.version for v in registry.list_versions(ROUTER_MODEL, store)] == [production.version]
    # an answer that does not parse is a wrong answer (0), not a failure: that compile registers
    garbled = DummyLM([{"category": "not a category"}] * 200)
    result = compile_program(rows, router_program(2), ROUTER_MODEL, lm=garbled, progress=False, store=store)
    assert result.score_before == 0.0 and result.version.version != production.version


def test_optimizers_take_their_own_parameters() -> None:
    assert {"LabeledFewShot", "BootstrapFewShot", "BootstrapFewShotWithRandomSearch"} <= set(
        available_optimizers()
    )
    metric, lm = make_metric("exact_match", ["category"]), make_lm()
    labeled, call = make_optimizer("LabeledFewShot", metric, lm, {"k": 3, "sample": False})
    assert labeled.k == 3 and call == {"sample": False}  # a compile() argument goes to compile()
    boot, _ = make_optimizer("BootstrapFewShot", metric, lm, {"max_bootstrapped_demos": 2})
    assert boot.max_bootstrapped_demos == 2 and boot.metric is metric
    with pytest.raises(CompileError, match="does not take nope"):
        make_optimizer("LabeledFewShot", metric, lm, {"nope": 1})
    with pytest.raises(CompileError, match="unknown optimizer 'Magic'"):
        make_optimizer("Magic", metric, lm, {})


def test_compile_from_an_export_registers_a_version_with_its_dataset_and_scores(store: Store) -> None:
    production = _router_in_production(store)
    simulate_reviews(16, seed=4)  # served through serving.predict, rated through feedback.submit
    rows = export_rows(ROUTER_MODEL)
    assert len(rows) == 16 and all(r["trace_id"] for r in rows)
    lines: list[str] = []
    result = compile_program(
        rows,
        get_runtime().load(ROUTER_MODEL, "Production").program,
        ROUTER_MODEL,
        optimizer="LabeledFewShot",
        optimizer_params={"k": 16},
        progress=lines.append,
        store=store,
    )
    assert [line.split(": ")[1] for line in lines] == [
        "split", "score before", "optimize", "score after", "log run", "register",
    ]  # fmt: skip
    version = result.version
    assert version.version == str(int(production.version) + 1) and version.stage == "None"
    assert result.train_size + result.dev_size == 16 and result.dev_size >= 1
    assert version.tags["optimizer"] == "LabeledFewShot"
    assert version.score == pytest.approx(result.score_after, abs=1e-3)
    assert version.tags["dataset"] == f"{ROUTER_MODEL}-feedback"
    assert version.tags["lineage.count"] == str(result.train_size)
    assert version.tags["lineage.sha256"] == result.lineage_hash

    run = store.client.get_run(result.run_id)
    assert run.info.experiment_id == store.experiment_id
    inputs = run.inputs.dataset_inputs
    contexts = {t.value for d in inputs for t in d.tags if t.key == "mlflow.data.context"}
    assert contexts == {"training", "validation"}
    assert {d.dataset.name for d in inputs} == {f"{ROUTER_MODEL}-feedback"}
    schema = json.loads(inputs[0].dataset.schema)["mlflow_colspec"]
    assert {c["name"] for c in schema} == {"ticket", "category", "trace_id"}
    assert run.data.metrics["dev_score_before"] == pytest.approx(result.score_before)
    assert run.data.metrics["dev_score_after"] == pytest.approx(result.score_after)
    assert run.data.params["optimizer.k"] == "16" and run.data.params["train_size"] == str(result.train_size)

    lineage = mlflow.artifacts.load_dict(f"{run.info.artifact_uri}/lineage/trace_ids.json")
    exported = {r["trace_id"] for r in rows}
    assert set(lineage["train"]) | set(lineage["dev"]) <= exported
    assert len(lineage["train"]) == result.train_size and not set(lineage["train"]) & set(lineage["dev"])
    # the registered program is the compiled one: it carries the training rows as demos
    loaded = get_runtime().load(ROUTER_MODEL, version.version).program
    assert len(loaded.predictors()[0].demos) == result.train_size


def test_compile_from_a_csv_with_a_signature_string(store: Store, tmp_path: Path) -> None:
    rows = [
        {"topic": t, "joke": j, "trace_id": f"tr-{i}", "rating": "thumbs_up"}
        for i, (t, j) in enumerate(JOKES)
    ]
    path = tmp_path / "jokes-export.csv"
    path.write_text(to_csv(rows))
    result = compile_program(
        path,
        "topic -> joke",
        "csv-jokes",
        module="ChainOfThought",
        optimizer="BootstrapFewShot",
        optimizer_params={"max_bootstrapped_demos": 2, "max_labeled_demos": 4},
        metric="f1",
        progress=False,
        store=store,
    )
    info = result.version
    assert (info.name, info.version, info.input_fields, info.output_fields) == (
        "csv-jokes", "1", ["topic"], ["joke"],
    )  # fmt: skip
    assert info.tags["dataset"] == "jokes-export" and info.tags["metric"] == "f1"
    assert result.score_after is not None and result.score_after >= result.score_before
    assert isinstance(get_runtime().load("csv-jokes", "1").program, dspy.ChainOfThought)


def test_compile_refuses_data_it_cannot_learn_from(store: Store) -> None:
    with pytest.raises(CompileError, match="no usable rows"):
        compile_program([{"topic": "cat"}], "topic -> joke", "empty", progress=False, store=store)


def test_cancel_stops_a_compile_before_anything_is_registered(store: Store) -> None:
    rows = [{"topic": t, "joke": j} for t, j in JOKES]
    stop = threading.Event()
    stop.set()
    with pytest.raises(Cancelled, match="'split'"):
        compile_program(rows, "topic -> joke", "cancelled", progress=False, cancel=stop, store=store)

    lines: list[str] = []  # cancel as soon as the optimizer runs: inside BootstrapFewShot's metric calls
    with pytest.raises(Cancelled) as raised:
        compile_program(
            rows,
            "topic -> joke",
            "cancelled",
            optimizer="BootstrapFewShot",
            progress=lines.append,
            cancel=lambda: bool(lines) and lines[-1].endswith("optimize"),
            store=store,
        )
    assert raised.value.step in ("optimize", "score after")
    with pytest.raises(registry.ModelNotFound):
        registry.list_versions("cancelled", store)
    with store.fluent():
        assert not mlflow.search_runs([store.experiment_id], output_format="list")  # no half-logged run


def test_gepa_compiles_with_reviewer_feedback_on_the_offline_lm(store: Store) -> None:
    assert "GEPA" in available_optimizers()  # gepa is a dependency of dspy>=3: never skipped
    pool, _ = ticket_splits()
    rows = [
        dict(row, trace_id=f"tr-{i}", comment=f"It is {row['category']}.") for i, row in enumerate(pool[:12])
    ]
    result = compile_program(
        rows,
        router_program(0),
        "gepa-router",
        optimizer="GEPA",
        optimizer_params={"max_metric_calls": 24},
        progress=False,
        store=store,
    )
    assert result.version.tags["optimizer"] == "GEPA" and result.score_after is not None
    assert store.client.get_run(result.run_id).data.params["optimizer.max_metric_calls"] == "24"


def test_miprov2_compiles_on_the_offline_lm(store: Store) -> None:
    assert "MIPROv2" in available_optimizers()  # optuna is a declared dependency
    pool, _ = ticket_splits()
    rows = [dict(row, trace_id=f"tr-{i}") for i, row in enumerate(pool[:16])]
    params = {
        "auto": None,
        "num_candidates": 2,
        "num_trials": 2,
        "minibatch": False,
        "max_bootstrapped_demos": 2,
        "max_labeled_demos": 4,
    }
    result = compile_program(
        rows,
        router_program(0),
        "mipro-router",
        optimizer="MIPROv2",
        optimizer_params=params,
        progress=False,
        store=store,
    )
    assert result.version.tags["optimizer"] == "MIPROv2" and result.score_after is not None
    assert store.client.get_run(result.run_id).data.params["optimizer.num_trials"] == "2"
