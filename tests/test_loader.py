"""The loader on a real sqlite MLflow store: per-version cache, promotions seen, DSPy settings left
alone, and stale while revalidate (one background refresh per reference, never a request waiting)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import dspy
import pytest
from dspy.utils.callback import BaseCallback

from flywheel import registry
from flywheel.errors import UntrustedVersion
from flywheel.lm import make_lm
from flywheel.loader import LoadedProgram, Loader
from flywheel.store import Store


def _program(joke: str) -> dspy.Module:
    program = dspy.Predict("topic -> joke")
    program.demos = [dspy.Example(topic="anything", joke=joke)]
    return program


def _register(store: Store, joke: str, **tags: str) -> registry.VersionInfo:
    return registry.register_program(
        _program(joke), "jokes", description=f"says {joke}", tags=tags, store=store
    )


def _answer(loaded: LoadedProgram) -> str:
    with dspy.context(lm=make_lm()):
        return loaded.program(topic="anything").joke


def test_load_caches_by_resolved_version_and_sees_promotion_at_once(fresh_store: Store) -> None:
    for joke in ("one", "two"):
        _register(fresh_store, joke)
    registry.promote("jokes", "1", "Production", fresh_store)
    loader = Loader(fresh_store)
    first = loader.load("jokes", "Production")
    assert loader.load("jokes", "Production") is first  # cache hit
    assert loader.load("jokes", "1") is first  # same version, same object
    assert _answer(first) == "one"
    registry.promote("jokes", "2", "Production", fresh_store)
    second = loader.load("jokes", "Production")
    assert second.version == "2" and _answer(second) == "two"
    assert loader.cached_versions() == [("jokes", "1"), ("jokes", "2")]


@pytest.mark.slow
def test_promotion_by_another_process_is_seen_within_the_resolve_ttl(
    fresh_store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flywheel.config import get_settings
    from flywheel.store import connect, reset

    for joke in ("one", "two"):
        _register(fresh_store, joke)
    registry.promote("jokes", "1", "Production", fresh_store)
    monkeypatch.setenv("FLYWHEEL_RESOLVE_TTL", "0.5")
    get_settings.cache_clear()
    reset()
    loader = Loader(connect())
    assert loader.load("jokes", None).version == "1"
    subprocess.run(
        [sys.executable, "-m", "flywheel", "promote", "jokes", "2", "Production"],
        check=True,
        capture_output=True,
    )
    time.sleep(0.6)
    assert loader.load("jokes", None).version == "2"


def test_load_leaves_global_dspy_settings_alone_from_a_server_thread(fresh_store: Store) -> None:
    _register(fresh_store, "one")

    class Marker(BaseCallback):
        pass

    marker, lm = Marker(), make_lm()
    before = dict(dspy.settings.config)
    with dspy.context(lm=lm, callbacks=[marker]):
        loaded: list[LoadedProgram] = []
        loader = Loader(fresh_store)
        errors: list[BaseException] = []

        def work() -> None:
            try:
                loaded.append(loader.load("jokes", "1"))
            except BaseException as exc:  # surfaced below
                errors.append(exc)

        threads = [threading.Thread(target=work) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        assert len({id(x) for x in loaded}) == 1  # loaded once, shared by every thread
        assert dspy.settings.lm is lm and dspy.settings.callbacks == [marker]
    assert dict(dspy.settings.config).keys() == before.keys()
    assert dspy.settings.lm is before.get("lm")


# --- stale while revalidate: `peek` serves what it has and refreshes in one background thread ---


def _refreshes_done() -> None:
    """Wait for the loader's background refreshes that are running now."""
    for thread in threading.enumerate():
        if thread.name == "flywheel-loader-refresh":
            thread.join(60)
            assert not thread.is_alive(), "a background refresh did not end"


@pytest.mark.parametrize(
    ("expired", "down"), [(False, False), (True, False), (True, True)], ids=["half-ttl", "ttl", "ttl-down"]
)
def test_concurrent_requests_make_one_resolve(
    tmp_path: Path,
    make_store: Callable[..., Store],
    monkeypatch: pytest.MonkeyPatch,
    expired: bool,
    down: bool,
) -> None:
    """32 concurrent requests (peek, else load, as serving does) on a resolution past half its TTL
    are every one answered from memory while one background thread resolves again; past the whole
    TTL (TTL 0) they wait for one resolve, the same for all, also when that one fails (the registry
    down: all are served what was resolved last, none asks again). Before: 32 resolves."""
    store = make_store(tmp_path / "home", FLYWHEEL_RESOLVE_TTL="0" if expired else "5")
    _register(store, "one")
    registry.promote("jokes", "1", "Production", store)
    loader = Loader(store)
    first = loader.load("jokes", "Production")
    if not expired:
        time.sleep(2.6)  # past half the TTL, far from its end

    real, calls, changed, release = registry.resolve, [], threading.Condition(), threading.Event()

    def counted(*args: Any, **kwargs: Any) -> registry.VersionInfo:  # the real resolve, counted and held
        with changed:
            calls.append(args)
            changed.notify_all()
        release.wait(60)
        if down:
            raise ConnectionError("the registry does not answer")
        return real(*args, **kwargs)

    monkeypatch.setattr(registry, "resolve", counted)
    answered: list[LoadedProgram] = []

    def request() -> None:
        got = loader.peek("jokes", "Production") or loader.load("jokes", "Production")
        with changed:
            answered.append(got)
            changed.notify_all()

    threads = [threading.Thread(target=request) for _ in range(32)]
    for t in threads:
        t.start()
    with changed:
        if expired:  # every request waits for the one resolve held; a second one would come now
            changed.wait_for(lambda: len(calls) >= 2 or len(answered) > 0, timeout=3)
            assert answered == []
        else:  # all answered while the one resolve is held, or a second resolve began
            changed.wait_for(lambda: (len(answered) == 32 and calls) or len(calls) >= 2, timeout=60)
            assert len(answered) == 32
        resolves = len(calls)
    release.set()
    for t in threads:
        t.join()
    _refreshes_done()
    assert resolves == 1 and len(calls) == 1  # and none of those who waited asked again
    assert len(answered) == 32 and all(got is first for got in answered)


@pytest.mark.slow
def test_a_promotion_by_another_process_is_picked_up_without_a_request_waiting(
    tmp_path: Path, make_store: Callable[..., Store]
) -> None:
    store = make_store(tmp_path / "home", FLYWHEEL_RESOLVE_TTL="2")
    for joke in ("one", "two"):
        _register(store, joke)
    registry.promote("jokes", "1", "Production", store)
    loader = Loader(store)
    assert loader.load("jokes", None).version == "1"
    seen: list[str] = []
    missed: list[int] = []
    stop = threading.Event()

    def traffic() -> None:  # a request every 10 ms, before, during and after the promotion
        while not stop.is_set() and seen[-1:] != ["2"]:
            got = loader.peek("jokes", None)
            if got is None:  # would have waited for the registry
                missed.append(len(seen))
                got = loader.load("jokes", None)
            seen.append(got.version)
            time.sleep(0.01)

    thread = threading.Thread(target=traffic)
    thread.start()
    try:
        subprocess.run(
            [sys.executable, "-m", "flywheel", "promote", "jokes", "2", "Production"],
            check=True,
            capture_output=True,
        )
        thread.join(120)  # a safety net, not a speed bound: the TTL plus one load
    finally:
        stop.set()
        thread.join()
    assert seen[0] == "1" and seen[-1] == "2"
    assert missed == []  # under traffic, every request was answered from memory
    assert _answer(loader.peek("jokes", None) or loader.load("jokes", None)) == "two"


def test_a_refresh_that_cannot_load_the_new_version_keeps_serving_the_old_one(
    tmp_path: Path, make_store: Callable[..., Store]
) -> None:
    store = make_store(tmp_path / "home", FLYWHEEL_RESOLVE_TTL="0")
    _register(store, "one")
    second = _register(store, "two")
    registry.promote("jokes", "1", "Production", store)
    loader = Loader(store)
    first = loader.load("jokes", "Production")
    # this host cannot store version 2 (its place on disk is taken), and Production moves to it
    # as another process's promotion would (no in-process generation change)
    blocker = loader.lkg.model_dir(second)
    blocker.mkdir(parents=True)
    (blocker / "in-the-way").write_text("x")
    store.client.set_registered_model_alias("jokes", "Production", "2")

    def serve() -> LoadedProgram:  # what serving does: memory, else load (TTL 0: load each time)
        return loader.peek("jokes", "Production") or loader.load("jokes", "Production")

    assert serve() is first  # version 2 cannot be fetched: version 1 keeps serving
    assert loader.resolve("jokes", "Production").version == "2"  # though the move was seen
    assert serve() is first

    shutil.rmtree(blocker)  # the disk is fixed: the next request loads version 2
    got = serve()
    assert got.version == "2" and _answer(got) == "two"


def test_a_refresh_that_finds_an_untrusted_version_stops_serving_from_memory(
    tmp_path: Path, make_store: Callable[..., Store]
) -> None:
    """As without the cache: once the reference names a version flywheel refuses, requests get 409."""
    store = make_store(tmp_path / "home", FLYWHEEL_RESOLVE_TTL="0")
    _register(store, "one")
    _register(store, "two")
    registry.promote("jokes", "1", "Production", store)
    loader = Loader(store)
    assert loader.load("jokes", "Production").version == "1"
    store.client.delete_model_version_tag("jokes", "2", registry.CONTENT_TAG)  # raw MLflow, no flywheel
    store.client.set_registered_model_alias("jokes", "Production", "2")

    assert loader.peek("jokes", "Production") is None  # TTL 0: nothing is served unresolved
    with pytest.raises(UntrustedVersion, match="not registered by flywheel"):
        loader.load("jokes", "Production")
    assert loader.peek("jokes", "Production") is None  # and the refused one is not in memory


def test_a_registry_that_hangs_never_makes_a_request_wait(
    tmp_path: Path, make_store: Callable[..., Store], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The registry stops answering (a hung tracking server: each call waits out MLflow's timeout).
    Past the TTL, requests keep being served what was resolved last while the one background
    refresh waits, and after it fails, too. Before: every request past the TTL waited for it."""
    store = make_store(tmp_path / "home", FLYWHEEL_RESOLVE_TTL="1")
    _register(store, "one")
    registry.promote("jokes", "1", "Production", store)
    loader = Loader(store)
    first = loader.load("jokes", "Production")
    release, calls = threading.Event(), []

    def hung(*args: Any, **kwargs: Any) -> registry.VersionInfo:
        calls.append(args)
        release.wait(60)
        raise ConnectionError("read timed out")

    monkeypatch.setattr(registry, "resolve", hung)
    time.sleep(0.6)
    assert loader.peek("jokes", "Production") is first  # past half the TTL: the refresh starts
    time.sleep(1.0)  # past the whole TTL, the refresh still hanging
    assert loader.peek("jokes", "Production") is first
    release.set()
    _refreshes_done()
    time.sleep(1.1)  # the fall-back resolution expired too
    assert loader.peek("jokes", "Production") is first  # and still nobody waits
    _refreshes_done()
    assert len(calls) == 2  # the two background refreshes, never a request
