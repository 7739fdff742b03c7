"""Training data for a compile: rows from anywhere -> deduplicated, seeded train/dev split.

Kept apart from compile.py so the split rules (no dev leakage, stable sides as
feedback accumulates) read on their own.
"""

from __future__ import annotations

import csv
import hashlib
import json
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dspy

TrainingData = Sequence[Mapping[str, Any]] | Sequence[dspy.Example] | str | Path | Any


def read_rows(data: TrainingData) -> list[dict[str, Any]]:
    """Rows from export_rows, dspy.Examples, a DataFrame or a CSV path, as plain dicts."""
    if isinstance(data, (str, Path)):
        with open(data, newline="", encoding="utf-8") as handle:
            return [dict(row) for row in csv.DictReader(handle)]
    if hasattr(data, "to_dict") and hasattr(data, "columns"):  # a pandas DataFrame
        return [dict(row) for row in data.to_dict("records")]
    return [dict(row.toDict() if isinstance(row, dspy.Example) else row) for row in data]


def normalize(value: Any) -> str:
    """Text compared without case or spacing differences (dedup keys and exact-match metrics)."""
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    return " ".join(text.split()).casefold()


def example_key(example: dspy.Example | Mapping[str, Any], input_fields: Sequence[str]) -> str:
    """Identity of an example by its inputs only: the same input never lands on both sides."""
    return json.dumps([normalize(example.get(f, "")) for f in input_fields])


def _unit(seed: int, key: str) -> float:
    digest = hashlib.sha256(f"{seed}\x00{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


TRAIN, DEV = "train", "dev"


@dataclass(frozen=True)
class Split:
    train: list[dspy.Example]
    dev: list[dspy.Example]
    duplicates: int
    sides: dict[str, str] = field(default_factory=dict)  # example key -> TRAIN/DEV, earlier turns included

    @property
    def heldout_keys(self) -> set[str]:
        """Every key ever put on the dev side (here or by an earlier split this one continues)."""
        return {k for k, side in self.sides.items() if side == DEV}


def split_examples(
    examples: Sequence[dspy.Example],
    input_fields: Sequence[str],
    *,
    dev_fraction: float = 0.25,
    seed: int = 0,
    sides: Mapping[str, str] | None = None,
) -> Split:
    """Deduplicate by inputs (first occurrence wins: export lists the newest judgement first), then split.

    An example goes to dev when a seeded hash of its inputs falls below `dev_fraction`,
    so its side depends only on itself: as feedback accumulates over turns, an example
    never moves from dev into train, and no version the loop trained has seen a later
    turn's dev rows. At least one example lands on each side when there are two or more.

    `sides` (key -> "train"/"dev", from the splits of earlier turns) pins those examples to
    the side they had, whatever the seed, fraction or set size now: the held-out set only
    grows, and a row once held out is never trained on. Only new examples are hashed (and
    only they move to keep a side non-empty). The returned `sides` is the earlier mapping
    updated with this split, for the next turn.
    """
    pinned = dict(sides or {})
    unique: dict[str, dspy.Example] = {}
    for example in examples:
        unique.setdefault(example_key(example, input_fields), example)
    new = sorted((k for k in unique if pinned.get(k) not in (TRAIN, DEV)), key=lambda k: (_unit(seed, k), k))
    new_dev = [k for k in new if _unit(seed, k) < dev_fraction]
    old_dev = [k for k in unique if pinned.get(k) == DEV]
    old_train = [k for k in unique if pinned.get(k) == TRAIN]
    if dev_fraction > 0 and len(unique) >= 2:
        if not old_train and len(new_dev) == len(new) and new_dev:
            new_dev = new_dev[:-1]  # keep one row to train on
        if not old_dev and not new_dev and new:
            new_dev = new[:1]  # and one to evaluate on
    chosen = set(old_dev) | set(new_dev)
    train = [unique[k] for k in sorted(unique) if k not in chosen]
    random.Random(seed).shuffle(train)
    dev_keys = sorted(old_dev, key=lambda k: (_unit(seed, k), k)) + new_dev
    pinned.update({k: (DEV if k in chosen else TRAIN) for k in unique})
    return Split(train, [unique[k] for k in dev_keys], len(examples) - len(unique), pinned)


@dataclass(frozen=True)
class TrainingSet:
    """A split plus where each example came from (its exported row: trace id, comment)."""

    split: Split
    sources: dict[str, dict[str, Any]]
    input_fields: list[str]
    rows: int
    skipped: int

    def trace_ids(self, side: str) -> list[str]:
        part = self.split.train if side == "train" else self.split.dev
        ids = {self.source(e).get("trace_id") for e in part}
        return sorted(str(i) for i in ids if i)

    def source(self, example: dspy.Example) -> dict[str, Any]:
        return self.sources.get(example_key(example, self.input_fields), {})

    def comments(self) -> dict[str, str]:
        return {k: str(r["comment"]) for k, r in self.sources.items() if r.get("comment")}

    def frame(self, examples: Sequence[dspy.Example]) -> Any:
        """The rows as MLflow's dataset sees them: fields (objects as JSON, so they hash) + source trace."""
        import pandas as pd

        def cell(value: Any) -> Any:
            return json.dumps(value, default=str) if isinstance(value, (dict, list)) else value

        return pd.DataFrame(
            [
                {**{k: cell(v) for k, v in e.toDict().items()}, "trace_id": self.source(e).get("trace_id")}
                for e in examples
            ]
        )


def prepare(
    data: TrainingData,
    input_fields: list[str],
    output_fields: list[str],
    dev_fraction: float,
    seed: int,
    sides: Mapping[str, str] | None = None,
) -> TrainingSet:
    """Rows that carry every field become examples (the rest are skipped), then dedup + split
    (`sides`: see split_examples)."""
    rows = read_rows(data)
    examples, sources = [], {}
    for row in rows:
        if any(row.get(f) in (None, "") for f in (*input_fields, *output_fields)):
            continue
        values = {f: row[f] for f in (*input_fields, *output_fields)}
        examples.append(dspy.Example(**values).with_inputs(*input_fields))
        sources.setdefault(example_key(row, input_fields), dict(row))
    split = split_examples(examples, input_fields, dev_fraction=dev_fraction, seed=seed, sides=sides)
    return TrainingSet(split, sources, list(input_fields), len(rows), len(rows) - len(examples))
