"""One deliverer per host: `flywheel serve` runs the outbox's only consumer beside its workers,
and a warm standby that delivers the instant it dies.

Real processes throughout: `flywheel serve` (uvicorn workers, the demo programs on the offline
LM), its supervised `flywheel deliver` children, the embedded MLflow store read back by the test.
"""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import pytest
from processes import free_port, serve_command, stop_group, wait_until_up

from flywheel.store import Store

pytestmark = pytest.mark.slow
JOKES = "joke-generator"
BIN = Path(sys.executable).parent


@dataclass
class Served:
    proc: subprocess.Popen[bytes]
    url: str
    log: Path
    store: Store

    def deliverers(self) -> list[psutil.Process]:
        """The `flywheel deliver` processes among serve's descendants."""
        found = []
        for child in psutil.Process(self.proc.pid).children(recursive=True):
            try:
                if "deliver" in child.cmdline() and child.status() != psutil.STATUS_ZOMBIE:
                    found.append(child)
            except psutil.NoSuchProcess:
                pass
        return found

    def _logged(self, pid: int, what: str) -> re.Match[str] | None:
        pattern = rf"deliverer \[{pid}\]: {what} .*, ([0-9.]+) s of CPU since it started\)"
        return re.search(pattern, self.log.read_text(errors="replace"))

    def _wait_for(self, what: str, other_than: set[int], timeout: float) -> tuple[int, float]:
        """A live deliverer (not in `other_than`) whose log says `what` ("delivering", "standing
        by"); its pid and the CPU seconds it says it spent to get there."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pids = [p.pid for p in self.deliverers()]
            assert len(pids) <= 2, f"more than a deliverer and its standby: {pids}"
            for pid in pids:
                if pid not in other_than and (found := self._logged(pid, what)):
                    return pid, float(found.group(1))
            time.sleep(0.02)
        tail = self.log.read_text(errors="replace")[-3000:]
        raise TimeoutError(f"no deliverer {what} (other than {other_than}); log:\n{tail}")

    def delivering(self, other_than: int | None = None, timeout: float = 120) -> tuple[int, float]:
        """The deliverer that holds the lock and delivers (another than `other_than`), once it
        says so: its pid and the CPU seconds it spent before it delivered."""
        return self._wait_for("delivering", {other_than} if other_than else set(), timeout)

    def standby(self, active: int, timeout: float = 120) -> tuple[int, float]:
        """The warm standby beside deliverer `active`, once it waits for the lock."""
        return self._wait_for("standing by", {active}, timeout)


def _serve(store: Store, log: Path, workers: int = 2, home: Path | None = None) -> Served:
    """`flywheel serve` on `store`; with `home`, its own FLYWHEEL_HOME (outbox, deliverer.lock)
    beside another serve's on the same MLflow store."""
    port = free_port()
    env = dict(os.environ, PATH=f"{BIN}:{os.environ.get('PATH', '')}")
    if home is not None:
        env.update(FLYWHEEL_HOME=str(home), MLFLOW_TRACKING_URI=store.settings.mlflow_tracking_uri)
    with log.open("wb") as out:
        proc = subprocess.Popen(
            serve_command(port, workers=workers),
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(f"{url}/health", timeout=180, proc=proc)
    except BaseException:
        stop_group(proc)
        raise
    return Served(proc, url, log, store)


@pytest.fixture(scope="module")
def served(demo_store_rw: Store, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    from flywheel.runtime import reset_runtime

    reset_runtime()  # no delivery thread in this process: the deliverer must be the only consumer
    served = _serve(demo_store_rw, tmp_path_factory.mktemp("serve") / "serve.log")
    try:
        yield served
    finally:
        stop_group(served.proc)


def _in_mlflow(store: Store, wanted: set[str]) -> set[str]:
    found: set[str] = set()
    token = None
    while True:
        infos, token = store.tracking.search_traces(
            locations=[store.experiment_id], max_results=500, page_token=token
        )
        found.update(i.trace_id for i in infos)
        if not token:
            return found & wanted


def _wait_in_mlflow(store: Store, wanted: set[str], timeout: float = 180) -> float:
    """Seconds until every trace of `wanted` is in MLflow (AssertionError after `timeout`)."""
    started = time.monotonic()
    while (missing := wanted - _in_mlflow(store, wanted)) and time.monotonic() - started < timeout:
        time.sleep(0.5)
    assert not missing, f"{len(missing)} of {len(wanted)} acknowledged traces never reached MLflow"
    return time.monotonic() - started


def _consumer(served: Served) -> int | None:
    """The pid of the process that made the outbox's last delivery pass, as the file records it."""
    from flywheel.outbox import Outbox

    state = Outbox(served.store.settings.flywheel_home / "outbox.db").delivery_state()
    return state.pid if state is not None else None


def _delivering_again(served: Served, new: int, since: float, timeout: float = 120) -> tuple[float, float]:
    """Seconds after `since` (time.time) at which the outbox first named `new` its consumer
    (`delivery_state().pid`, polled every 10 ms), and at which it recorded the first trace
    delivered after `since` (`delivered.at`), once both are true."""
    db = sqlite3.connect(served.store.settings.flywheel_home / "outbox.db", timeout=30)
    took_over = None
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            consumer = db.execute("SELECT pid FROM consumer WHERE slot=0").fetchone()
            if consumer and consumer[0] == new and took_over is None:
                took_over = time.time() - since
            first = db.execute("SELECT min(at) FROM delivered WHERE at > ?", (since,)).fetchone()[0]
            if took_over is not None and first is not None:
                return took_over, float(first) - since
            time.sleep(0.01)
    finally:
        db.close()
    raise AssertionError(f"deliverer {new} never delivered after the kill")


def _predict(client: httpx.Client, i: int) -> tuple[int, str | None, str]:
    r = client.post("/predict", json={"model": JOKES, "inputs": {"topic": f"topic {i}"}})
    trace_id = r.json().get("trace_id") if r.status_code == 200 else None
    return r.status_code, trace_id, r.headers.get("x-flywheel-worker", "")


def _pause_outside_a_write(pid: int, outbox: Path) -> None:
    """SIGSTOP the deliverer at a moment it holds no write lock on outbox.db (else the workers'
    commits would wait for it): stopped, the test must be able to begin a write at once."""
    for _ in range(100):
        os.kill(pid, signal.SIGSTOP)
        db = sqlite3.connect(outbox, timeout=0.5, isolation_level=None)
        try:
            db.execute("BEGIN IMMEDIATE")
            db.execute("ROLLBACK")
            return
        except sqlite3.OperationalError:
            os.kill(pid, signal.SIGCONT)
            time.sleep(0.05)
        finally:
            db.close()
    raise AssertionError("the deliverer always held outbox.db's write lock")


def test_the_deliverer_is_the_outboxs_only_consumer_and_its_standby_waits(served: Served) -> None:
    """With the delivering deliverer paused (alive, holding the lock), the workers answer and
    commit, and neither they nor the warm standby deliver anything; resumed, it delivers
    everything (on the code before, every worker delivered and there was no deliverer)."""
    pid, _ = served.delivering()
    standby, _ = served.standby(pid)
    outbox = served.store.settings.flywheel_home / "outbox.db"
    _pause_outside_a_write(pid, outbox)
    standby_cpu = psutil.Process(standby).cpu_times()
    try:
        with httpx.Client(base_url=served.url, timeout=60) as client, ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(lambda i: _predict(client, i), range(24)))
        assert [status for status, *_ in answers] == [200] * 24
        ids = {trace_id for _, trace_id, _ in answers if trace_id}
        workers = {worker for *_, worker in answers}
        time.sleep(3)  # a dozen of the delivery loop's 0.25 s rounds, had a worker or the standby one
        assert _in_mlflow(served.store, ids) == set(), "a worker or the standby delivered traces"
        assert _consumer(served) != standby, "the standby delivered while the deliverer lived"
        assert sorted(p.pid for p in served.deliverers()) == sorted([pid, standby])
        waited = psutil.Process(standby).cpu_times()
    finally:
        os.kill(pid, signal.SIGCONT)
    seconds = _wait_in_mlflow(served.store, ids)
    assert _consumer(served) == pid  # the pass that delivered them was the deliverer's
    assert not served._logged(standby, "delivering"), "the standby took over from a live deliverer"
    spent = (waited.user + waited.system) - (standby_cpu.user + standby_cpu.system)
    print(f"\n{len(ids)} traces answered by workers {sorted(workers)}, held while deliverer {pid} was")
    print(f"paused; all in MLflow {seconds:.1f} s after it was resumed; standby {standby} used")
    print(f"{spent * 1000:.0f} ms of CPU while it waited")


def test_kill_9_of_the_deliverer_under_load_loses_nothing_acknowledged(served: Served) -> None:
    """The standby takes over a killed deliverer: another pid delivers, and every acknowledged
    trace reaches MLflow. Prints how long after the kill delivery resumed (on the code before,
    a new deliverer was started after the kill and paid its whole start first)."""
    old, _ = served.delivering()
    standby, _ = served.standby(old)
    statuses: list[int] = []
    acknowledged: set[str] = set()
    answered_at: list[float] = []
    stop = threading.Event()
    lock = threading.Lock()

    def client_loop(n: int) -> None:
        with httpx.Client(base_url=served.url, timeout=60) as client:
            i = 0
            while not stop.is_set():
                status, trace_id, _ = _predict(client, n * 100_000 + i)
                with lock:
                    statuses.append(status)
                    if trace_id:
                        acknowledged.add(trace_id)
                        answered_at.append(time.monotonic())
                i += 1

    with ThreadPoolExecutor(8) as pool:
        clients = [pool.submit(client_loop, n) for n in range(8)]
        time.sleep(3)
        killed_wall, killed_at = time.time(), time.monotonic()
        os.kill(old, signal.SIGKILL)
        took_over, resumed = _delivering_again(served, standby, since=killed_wall)
        new, _ = served.delivering(other_than=old)
        replacement, cpu = served.standby(new)  # the supervisor's new standby, warm
        ready_at = time.monotonic()
        time.sleep(2)
        stop.set()
        for c in clients:
            c.result()
    while_replacing = sum(1 for t in answered_at if killed_at <= t <= ready_at)
    assert statuses and set(statuses) == {200}, f"not every request was answered 200: {set(statuses)}"
    assert new == standby, f"deliverer {new} delivers, not the standby {standby}"
    assert replacement not in (old, new)
    drained = _wait_in_mlflow(served.store, acknowledged)
    assert _consumer(served) == new
    print(
        f"\nkill -9 of deliverer {old} under 8 clients: standby {new} the outbox's consumer "
        f"{took_over:.3f} s after the kill, its first batch in MLflow {resumed:.3f} s after the kill; "
        f"new standby "
        f"{replacement} warm {ready_at - killed_at:.1f} s after the kill ({cpu:.2f} s of CPU); "
        f"{while_replacing} requests answered 200 meanwhile; all {len(acknowledged)} acknowledged "
        f"traces in MLflow {drained:.1f} s after the load stopped"
    )


@pytest.mark.parametrize(
    ("how", "workers"),
    [("SIGTERM", 2), ("SIGINT", 2), ("SIGTERM", 1), ("SIGKILL", 2)],
    ids=["sigterm", "sigint", "sigterm-one-worker", "sigkill"],
)
def test_stopping_serve_leaves_no_deliverer(
    demo_store_rw: Store, tmp_path: Path, how: str, workers: int
) -> None:
    """SIGTERM or Ctrl-C of `flywheel serve` stops its deliverer and the standby (after the
    workers); killed outright, serve cannot, and both notice their supervisor is gone and stop."""
    # its own home: the module's `served` holds demo_store_rw's deliverer.lock until the module ends
    served = _serve(demo_store_rw, tmp_path / "serve.log", workers=workers, home=tmp_path / "home")
    try:
        pid, _ = served.delivering()
        standby, _ = served.standby(pid)
        deliverers = [psutil.Process(pid), psutil.Process(standby)]
        served.proc.send_signal(getattr(signal, how))  # serve alone, not its process group
        code = served.proc.wait(timeout=120)
        if how != "SIGKILL":
            assert code == 0, served.log.read_text()[-3000:]
        gone, alive = psutil.wait_procs(deliverers, timeout=60)
        assert not alive, f"deliverers {[p.pid for p in alive]} outlived `flywheel serve` ({how})"
        log = served.log.read_text()
        assert f"deliverer [{pid}]: stopped" in log, log[-3000:]
        assert f"deliverer [{standby}]: stopped, a standby" in log, log[-3000:]
    finally:
        stop_group(served.proc)
