"""Who delivers the outbox: one delivery process per host under `flywheel serve`, a thread elsewhere.

Every trace and rating is committed to FLYWHEEL_HOME/outbox.db before it is acknowledged;
delivering it to MLflow is separate work. When every uvicorn worker delivered its own share,
N delivery threads competed for outbox.db's write lock and for the GIL on the request path,
and each worker paid LiteLLM's cost map (about 4 s of CPU) on its first delivery. So
`flywheel serve` runs ONE delivering process per host beside its workers (`Supervisor`): the
workers only commit (FLYWHEEL_DELIVERY=process, set for them by `serve`), the deliverer is
the outbox's only consumer, and the supervisor stops it (letting it drain) when `serve` stops.
Nothing is lost while none delivers: items wait in the file, and a killed deliverer's claims
are released by the next one (outbox.py).

A new deliverer needs about 5 s of CPU before it can deliver (imports, the store,
`tracing.prepare_delivery`), 8 to 15 s of wall time on a host busy with the load it serves.
So the supervisor keeps a warm standby: a second `flywheel deliver` that has done all of that
and waits for FLYWHEEL_HOME/deliverer.lock (`DeliveryLock`, an exclusive `flock`). Only its
holder delivers. The kernel releases the lock the instant its holder dies, `kill -9`
included, so the standby delivers within milliseconds, and the supervisor starts a new
standby. The wait is a `flock` blocked in a thread: no CPU, while the main thread still checks
once a second that its supervisor runs. Two `flywheel deliver` run by hand on one home
share the lock the same way.

A notebook, a kernel's background server, the CLI and tests keep one delivery thread in their
own process (FLYWHEEL_DELIVERY=thread, the default). Both run the same code: the outbox that
`delivery_outbox` builds, with the trace and feedback deliverers, and its delivery loop.

The deliverer process (`flywheel deliver`, `run`) builds only the settings, the store and the
outbox: never programs or the LM. It prepares the delivery path once at start
(`tracing.prepare_delivery`, LiteLLM's cost data), takes the lock (or stands by for it), then
delivers until SIGTERM or until the process that started it is gone, and drains what MLflow
takes within DRAIN_SECONDS.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from flywheel import feedback, heap, tracing
from flywheel.config import Settings, get_settings, secret_values
from flywheel.outbox import DEAD_KEEP_SECONDS, DEAD_KEEP_WAITS, Outbox

if TYPE_CHECKING:
    from flywheel.store import Store

log = logging.getLogger("flywheel.deliverer")

THREAD, PROCESS = "thread", "process"  # FLYWHEEL_DELIVERY's values
LOCK_FILE = "deliverer.lock"  # in FLYWHEEL_HOME: only its holder delivers
STANDBYS = 1  # warm deliverers the supervisor keeps waiting for the lock beside the delivering one
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


class DeliveryLock:
    """FLYWHEEL_HOME/deliverer.lock, held with an exclusive `flock` by the one deliverer that
    delivers. The kernel drops it when the holder's file is closed, which dying does (`kill -9`
    included). `wait` blocks a daemon thread in `flock` (no CPU) and sets `held`, then `wake`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)  # not inherited
        self.held = threading.Event()

    def try_take(self) -> bool:
        """Take the lock if it is free; whether this process holds it."""
        import fcntl

        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        self.held.set()
        return True

    def wait(self, wake: threading.Event) -> None:
        """Take the lock as soon as its holder lets go, in a daemon thread; then set `wake`."""

        def take() -> None:
            import fcntl

            fcntl.flock(self._fd, fcntl.LOCK_EX)  # releases the GIL while it waits
            self.held.set()
            wake.set()

        threading.Thread(target=take, name="flywheel-deliverer-lock", daemon=True).start()


def run(parent: int | None = None, settings: Settings | None = None) -> int:
    """`flywheel deliver`: deliver this host's outbox until SIGTERM (or SIGINT when run by hand),
    or until `parent` (the supervising `flywheel serve`) is gone; then drain. Another deliverer
    holds the lock: stand by, warm, until it is gone. Returns 0."""
    started = time.monotonic()
    stop, wake = threading.Event(), threading.Event()
    _on_stop_signals(stop, wake, supervised=parent is not None)
    from flywheel.store import connect

    settings = settings or get_settings()
    store = connect(settings, allow_offline=True)
    outbox = delivery_outbox(settings, store)
    tracing.prepare_delivery()  # LiteLLM's cost data, once here: never on a request path
    heap.settle()  # what it has loaded lives as long as it does: full collections skip it
    _check_trace_database(settings)
    lock = DeliveryLock(settings.flywheel_home / LOCK_FILE)
    if not stop.is_set() and not lock.try_take():
        log.info(
            "deliverer [%d]: standing by for %s (ready %.2f s after run, %.2f s of CPU since it started)",
            os.getpid(),
            lock.path,
            time.monotonic() - started,
            time.process_time(),
        )
        lock.wait(wake)
    delivering = _wait_then_deliver(outbox, lock, stop, wake, parent, started)
    if not delivering:
        log.info("deliverer [%d]: stopped, a standby that never delivered", os.getpid())
        return 0
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


def _check_trace_database(settings: Settings) -> None:
    """With FLYWHEEL_TRACE_DATABASE_URI, open the bulk writer now (trace_copy: its schema checked),
    so a database it refuses is one clear error line at start. The deliverer runs on all the same:
    each delivery fails with that error (in /health's detail), and every item waits in the outbox."""
    if not settings.flywheel_trace_database_uri or not settings.mlflow_enabled:
        return
    from flywheel import trace_copy
    from flywheel.limits import redact

    try:
        trace_copy.writer(settings.flywheel_trace_database_uri)
    except Exception as exc:
        log.error(
            "deliverer [%d]: the bulk trace writer cannot write (%s); traces wait in the outbox",
            os.getpid(),
            redact(str(exc), secret_values(settings)),
        )


def _wait_then_deliver(
    outbox: Outbox,
    lock: DeliveryLock,
    stop: threading.Event,
    wake: threading.Event,
    parent: int | None,
    started: float,
) -> bool:
    """Until `stop` or `parent` is gone: deliver once this process holds the lock (at once, or
    the moment the standby's `flock` returns). Whether it delivered."""
    delivering = False
    while not stop.is_set():
        if parent is not None and os.getppid() != parent:
            log.warning("deliverer [%d]: its supervisor [%d] is gone; stopping", os.getpid(), parent)
            break
        if lock.held.is_set() and not delivering:
            outbox.start()
            delivering = True
            log.info(
                "deliverer [%d]: delivering %s (ready %.2f s after run, %.2f s of CPU since it started)",
                os.getpid(),
                outbox.path,
                time.monotonic() - started,
                time.process_time(),  # the whole process's: interpreter, imports, store, prepare_delivery
            )
        wake.wait(PARENT_CHECK)
        wake.clear()  # after the wait, before the checks: a wake-up set in between is not lost
    return delivering


def _on_stop_signals(stop: threading.Event, wake: threading.Event, supervised: bool) -> None:
    """SIGTERM stops the deliverer. Under a supervisor, Ctrl-C in the terminal (SIGINT to the whole
    process group) is ignored: the supervisor stops its workers, then this process, in that order."""

    def on_stop(sig: int, frame: object) -> None:
        stop.set()
        wake.set()

    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, signal.SIG_IGN if supervised else on_stop)


# --- the supervisor in `flywheel serve` --------------------------------------------------------


def command(parent: int) -> list[str]:
    """The deliverer's command line, supervised by process `parent`."""
    return [sys.executable, "-m", "flywheel", "deliver", "--parent", str(parent)]


@dataclass
class _Slot:
    """One deliverer the supervisor keeps running: its process, when it started, the delay
    before the next one while they keep dying, and when that one is due."""

    proc: subprocess.Popen[bytes] | None = None
    born: float = 0.0
    delay: float = 0.0
    due: float = 0.0


class Supervisor:
    """Keeps 1 + STANDBYS deliverer processes running, restarts each when it dies, stops them on
    `stop()`. Which of them delivers is up to the lock (`DeliveryLock`), not to the supervisor.

    A watcher thread polls the children every POLL seconds and starts a new one as soon as one
    is gone (after a growing delay only while new ones keep dying within SETTLED_SECONDS). The
    children inherit this process's stdout and stderr: their logs go where `serve`'s go.
    """

    POLL = 0.1

    def __init__(self, env: dict[str, str] | None = None, size: int = 1 + STANDBYS) -> None:
        self._env = env
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._slots = [_Slot() for _ in range(size)]
        self._thread: threading.Thread | None = None
        self.restarts = 0

    @property
    def pids(self) -> list[int]:
        """The deliverers running now (the delivering one and the standbys)."""
        with self._lock:
            return [s.proc.pid for s in self._slots if s.proc is not None and s.proc.poll() is None]

    def start(self) -> Supervisor:
        with self._lock:
            for slot in self._slots:
                slot.proc, slot.born = self._spawn(), time.monotonic()
        self._thread = threading.Thread(target=self._watch, name="flywheel-deliverer-watch", daemon=True)
        self._thread.start()
        return self

    def _spawn(self) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(command(os.getpid()), env=self._env, stdin=subprocess.DEVNULL)
        log.info("deliverer [%d] started by [%d]", proc.pid, os.getpid())
        return proc

    def _watch(self) -> None:
        while not self._stopping.wait(self.POLL):
            with self._lock:
                if self._stopping.is_set():
                    return
                for slot in self._slots:
                    self._tend(slot, time.monotonic())

    def _tend(self, slot: _Slot, now: float) -> None:
        """Notice that the slot's deliverer exited (reaping it: a killed holder's claims are
        released once its pid is gone), and start another when it is due."""
        proc = slot.proc
        if proc is not None:
            if proc.poll() is None:
                return
            lived = now - slot.born
            slot.delay = 0.0 if lived >= SETTLED_SECONDS else min(max(slot.delay * 2, 0.5), RESTART_MAX_DELAY)
            slot.proc, slot.due = None, now + slot.delay
            log.warning(
                "deliverer [%d] exited with %s after %.1f s; starting another%s",
                proc.pid,
                proc.returncode,
                lived,
                f" in {slot.delay:.1f} s" if slot.delay else "",
            )
        if now >= slot.due:
            slot.proc, slot.born = self._spawn(), now
            self.restarts += 1

    def stop(self, timeout: float = STOP_GRACE) -> list[int | None]:
        """Stop watching, SIGTERM every deliverer and wait until they have exited, the delivering
        one once it has drained (SIGKILL after `timeout`); their exit codes. A standby exits at
        once: stopping, it never takes the lock."""
        with self._lock:
            self._stopping.set()
            procs = [s.proc for s in self._slots if s.proc is not None]
            for slot in self._slots:
                slot.proc = None
        if self._thread is not None:
            self._thread.join(timeout)
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + timeout
        return [self._reap(proc, deadline) for proc in procs]

    @staticmethod
    def _reap(proc: subprocess.Popen[bytes], deadline: float) -> int | None:
        try:
            return proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.warning("deliverer [%d] did not stop in time; killed", proc.pid)
            proc.kill()
            return proc.wait()
