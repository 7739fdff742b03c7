"""Compile a DSPy program on rated feedback, log the run to MLflow and register the result.

Everything an optimizer needs to run offline comes from here: a deduplicated,
seeded train/dev split, a metric, the configured LM (through `dspy.context`,
never global settings), progress and cancellation between steps.
"""

from __future__ import annotations

import hashlib
import inspect
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import dspy
import mlflow

from flywheel import registry
from flywheel.dataset import TrainingData, TrainingSet, prepare
from flywheel.errors import Cancelled, CompileError, EvaluationFailed
from flywheel.lm import configured_lm, with_cache
from flywheel.programs import program_fields
from flywheel.scoring import Metric, describe_failure, feedback_metric, lm_failure, make_metric, score
from flywheel.store import Store, connect

OPTIMIZERS = ("LabeledFewShot", "BootstrapFewShot", "BootstrapFewShotWithRandomSearch", "MIPROv2", "GEPA")
MODULES = {"Predict": dspy.Predict, "ChainOfThought": dspy.ChainOfThought}
_NEEDS = {"MIPROv2": "optuna", "GEPA": "gepa"}  # optional packages DSPy imports only when used
_BUDGETED = ("MIPROv2", "GEPA")  # refuse to run without a budget; "light" is their cheapest
STEPS = ("split", "score before", "optimize", "score after", "log run", "register")
SIDES_ARTIFACT = "split/sides.json"  # example key -> train/dev, this split and every earlier one it continued
HELDOUT_TAG = "heldout.size"  # on a version whose run holds SIDES_ARTIFACT: rows held out so far

CancelToken = threading.Event | Callable[[], bool] | None


def available_optimizers() -> list[str]:
    """The optimizers this installation can run (MIPROv2 needs optuna, GEPA the gepa package)."""
    from importlib.util import find_spec

    return [
        n for n in OPTIMIZERS if hasattr(dspy, n) and (n not in _NEEDS or find_spec(_NEEDS[n]) is not None)
    ]


# --- progress and cancellation ------------------------------------------------------------


def is_cancelled(cancel: CancelToken) -> bool:
    return cancel is not None and (cancel.is_set() if isinstance(cancel, threading.Event) else bool(cancel()))


class Progress:
    """tqdm in a notebook kernel, log lines through `report` elsewhere; checks `cancel` on every call."""

    def __init__(self, title: str, report: bool | Callable[[str], None] | None, cancel: CancelToken) -> None:
        import logging
        import sys

        self.cancel, self.calls, self.step_name = cancel, 0, STEPS[0]
        self.bar: Any = None
        self.report: Callable[[str], None] | None = None
        if callable(report):
            self.report = report
        elif report is None and "ipykernel" in sys.modules:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=len(STEPS), desc=title, leave=True)
        elif report is not False:
            self.report = logging.getLogger("flywheel.compile").info
        self.title = title

    def cancelled(self) -> bool:
        return is_cancelled(self.cancel)

    def step(self, name: str) -> None:
        if self.cancelled():
            raise Cancelled(name)
        if self.bar is not None:
            self.bar.set_postfix_str(name)
            self.bar.update(0 if name == STEPS[0] else 1)
        elif self.report:
            self.report(f"{self.title}: {name}")
        self.step_name = name

    def tick(self) -> None:
        """One metric call inside an optimizer or a scoring pass: where long compiles are stopped."""
        if self.cancelled():
            raise Cancelled(self.step_name)
        self.calls += 1
        if self.bar is not None and self.calls % 10 == 0:
            self.bar.set_postfix_str(f"{self.step_name} ({self.calls} metric calls)")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.update(self.bar.total - self.bar.n)
            self.bar.close()


# --- optimizers ---------------------------------------------------------------------------


def _counted(metric: Metric, progress: Progress) -> Metric:
    def counted(*args: Any, **kwargs: Any) -> Any:
        progress.tick()
        return metric(*args, **kwargs)

    return counted


def make_optimizer(
    name: str, metric: Metric, lm: dspy.BaseLM, params: Mapping[str, Any]
) -> tuple[Any, dict[str, Any]]:
    """(teleprompter, compile kwargs): each parameter goes where the optimizer accepts it."""
    if name not in available_optimizers():
        if name in _NEEDS:
            raise CompileError(
                f"{name} needs the optional package {_NEEDS[name]} (pip install {_NEEDS[name]})"
            )
        raise CompileError(f"unknown optimizer {name!r}; available: {', '.join(available_optimizers())}")
    cls = getattr(dspy, name)
    init_names = set(inspect.signature(cls.__init__).parameters) - {"self"}
    compile_names = set(inspect.signature(cls.compile).parameters) - {"self", "student", "trainset"}
    init = {k: v for k, v in params.items() if k in init_names}
    call = {k: v for k, v in params.items() if k in compile_names and k not in init_names}
    unknown = sorted(set(params) - set(init) - set(call))
    if unknown:
        valid = ", ".join(sorted((init_names | compile_names) - {"metric", "teacher", "valset"}))
        raise CompileError(f"{name} does not take {', '.join(unknown)}; it takes: {valid}")
    if "metric" in init_names:
        init["metric"] = metric
    if name == "MIPROv2":
        init = {"prompt_model": lm, "task_model": lm, **init}
    if name == "GEPA":
        init = {"reflection_lm": lm, **init}
    if name in _BUDGETED and not {"auto", "max_full_evals", "max_metric_calls", "num_candidates"} & set(init):
        init["auto"] = "light"
    return cls(**init), call


# --- compile ------------------------------------------------------------------------------


@dataclass(frozen=True)
class CompileResult:
    version: registry.VersionInfo
    program: dspy.Module = field(repr=False)
    optimizer: str
    metric: str
    score_before: float | None
    score_after: float | None
    data: TrainingSet = field(repr=False)
    dataset: str
    seconds: float

    @property
    def run_id(self) -> str:
        return self.version.run_id or ""

    @property
    def train_size(self) -> int:
        return len(self.data.split.train)

    @property
    def dev_size(self) -> int:
        return len(self.data.split.dev)

    @property
    def duplicates_removed(self) -> int:
        return self.data.split.duplicates

    @property
    def dev(self) -> list[dspy.Example]:
        """Rated rows the new version never trained on (and, with `sides`, no earlier turn either):
        the gate evaluates on these."""
        return self.data.split.dev

    @property
    def sides(self) -> dict[str, str]:
        """Example key -> train/dev for every row split so far: pass it to the next compile."""
        return self.data.split.sides

    @property
    def lineage_count(self) -> int:
        return len(self.data.trace_ids("train"))

    @property
    def lineage_hash(self) -> str:
        return hashlib.sha256("\n".join(self.data.trace_ids("train")).encode()).hexdigest()


def build_program(program: dspy.Module | str, module: str = "Predict") -> dspy.Module:
    """A copy of `program`, or a fresh module for a signature string such as "topic -> joke"."""
    if isinstance(program, str):
        if module not in MODULES:
            raise CompileError(f"unknown module {module!r}; use one of {', '.join(MODULES)}")
        return MODULES[module](program)
    return program.deepcopy()


def compile_program(
    data: TrainingData,
    program: dspy.Module | str,
    name: str,
    *,
    optimizer: str = "LabeledFewShot",
    optimizer_params: Mapping[str, Any] | None = None,
    metric: str | Metric = "exact_match",
    module: str = "Predict",
    dev_fraction: float = 0.25,
    seed: int = 0,
    sides: Mapping[str, str] | None = None,
    lm: dspy.BaseLM | None = None,
    dataset_name: str | None = None,
    description: str | None = None,
    tags: Mapping[str, str] | None = None,
    progress: bool | Callable[[str], None] | None = None,
    cancel: CancelToken = None,
    store: Store | None = None,
) -> CompileResult:
    """Split, score, optimize, score again, then log one MLflow run and register a new version (stage None).

    `progress`: None shows a tqdm bar in a notebook and log lines elsewhere, False is silent,
    a function receives the lines. `cancel` (an Event or a function) is checked between steps
    and on every metric call; Cancelled is raised and nothing is registered.

    `sides` (a previous CompileResult.sides, or what the loop read from the last turn) keeps
    every earlier dev row out of training, whatever the seed or fraction now. When a dev row
    gets no answer to score (the LM is down, the program raised), EvaluationFailed is raised
    and nothing is registered; an unparseable answer is a wrong one (0), not a failure.
    """
    started = time.monotonic()
    store = store or connect()
    lm = with_cache(lm or configured_lm(store.settings), store.settings.lm_cache_compile)
    student = build_program(program, module)
    inputs, outputs = program_fields(student)
    params = dict(optimizer_params or {})
    steps = Progress(f"compile {name} ({optimizer})", progress, cancel)
    try:
        steps.step("split")
        prepared = prepare(data, inputs, outputs, dev_fraction, seed, sides)
        train, dev = prepared.split.train, prepared.split.dev
        if not train:
            raise CompileError(
                f"no usable rows to train {name} on (each needs {', '.join(inputs + outputs)})"
            )
        base_metric = make_metric(metric, outputs) if isinstance(metric, str) else metric
        opt_metric = base_metric
        if optimizer == "GEPA":  # GEPA reflects on text: the expected answer and the reviewer's comment
            opt_metric = feedback_metric(base_metric, outputs, prepared.comments(), inputs)
        teleprompter, call = make_optimizer(optimizer, _counted(opt_metric, steps), lm, params)

        steps.step("score before")
        before = _score(student, dev, base_metric, lm, steps)
        steps.step("optimize")
        if "valset" in inspect.signature(teleprompter.compile).parameters and dev:
            call = {"valset": dev, **call}
        with dspy.context(lm=lm, callbacks=[]):
            try:
                compiled = teleprompter.compile(student, trainset=train, **call)
            except Exception as exc:
                if steps.cancelled():  # an optimizer that swallowed Cancelled for a while, then gave up
                    raise Cancelled("optimize") from exc
                if lm_failure(exc) is not None:
                    raise EvaluationFailed(f"an optimizer call: {describe_failure(exc)}", "optimize") from exc
                raise
        steps.step("score after")
        after = _score(compiled, dev, base_metric, lm, steps)

        steps.step("log run")
        result = CompileResult(
            version=None,  # type: ignore[arg-type]  # set once registered, below
            program=compiled,
            optimizer=optimizer,
            metric=metric if isinstance(metric, str) else getattr(metric, "__name__", "custom"),
            score_before=before,
            score_after=after,
            data=prepared,
            dataset=dataset_name
            or (Path(data).stem if isinstance(data, (str, Path)) else f"{name}-feedback"),
            seconds=0.0,
        )
        run_params = {"module": type(student).__name__, "seed": seed, "dev_fraction": dev_fraction}
        run_params.update({f"optimizer.{k}": v for k, v in params.items()})
        version = _log_and_register(result, name, run_params, lm, store, tags, description, steps)
    finally:
        steps.close()
    return replace(result, version=version, seconds=round(time.monotonic() - started, 3))


def _score(
    program: dspy.Module, dev: list[dspy.Example], metric: Metric, lm: dspy.BaseLM, steps: Progress
) -> float | None:
    try:
        return score(program, dev, metric, lm, steps.tick)
    except EvaluationFailed as exc:
        raise EvaluationFailed(exc.detail, steps.step_name) from exc.__cause__


def _log_and_register(
    result: CompileResult,
    name: str,
    params: dict[str, Any],
    lm: dspy.BaseLM,
    store: Store,
    tags: Mapping[str, str] | None,
    description: str | None,
    steps: Progress,
) -> registry.VersionInfo:
    """One run in flywheel's experiment: parameters, both dev scores, the data as dataset inputs and
    the lineage as an artifact; the new version is registered inside it."""
    data = result.data
    sizes = {"train_size": result.train_size, "dev_size": result.dev_size}
    # fluent MLflow (the run, its inputs and artifacts) pointed at this store; the optimisation is over
    with store.fluent(), mlflow.start_run(experiment_id=store.experiment_id, run_name=f"compile-{name}"):
        mlflow.log_params(
            {
                "optimizer": result.optimizer,
                "metric": result.metric,
                "lm": getattr(lm, "model", type(lm).__name__),
                "rows": data.rows,
                "rows_skipped": data.skipped,
                "duplicates_removed": data.split.duplicates,
                **sizes,
                **{k: str(v)[:500] for k, v in params.items()},
            }
        )
        for part, context in ((data.split.train, "training"), (data.split.dev, "validation")):
            if part:
                mlflow.log_input(
                    mlflow.data.from_pandas(data.frame(part), name=result.dataset), context=context
                )
        lineage = {"train": data.trace_ids("train"), "dev": data.trace_ids("dev")}
        mlflow.log_dict(lineage, "lineage/trace_ids.json")  # tags hold 8000 chars: count + hash there
        mlflow.log_dict(data.split.sides, SIDES_ARTIFACT)
        steps.step("register")
        tags = {
            **(tags or {}),
            "optimizer": result.optimizer,
            "metric": result.metric,
            "dataset": result.dataset,
            registry.SCORE_TAG: _fmt(result.score_after),
            "score.before": _fmt(result.score_before),
            "lineage.count": str(result.lineage_count),
            "lineage.sha256": result.lineage_hash,
            HELDOUT_TAG: str(len(data.split.heldout_keys)),
            **{k: str(v) for k, v in sizes.items()},
        }
        text = description or f"{result.optimizer} on {result.train_size} rated examples ({result.dataset})."
        version = registry.register_program(
            result.program, name, description=text, tags=tags, lm=lm, store=store
        )
        # on the run and on the new version's logged model
        scores = {"dev_score_before": result.score_before, "dev_score_after": result.score_after}
        mlflow.log_metrics({k: v for k, v in scores.items() if v is not None}, model_id=version.model_id)
        return version


def _fmt(value: float | None) -> str | None:
    return None if value is None else f"{value:.3f}"
