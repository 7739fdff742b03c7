"""A serving process freezes its long-lived heap (flywheel.heap), so full collections skip it."""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterator
from pathlib import Path

import dspy
import pytest

from flywheel import heap, registry
from flywheel.loader import Loader
from flywheel.store import Store


@pytest.fixture
def unfrozen() -> Iterator[None]:
    gc.unfreeze()
    yield
    gc.unfreeze()  # the rest of the test session collects as before


def test_settle_freezes_what_the_collector_tracks(unfrozen: None) -> None:
    tracked = len(gc.get_objects())
    assert heap.settle() >= tracked * 0.9 and gc.get_freeze_count() >= tracked * 0.9
    assert len(gc.get_objects()) < tracked / 10  # what a full collection walks now


def test_loading_a_program_settles_the_heap(
    tmp_path: Path, make_store: Callable[..., Store], unfrozen: None
) -> None:
    store = make_store(tmp_path / "home")
    program = dspy.Predict("topic -> joke")
    registry.register_program(program, "jokes", store=store)
    registry.promote("jokes", "1", "Production", store)
    gc.unfreeze()
    Loader(store).load("jokes", "Production")
    assert gc.get_freeze_count() > 0  # before: nothing frozen, every object walked by each gen-2 collection
