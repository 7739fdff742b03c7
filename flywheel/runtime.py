"""The composition root: one `Runtime` holds what serving, feedback, export and the loop share.

It builds the settings, the store, the LM, the program loader (caches), the
durable outbox with its deliverers (traces -> tracing, feedback -> feedback)
and the request counters, and passes them down as arguments: nothing below
imports this module. Whoever creates a runtime owns it and is the only one
who closes it: the API app it builds for itself, a notebook
(`with flywheel.open() as fw:`), the CLI, a test. A background server or an
app handed a runtime never stops it, so delivery goes on after they stop.

`get_runtime()` is the default runtime of a notebook: built on first use,
closed at interpreter exit, where queued items are delivered within
EXIT_DELIVERY_SECONDS or left durable in outbox.db with one log line.
"""

from __future__ import annotations

import asyncio
import atexit
import json
import logging
import threading
import time
from types import TracebackType
from typing import TYPE_CHECKING, Any

from flywheel import feedback, limits, span_rows, tracing
from flywheel.canary import TrafficPlans
from flywheel.config import Settings, get_settings
from flywheel.counters import RequestCounters
from flywheel.deliverer import delivers_here, delivery_outbox
from flywheel.errors import ReviewError, Unavailable
from flywheel.loader import Loader

if TYPE_CHECKING:
    import dspy

    from flywheel.agreement import AgreementReport
    from flywheel.gate import GateResult
    from flywheel.loader import LoadedProgram
    from flywheel.loop import LoopTurn
    from flywheel.registry import VersionInfo
    from flywheel.serving import Prediction, ProgramPool
    from flywheel.store import Store

log = logging.getLogger("flywheel.runtime")

EXIT_DELIVERY_SECONDS = 10.0


def _cut_span(span: dict[str, Any], field_limit: int, trace_limit: int) -> dict[str, Any]:
    """A call-tree span with its inputs or outputs cut where their JSON is past `field_limit`
    (the call tree repeats the request's inputs, e.g. in prompts)."""
    for part in ("inputs", "outputs"):
        text = span_rows.to_json(span[part])
        if len(text) > field_limit:
            span = {**span, part: limits.stored(json.loads(text), field_limit, trace_limit)}
    return span


class Runtime:
    """Settings, store, LM, program loader, outbox and counters of one owner."""

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        store: Store | None = None,
        lm: dspy.BaseLM | None = None,
    ) -> None:
        from flywheel.lm import configured_lm
        from flywheel.store import connect

        self.settings = settings or (store.settings if store is not None else get_settings())
        # a host that connected before starts during an outage, from last-known-good state
        self.store: Store = store or connect(self.settings, allow_offline=True)
        self.lm: dspy.BaseLM = lm or configured_lm(self.settings)
        self._serving_lm: tuple[Any, bool, Any] | None = None
        self._pool: ProgramPool | None = None
        self.programs = Loader(self.store)
        self.traffic = TrafficPlans(self.store, self.settings.flywheel_resolve_ttl)
        self._background: set[asyncio.Task[Any]] = set()
        self._watcher: Any = None
        home = self.settings.flywheel_home
        # the same outbox and deliverers as `flywheel serve`'s deliverer process; this runtime runs
        # the delivery thread unless FLYWHEEL_DELIVERY=process (a serve worker: it only commits)
        self.outbox = delivery_outbox(self.settings, self.store)
        self.delivers = delivers_here(self.settings)
        self.counters = RequestCounters(home / "metrics")
        self.started_at = time.monotonic()
        self.log = logging.getLogger("flywheel.server")
        self._lock = threading.Lock()
        self._started = False
        self._closed = False

    # --- life cycle ------------------------------------------------------------------------

    def start(self) -> Runtime:
        """Start the delivery and counter threads (idempotent)."""
        with self._lock:
            if self._closed:
                raise RuntimeError("this runtime is closed")
            if not self._started:
                self.outbox.start(deliver=self.delivers)
                self.counters.start()
                if self.settings.watch_enabled:
                    from flywheel.rollback import Watcher

                    self._watcher = Watcher(self).start()
                self._started = True
        return self

    def close(self, timeout: float | None = None) -> int:
        """Stop the threads, deliver what MLflow takes within `timeout`; returns how many items wait.

        What is left stays durable in outbox.db: the next runtime on this FLYWHEEL_HOME
        (any process) delivers it.
        """
        with self._lock:
            if self._closed:
                return 0
            self._closed = True
            self.outbox.stop()
            self.counters.stop()
            if self._watcher is not None:
                self._watcher.stop()
            if self._pool is not None:
                self._pool.shutdown()
        if not self.delivers:  # committed; the host's deliverer process delivers it
            return self.outbox.backlog()
        if self.settings.mlflow_enabled:
            self.outbox.flush(timeout=EXIT_DELIVERY_SECONDS if timeout is None else timeout)
        waiting = self.outbox.backlog()
        if waiting:
            log.warning(
                "flywheel: %d item(s) wait in %s; the next flywheel process on this FLYWHEEL_HOME "
                "delivers them",
                waiting,
                self.outbox.path,
            )
        return waiting

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> Runtime:
        return self.start()

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # --- what serving runs programs with ---------------------------------------------------

    def serving_lm(self) -> dspy.BaseLM:
        """`self.lm` with DSPy's response cache on or off as LM_CACHE_SERVING says (default off)."""
        from flywheel.lm import with_cache

        wanted = self.settings.lm_cache_serving
        cached = self._serving_lm
        if cached is None or cached[0] is not self.lm or cached[1] != wanted:
            cached = (self.lm, wanted, with_cache(self.lm, wanted))
            self._serving_lm = cached
        return cached[2]  # type: ignore[no-any-return]

    def program_pool(self) -> ProgramPool:
        """The PROGRAM_THREADS threads that run forward-only programs (made on first use)."""
        if self._pool is None:
            with self._lock:
                if self._pool is None:
                    from flywheel.serving import ProgramPool

                    self._pool = ProgramPool(self.settings.program_threads)
        return self._pool

    def spawn(self, work: Any) -> None:
        """Run a coroutine nobody awaits (a shadow prediction) on the running loop, kept referenced
        until it ends (asyncio holds tasks weakly)."""
        task = asyncio.get_running_loop().create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def settle(self) -> None:
        """Wait for the spawned work of the running loop (a private loop about to close)."""
        loop = asyncio.get_running_loop()
        mine = [t for t in list(self._background) if t.get_loop() is loop]
        if mine:
            await asyncio.gather(*mine, return_exceptions=True)

    # --- what the API and notebooks call --------------------------------------------------

    def record_trace(self, record: tracing.TraceRecord) -> None:
        """Queue a trace without waiting for its commit (a failed prediction's: nothing acknowledges it)."""
        if self.settings.mlflow_enabled:
            self.outbox.put("trace", record.trace_id, self._trace_payload(record))

    def _trace_payload(self, record: tracing.TraceRecord) -> str:
        """The record as the outbox stores it, serialised once (span values written in place, each
        prompt once: `tracing.share_prompts`), fields past MAX_FIELD_CHARS/MAX_TRACE_CHARS cut.
        JSON text, which the outbox stores verbatim."""
        payload = record.to_dict()
        limit = self.settings.max_field_chars, self.settings.max_trace_chars
        payload["inputs"] = limits.stored(payload["inputs"], *limit)
        payload["outputs"] = limits.stored(payload["outputs"], *limit)
        payload["error"] = limits.stored(payload["error"], *limit)
        payload["spans"] = tracing.share_prompts(list(payload.get("spans") or []))
        text = span_rows.payload_text(payload)
        if len(text) > limit[0]:  # some span part may be past the field limit (none is otherwise)
            payload["spans"] = [_cut_span(span, *limit) for span in payload["spans"]]
            text = span_rows.payload_text(payload)
        return text

    async def commit_trace(self, record: tracing.TraceRecord) -> None:
        """Queue a trace and wait, without blocking the event loop, until it is committed to the
        outbox: what a 200 from /predict promises. Concurrent requests share one group commit.
        Unavailable (503) when the commit fails (it is logged by the outbox)."""
        if not self.settings.mlflow_enabled:
            return
        future = self.outbox.put("trace", record.trace_id, self._trace_payload(record), urgent=True)
        try:
            await asyncio.wrap_future(future)
        except Exception as exc:
            raise Unavailable(
                f"the prediction's trace could not be committed to {self.outbox.path}: {exc}"
            ) from None

    async def apredict(
        self,
        model: str,
        inputs: Any,
        ref: str | int | None = None,
        *,
        timeout: float | None = None,
        routing_key: str | None = None,
    ) -> Prediction:
        from flywheel import serving

        return await serving.apredict(self, model, inputs, ref, timeout=timeout, routing_key=routing_key)

    def predict(
        self,
        model: str,
        inputs: Any,
        ref: str | int | None = None,
        *,
        timeout: float | None = None,
        routing_key: str | None = None,
    ) -> Prediction:
        from flywheel import serving

        return serving.predict(self, model, inputs, ref, timeout=timeout, routing_key=routing_key)

    def submit_feedback(self, trace_id: str, rating: str, **kwargs: Any) -> feedback.Receipt:
        return feedback.submit(self, trace_id, rating, **kwargs)

    def export_rows(self, model: str, **kwargs: Any) -> list[dict[str, Any]]:
        from flywheel import export

        return export.export_rows(self, model, **kwargs)

    def load(self, model: str, ref: str | int | None = None) -> LoadedProgram:
        return self.programs.load(model, ref)

    def agreement_report(
        self, model: str, queue: str | None = None, labels: list[str] | None = None
    ) -> AgreementReport:
        """Reviewer agreement per label of `model` (of one review queue's items and reviewers)."""
        from flywheel import agreement, review

        self.outbox.deliver_available(max_batches=20)
        kinds = {lab.name: lab.kind for lab in review.labels(self.store, model)}
        levels = {
            n: agreement.INTERVAL if k == review.NUMERIC else agreement.NOMINAL for n, k in kinds.items()
        }
        compared = [n for n, k in kinds.items() if k not in (review.TEXT, review.CORRECTED)]
        if queue is None:
            return agreement.report(self.store, model, labels=labels or compared, levels=levels)
        q = review.get_queue(self.store, model, queue)
        if q is None:
            raise ReviewError(f"there is no review queue {review.queue_name(model, queue)!r}")
        items = [i.item_id for i in review.queue_items(self.store, q.queue_id)]
        return agreement.report(
            self.store,
            model,
            queue=q.name,
            reviewers=q.reviewers,
            trace_ids=items,
            labels=labels or compared,
            levels=levels,
        )

    def promote(self, model: str, version: str | int, stage: str) -> VersionInfo:
        from flywheel import registry

        return registry.promote(model, version, stage, self.store)

    def set_alias(self, model: str, alias: str, version: str | int) -> VersionInfo:
        from flywheel import registry

        return registry.set_alias(model, alias, version, self.store)

    def loop(self, model: str, **kwargs: Any) -> LoopTurn:
        from flywheel.loop import loop as run_loop  # not `from flywheel import loop`: that is this function

        return run_loop(self, model, **kwargs)

    def gate(self, model: str, candidate: str | int, rows: Any, **kwargs: Any) -> GateResult:
        from flywheel.gate import gate as run_gate  # not `from flywheel import gate`: that is this function

        return run_gate(model, candidate, rows, store=self.store, lm=kwargs.pop("lm", self.lm), **kwargs)

    def health(self) -> dict[str, Any]:
        """SPEC.md's /health plus the outbox backlog, its dead letters, and what is served from:
        `mlflow`, or `last-known-good` (this host's disk and memory) while MLflow does not answer.

        Nothing here waits for MLflow: whether it answers is the background probe's last answer
        (`_mlflow_answers`); whether delivery reaches it is this process's outbox when it delivers,
        else the host's deliverer process's last pass as recorded in outbox.db."""
        answers, why = self._mlflow_answers()
        delivered, delivery_error = self._delivery_state()
        connected = answers and delivered
        detail = None
        if not connected:
            detail = (
                f"{delivery_error or why or 'MLflow does not answer'}; serving last-known-good "
                f"resolutions and models from {self.programs.lkg.root}"
            )
        return {
            "status": "healthy" if connected else "degraded",
            "mlflow_connected": connected,
            "loaded_models_count": len(self.programs.cached_versions()),
            "uptime_seconds": round(time.monotonic() - self.started_at, 1),
            "outbox_backlog": self.outbox.backlog(),
            "dead_letters": self.outbox.dead_letters(),
            "serving_from": "mlflow" if connected else "last-known-good",
            "detail": detail,
        }

    def metrics_extra(self) -> dict[str, float]:
        """Gauges /metrics adds in Prometheus form beside the request counters."""
        return {
            "outbox_backlog": self.outbox.backlog(),
            "outbox_dead_letters": self.outbox.dead_letters(),
            "loaded_models": len(self.programs.cached_versions()),
            "mlflow_reachable": 1.0 if self._mlflow_answers()[0] else 0.0,
        }

    def _mlflow_answers(self) -> tuple[bool, str | None]:
        """(True, None) when the tracking server answered the background probe's last check, else
        (False, why); never a wait. An embedded store has nothing to reach. The probe starts on
        first use (the API starts it with the app) and checks every MLFLOW_PROBE_EVERY seconds."""
        if not self.store.tracking_uri.startswith(("http://", "https://")):
            return True, None
        with self._lock:
            probe: _MlflowProbe | None = getattr(self, "_probe", None)
            if probe is None:
                probe = self._probe = _MlflowProbe(self)
        last = probe.last
        if last is None:
            return False, "MLflow has not answered the first check yet"
        at, error = last
        if error is None:
            return True, None
        # this process's outbox delivered to MLflow after that check failed: it answers again
        since = getattr(self.outbox, "_reachable_since", None) if self._delivers_here() else None
        if self.outbox.connected and since is not None and since > at:
            return True, None
        return False, error

    def _delivers_here(self) -> bool:
        return bool(getattr(self, "delivers", True))  # False: a serve worker whose host runs a deliverer

    def _delivery_state(self) -> tuple[bool, str | None]:
        """Whether delivery reaches MLflow, and the error when not: this process's outbox when it
        delivers; else the deliverer's last pass recorded in outbox.db (`Outbox.delivery_state`)."""
        read = getattr(self.outbox, "delivery_state", None)
        if self._delivers_here() or not callable(read):
            return self.outbox.connected, self.outbox.last_error
        try:
            state = read()
        except Exception as exc:  # the file is busy or broken: say so rather than guess
            return False, f"the deliverer's state cannot be read from {self.outbox.path} ({exc})"
        if state is None:  # no deliverer has passed yet (it starts beside the workers)
            return True, None
        if not state.alive():
            return False, (
                f"the deliverer process (pid {state.pid}) last passed {state.age():.0f} s ago; "
                f"traces and feedback wait in {self.outbox.path}"
            )
        return bool(state.connected), state.last_error


MLFLOW_PROBE_EVERY = 2.0  # seconds between two checks of the tracking server (after each one ends)
MLFLOW_PROBE_TIMEOUT = 1.0  # how long one check waits for its answer


class _MlflowProbe:
    """Checks that a runtime's tracking server answers, in one daemon thread, so /health reads the
    last answer and never waits for MLflow (a check of a server that hangs takes its whole timeout).
    It holds the runtime weakly and ends with it, or once it is closed."""

    def __init__(self, runtime: Runtime) -> None:
        import weakref

        self.uri = runtime.store.tracking_uri
        self.last: tuple[float, str | None] | None = None  # (time.monotonic() of the answer, error or None)
        self._runtime = weakref.ref(runtime)
        threading.Thread(target=self._run, name="flywheel-mlflow-probe", daemon=True).start()

    def _run(self) -> None:
        from flywheel.store import check_reachable

        while True:
            runtime = self._runtime()
            if runtime is None or runtime.closed:
                return
            del runtime  # not held while the check waits
            try:
                check_reachable(self.uri, timeout=MLFLOW_PROBE_TIMEOUT)
                self.last = (time.monotonic(), None)
            except Exception as exc:
                self.last = (time.monotonic(), str(exc))
            time.sleep(MLFLOW_PROBE_EVERY)


def open_runtime(settings: Settings | None = None, **kwargs: Any) -> Runtime:
    """`with flywheel.open() as fw:` a runtime you own: started now, closed (and drained) on exit."""
    return Runtime(settings, **kwargs).start()


# --- the default runtime of a notebook or script -------------------------------------------

_default_lock = threading.Lock()
_default: Runtime | None = None
_default_settings: Settings | None = None


def get_runtime() -> Runtime:
    """This process's default runtime, built and started on first use from the current settings.

    A notebook that predicts without a server still gets its traces and feedback
    delivered in the background; at exit they are delivered within a bound.
    When the settings change (a test points flywheel at another store), the old
    default is closed (drained) and a new one is built.
    """
    global _default, _default_settings
    with _default_lock:
        settings = get_settings()
        if _default is None or _default.closed or _default_settings != settings:
            old = _default
            _default, _default_settings = Runtime(settings).start(), settings
        else:
            old = None
    if old is not None:
        old.close()
    return _default


def reset_runtime() -> None:
    """Close the default runtime (delivering what MLflow takes); the next use builds a new one."""
    global _default, _default_settings
    with _default_lock:
        old, _default, _default_settings = _default, None, None
    if old is not None:
        old.close()


atexit.register(reset_runtime)


# --- module-level conveniences on the default runtime (flywheel.predict, ...) ----------------


def predict(model: str, inputs: Any, ref: str | int | None = None, **kwargs: Any) -> Prediction:
    runtime = kwargs.pop("runtime", None) or get_runtime()
    return runtime.predict(model, inputs, ref, **kwargs)


async def apredict(model: str, inputs: Any, ref: str | int | None = None, **kwargs: Any) -> Prediction:
    runtime = kwargs.pop("runtime", None) or get_runtime()
    return await runtime.apredict(model, inputs, ref, **kwargs)


def submit_feedback(trace_id: str, rating: str, **kwargs: Any) -> feedback.Receipt:
    runtime = kwargs.pop("runtime", None) or get_runtime()
    return runtime.submit_feedback(trace_id, rating, **kwargs)


def export_rows(model: str, **kwargs: Any) -> list[dict[str, Any]]:
    runtime = kwargs.pop("runtime", None) or get_runtime()
    return runtime.export_rows(model, **kwargs)


def agreement_report(
    model: str, queue: str | None = None, labels: list[str] | None = None, *, runtime: Runtime | None = None
) -> AgreementReport:
    """How much reviewers agree on `model`'s labels (flywheel.agreement); `.to_frame()` for a table."""
    return (runtime or get_runtime()).agreement_report(model, queue, labels)


def load(model: str, ref: str | int | None = None, *, runtime: Runtime | None = None) -> LoadedProgram:
    return (runtime or get_runtime()).load(model, ref)


def promote(model: str, version: str | int, stage: str, *, runtime: Runtime | None = None) -> VersionInfo:
    return (runtime or get_runtime()).promote(model, version, stage)


def set_alias(model: str, alias: str, version: str | int, *, runtime: Runtime | None = None) -> VersionInfo:
    return (runtime or get_runtime()).set_alias(model, alias, version)


def loop(model: str, **kwargs: Any) -> LoopTurn:
    runtime = kwargs.pop("runtime", None) or get_runtime()
    return runtime.loop(model, **kwargs)


def gate(model: str, candidate: str | int, rows: Any, **kwargs: Any) -> GateResult:
    runtime = kwargs.pop("runtime", None) or get_runtime()
    return runtime.gate(model, candidate, rows, **kwargs)
