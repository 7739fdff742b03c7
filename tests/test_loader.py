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


def test_requests_past_the_ttl_are_served_at_once_while_one_thread_resolves_again(
    tmp_path: Path, make_store: Callable[..., Store], monkeypatch: pytest.MonkeyPatch
) -> None:
    """32 concurrent requests (peek, else load, as serving does) past the TTL: every one is answered
    from memory and the registry is asked once. Before: peek missed and each request resolved."""
    store = make_store(tmp_path / "home", FLYWHEEL_RESOLVE_TTL="0")  # every resolution is stale at once
    _register(store, "one")
    registry.promote("jokes", "1", "Production", store)
    loader = Loader(store)
    first = loader.load("jokes", "Production")

    real, calls, changed, release = registry.resolve, [], threading.Condition(), threading.Event()

    def counted(*args: Any, **kwargs: Any) -> registry.VersionInfo:  # the real resolve, counted and held
        with changed:
            calls.append(args)
            changed.notify_all()
        release.wait(60)
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
    with changed:  # all answered while the one resolve is held, or a second resolve began
        changed.wait_for(lambda: (len(answered) == 32 and calls) or len(calls) >= 2, timeout=60)
        resolves = len(calls)
    release.set()
    for t in threads:
        t.join()
    _refreshes_done()
    assert resolves == 1
    assert len(answered) == 32 and all(got is first for got in answered)


@pytest.mark.slow
def test_a_promotion_by_another_process_is_picked_up_without_a_request_waiting(
    tmp_path: Path, make_store: Callable[..., Store]
) -> None:
    store = make_store(tmp_path / "home", FLYWHEEL_RESOLVE_TTL="0.2")
    for joke in ("one", "two"):
        _register(store, joke)
    registry.promote("jokes", "1", "Production", store)
    loader = Loader(store)
    assert loader.load("jokes", None).version == "1"
    subprocess.run(
        [sys.executable, "-m", "flywheel", "promote", "jokes", "2", "Production"],
        check=True,
        capture_output=True,
    )
    seen: list[str] = []
    deadline = time.monotonic() + 120  # a safety net, not a speed bound: the TTL plus one load
    while time.monotonic() < deadline and seen[-1:] != ["2"]:
        got = loader.peek("jokes", None)
        assert got is not None, f"peek missed after serving {seen[-1:]}"  # never a wait for the registry
        seen.append(got.version)
        time.sleep(0.01)
    assert seen[0] == "1" and seen[-1] == "2"
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

    assert loader.peek("jokes", "Production") is first  # stale, and a refresh starts
    _refreshes_done()
    assert loader.resolve("jokes", "Production").version == "2"  # the refresh saw the move
    assert loader.peek("jokes", "Production") is first  # and version 1 keeps serving
    _refreshes_done()

    shutil.rmtree(blocker)  # the disk is fixed: a later refresh loads version 2 and swaps it in
    deadline = time.monotonic() + 120  # a safety net, not a speed bound
    while time.monotonic() < deadline:
        got = loader.peek("jokes", "Production")
        assert got is not None
        if got.version == "2":
            break
        _refreshes_done()
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
    first = loader.load("jokes", "Production")
    store.client.delete_model_version_tag("jokes", "2", registry.CONTENT_TAG)  # raw MLflow, no flywheel
    store.client.set_registered_model_alias("jokes", "Production", "2")

    assert loader.peek("jokes", "Production") is first  # stale until the refresh has looked
    _refreshes_done()
    assert loader.peek("jokes", "Production") is None
    with pytest.raises(UntrustedVersion, match="not registered by flywheel"):
        loader.load("jokes", "Production")
