"""Registry renewals shared by one host's processes (flywheel.host_reads): one asks, the others take
its answer, dated when it was read. Each `HostReads` opens its own lock file descriptor, so threads
here contend for the `flock` as the worker processes of a host do."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import dspy
import pytest

from flywheel import canary, registry
from flywheel.host_reads import HostReads, monotonic_at
from flywheel.loader import Loader
from flywheel.store import Store


def _asker(calls: list[float], value: Any = "v1", seconds: float = 0.0) -> Callable[[], Any]:
    def ask() -> Any:
        calls.append(time.time())
        time.sleep(seconds)
        return value

    return ask


def test_one_of_four_processes_asks_and_the_others_take_its_answer(tmp_path: Path) -> None:
    calls: list[float] = []
    start = threading.Barrier(4)
    got: list[tuple[Any, float]] = []

    def worker() -> None:
        reads = HostReads(tmp_path)  # each "process" its own
        start.wait()
        got.append(reads.read("resolve\0jokes\0Production", 10, _asker(calls, {"version": "2"}, 0.3)))

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1  # the others waited on the lock, then took the answer
    assert len(got) == 4 and all(g == got[0] for g in got) and got[0][0] == {"version": "2"}


def test_an_answer_is_dated_when_it_was_read_and_asked_again_once_too_old(tmp_path: Path) -> None:
    calls: list[float] = []
    reads = HostReads(tmp_path)
    value, at = reads.read("k", 0.5, _asker(calls))
    time.sleep(0.3)
    again, at_again = HostReads(tmp_path).read("k", 0.5, _asker(calls, "v2"))
    assert (again, at_again, len(calls)) == (value, at, 1)  # not re-dated when taken
    assert abs((time.monotonic() - monotonic_at(at_again)) - (time.time() - at)) < 0.05
    time.sleep(0.3)  # now 0.6 s old: past `within`
    assert HostReads(tmp_path).read("k", 0.5, _asker(calls, "v2"))[0] == "v2" and len(calls) == 2


def test_a_failed_read_is_not_shared(tmp_path: Path) -> None:
    def down() -> Any:
        raise ConnectionError("the registry does not answer")

    with pytest.raises(ConnectionError):
        HostReads(tmp_path).read("k", 10, down)
    calls: list[float] = []
    assert HostReads(tmp_path).read("k", 10, _asker(calls, "v"))[0] == "v" and len(calls) == 1


def test_an_unusable_directory_means_asking(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a directory")
    calls: list[float] = []
    reads = HostReads(tmp_path / "file" / "reads")
    assert reads.read("k", 10, _asker(calls))[0] == "v1"
    assert reads.read("k", 10, _asker(calls))[0] == "v1" and len(calls) == 2


def _jokes(tmp_path: Path, make_store: Callable[..., Store], *jokes: str) -> Store:
    """A store whose "jokes" has a version per joke, the first in Production; a 30 s TTL."""
    store = make_store(tmp_path / "home", FLYWHEEL_RESOLVE_TTL="30")
    for joke in jokes:
        program = dspy.Predict("topic -> joke")
        program.demos = [dspy.Example(topic="anything", joke=joke)]
        registry.register_program(program, "jokes", store=store)
    registry.promote("jokes", "1", "Production", store)
    return store


def _counted(monkeypatch: pytest.MonkeyPatch, name: str) -> list[tuple[Any, ...]]:
    """The real registry function, counted."""
    real, calls = getattr(registry, name), []

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(registry, name, counted)
    return calls


def test_the_renewals_of_a_hosts_loaders_ask_the_registry_once(
    tmp_path: Path, make_store: Callable[..., Store], monkeypatch: pytest.MonkeyPatch
) -> None:
    store = _jokes(tmp_path, make_store, "one")
    loaders = [Loader(store) for _ in range(4)]  # the 4 workers of one host
    for loader in loaders:
        loader.load("jokes", "Production")
    calls = _counted(monkeypatch, "resolve")
    for loader in loaders:  # each worker's refresh ahead
        assert loader.resolve("jokes", "Production", renew=True).version == "1"
    assert len(calls) == 1  # before: 4, one per worker


def test_a_change_made_in_this_process_is_never_hidden_by_the_hosts_answer(
    tmp_path: Path, make_store: Callable[..., Store]
) -> None:
    store = _jokes(tmp_path, make_store, "one", "two")
    first, second = Loader(store), Loader(store)
    first.load("jokes", "Production")
    second.load("jokes", "Production")
    assert first.resolve("jokes", "Production", renew=True).version == "1"  # the host's answer: 1
    registry.promote("jokes", "2", "Production", store)  # this process: its generation moves
    assert second.resolve("jokes", "Production", renew=True).version == "2"
    assert second.load("jokes", "Production").version == "2"


def test_the_traffic_plan_renewals_of_a_host_read_the_tags_once(
    tmp_path: Path, make_store: Callable[..., Store], monkeypatch: pytest.MonkeyPatch
) -> None:
    store = _jokes(tmp_path, make_store, "one")
    canary.set_canary(store, "jokes", "1", 0.25)
    plans = [canary.TrafficPlans(store, ttl=30) for _ in range(4)]
    for p in plans:
        assert p.get("jokes").share == 0.25  # a first read asks
    calls = _counted(monkeypatch, "model_tags")
    assert all(p.get("jokes", shared=True).share == 0.25 for p in plans)
    assert len(calls) == 1
