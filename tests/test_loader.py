"""The loader on a real sqlite MLflow store: per-version cache, promotions seen, DSPy settings left alone."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import dspy
import pytest
from dspy.utils.callback import BaseCallback

from flywheel import registry
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
