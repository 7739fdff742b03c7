"""Who delivers the outbox: one delivery process per host under `flywheel serve`, a thread elsewhere.

Every trace and rating is committed to FLYWHEEL_HOME/outbox.db before it is acknowledged;
delivering it to MLflow is separate work. When every uvicorn worker delivered its own share,
N delivery threads competed for outbox.db's write lock and for the GIL on the request path,
and each worker paid LiteLLM's cost map (about 4 s of CPU) on its first delivery. So
`flywheel serve` runs ONE deliverer process per host beside its workers (`Supervisor`): the
workers only commit (FLYWHEEL_DELIVERY=process, set for them by `serve`), the deliverer is
the outbox's only consumer, and the supervisor restarts it within a second when it dies and
stops it (letting it drain) when `serve` stops. Nothing is lost while it is down: items wait
in the file, and a killed deliverer's claims are released by the next one (outbox.py).

A notebook, a kernel's background server, the CLI and tests keep one delivery thread in their
own process (FLYWHEEL_DELIVERY=thread, the default). Both run the same code: the outbox that
`delivery_outbox` builds, with the trace and feedback deliverers, and its delivery loop.

The deliverer process (`flywheel deliver`, `run`) builds only the settings, the store and the
outbox: never programs or the LM. It prepares the delivery path once at start
(`tracing.prepare_delivery`, LiteLLM's cost data), then delivers until SIGTERM or until the
process that started it is gone, and drains what MLflow takes within DRAIN_SECONDS.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from functools import partial
from typing import TYPE_CHECKING

from flywheel import feedback, tracing
from flywheel.config import Settings, get_settings
from flywheel.outbox import DEAD_KEEP_SECONDS, DEAD_KEEP_WAITS, Outbox

if TYPE_CHECKING:
    from flywheel.store import Store

log = logging.getLogger("flywheel.deliverer")

THREAD, PROCESS = "thread", "process"  # FLYWHEEL_DELIVERY's values
DRAIN_SECONDS = 10.0  # a stopped deliverer delivers what MLflow takes within this, the rest waits
STOP_GRACE = DRAIN_SECONDS + 10.0  # the supervisor kills a deliverer that has not exited by then
PARENT_CHECK = 1.0  # how often a supervised deliverer checks that its supervisor still runs
RESTART_MAX_DELAY = 10.0  # a deliverer that keeps dying at once is restarted at most this slowly
SETTLED_SECONDS = 10.0  # a deliverer that ran this long before dying is restarted at once


def delivery_outbox(settings: Settings, store: Store) -> Outbox:
    """The host's outbox (FLYWHEEL_HOME/outbox.db) with its deliverers: traces, then the feedback
    that needs them. Nothing is dead-lettered until MLflow has answered for FEEDBACK_WAIT (other
    hosts replay first); dead letters are kept FEEDBACK_WAIT x 12 (an hour at least), within
    FEEDBACK_PENDING_MAX_BYTES."""
    wait = settings.feedback_wait
    outbox = Outbox(
        settings.flywheel_home / "outbox.db",
        grace=wait,
        keep_dead=max(DEAD_KEEP_SECONDS, wait * DEAD_KEEP_WAITS),
        dead_max_bytes=settings.feedback_pending_max_bytes,
    )
    outbox.register("trace", partial(tracing.deliver, store))
    outbox.register("feedback", partial(feedback.deliver, store))
    return outbox


def delivers_here(settings: Settings) -> bool:
    """Whether a runtime with these settings runs the delivery thread (FLYWHEEL_DELIVERY=thread),
    or only commits because a deliverer process consumes the outbox (process)."""
    return settings.flywheel_delivery != PROCESS


# --- the deliverer process -------------------------------------------------------------------


def run(parent: int | None = None, settings: Settings | None = None) -> int:
    """`flywheel deliver`: deliver this host's outbox until SIGTERM (or SIGINT when run by hand),
    or until `parent` (the supervising `flywheel serve`) is gone; then drain. Returns 0."""
    started = time.monotonic()
    stop = threading.Event()
    _on_stop_signals(stop, supervised=parent is not None)
    from flywheel.store import connect

    settings = settings or get_settings()
    store = connect(settings, allow_offline=True)
    outbox = delivery_outbox(settings, store)
    prepare = getattr(tracing, "prepare_delivery", None)
    if prepare is not None:
        prepare()  # LiteLLM's cost data, once here: never on a request path
    outbox.start()
    log.info(
        "deliverer [%d]: delivering %s (ready %.2f s after run, %.2f s of CPU since it started)",
        os.getpid(),
        outbox.path,
        time.monotonic() - started,
        time.process_time(),  # the whole process's: interpreter, imports, store, prepare_delivery
    )
    while not stop.wait(PARENT_CHECK):
        if parent is not None and os.getppid() != parent:
            log.warning("deliverer [%d]: its supervisor [%d] is gone; stopping", os.getpid(), parent)
            break
    outbox.stop()  # the threads end; one last batch
    drained = not settings.mlflow_enabled or outbox.flush(timeout=DRAIN_SECONDS)
    waiting = outbox.backlog()
    if drained and not waiting:
        log.info("deliverer [%d]: stopped, nothing waits", os.getpid())
    else:
        log.warning(
            "deliverer [%d]: stopped; %d item(s) wait in %s for the next deliverer",
            os.getpid(),
            waiting,
            outbox.path,
        )
    return 0


def _on_stop_signals(stop: threading.Event, supervised: bool) -> None:
    """SIGTERM stops the deliverer. Under a supervisor, Ctrl-C in the terminal (SIGINT to the whole
    process group) is ignored: the supervisor stops its workers, then this process, in that order."""
    signal.signal(signal.SIGTERM, lambda sig, frame: stop.set())
    if supervised:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    else:
        signal.signal(signal.SIGINT, lambda sig, frame: stop.set())


# --- the supervisor in `flywheel serve` --------------------------------------------------------


def command(parent: int) -> list[str]:
    """The deliverer's command line, supervised by process `parent`."""
    return [sys.executable, "-m", "flywheel", "deliver", "--parent", str(parent)]


class Supervisor:
    """Runs one deliverer process, restarts it when it dies, stops it on `stop()`.

    A watcher thread polls the child every POLL seconds and starts a new one as soon as it is
    gone (after a growing delay only while new ones keep dying within SETTLED_SECONDS). The
    child inherits this process's stdout and stderr: its logs go where `serve`'s go.
    """

    POLL = 0.1

    def __init__(self, env: dict[str, str] | None = None) -> None:
        self._env = env
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._proc: subprocess.Popen[bytes] | None = None
        self._thread: threading.Thread | None = None
        self.restarts = 0

    @property
    def pid(self) -> int | None:
        with self._lock:
            return self._proc.pid if self._proc is not None else None

    def start(self) -> Supervisor:
        with self._lock:
            self._proc = self._spawn()
        self._thread = threading.Thread(target=self._watch, name="flywheel-deliverer-watch", daemon=True)
        self._thread.start()
        return self

    def _spawn(self) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(command(os.getpid()), env=self._env, stdin=subprocess.DEVNULL)
        log.info("deliverer [%d] started by [%d]", proc.pid, os.getpid())
        return proc

    def _watch(self) -> None:
        delay, born = 0.0, time.monotonic()
        while not self._stopping.wait(self.POLL):
            with self._lock:
                proc = self._proc
            if proc is None or proc.poll() is None:
                continue
            lived = time.monotonic() - born
            delay = 0.0 if lived >= SETTLED_SECONDS else min(max(delay * 2, 0.5), RESTART_MAX_DELAY)
            log.warning(
                "deliverer [%d] exited with %s after %.1f s; starting another%s",
                proc.pid,
                proc.returncode,
                lived,
                f" in {delay:.1f} s" if delay else "",
            )
            if delay and self._stopping.wait(delay):
                return
            with self._lock:
                if self._stopping.is_set():
                    return
                self._proc, born = self._spawn(), time.monotonic()
                self.restarts += 1

    def stop(self, timeout: float = STOP_GRACE) -> int | None:
        """Stop watching, SIGTERM the deliverer and wait until it has drained (SIGKILL after
        `timeout`); its exit code."""
        with self._lock:
            self._stopping.set()
            proc, self._proc = self._proc, None
        if self._thread is not None:
            self._thread.join(timeout)
        if proc is None:
            return None
        if proc.poll() is None:
            proc.terminate()
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("deliverer [%d] did not stop within %.0f s; killed", proc.pid, timeout)
            proc.kill()
            return proc.wait()
