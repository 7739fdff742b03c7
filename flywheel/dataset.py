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
from dataclasses import dataclass
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


@dataclass(frozen=True)
class Split:
    train: list[dspy.Example]
    dev: list[dspy.Example]
    duplicates: int


def split_examples(
    examples: Sequence[dspy.Example],
    input_fields: Sequence[str],
    *,
    dev_fraction: float = 0.25,
    seed: int = 0,
) -> Split:
    """Deduplicate by inputs (first occurrence wins: export lists the newest judgement first), then split.

    An example goes to dev when a seeded hash of its inputs falls below `dev_fraction`,
    so its side depends only on itself: as feedback accumulates over turns, an example
    never moves from dev into train, and no version the loop trained has seen a later
    turn's dev rows. At least one example lands on each side when there are two or more.
    """
    unique: dict[str, dspy.Example] = {}
    for example in examples:
        unique.setdefault(example_key(example, input_fields), example)
    ranked = sorted(unique, key=lambda k: (_unit(seed, k), k))
    dev_keys = [k for k in ranked if _unit(seed, k) < dev_fraction]
    if dev_fraction > 0 and len(ranked) >= 2:
        dev_keys = dev_keys[: len(ranked) - 1] or ranked[:1]
    chosen = set(dev_keys)
    train = [unique[k] for k in sorted(unique) if k not in chosen]
    random.Random(seed).shuffle(train)
    return Split(train, [unique[k] for k in dev_keys], len(examples) - len(unique))


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
    data: TrainingData, input_fields: list[str], output_fields: list[str], dev_fraction: float, seed: int
) -> TrainingSet:
    """Rows that carry every field become examples (the rest are skipped), then dedup + split."""
    rows = read_rows(data)
    examples, sources = [], {}
    for row in rows:
        if any(row.get(f) in (None, "") for f in (*input_fields, *output_fields)):
            continue
        values = {f: row[f] for f in (*input_fields, *output_fields)}
        examples.append(dspy.Example(**values).with_inputs(*input_fields))
        sources.setdefault(example_key(row, input_fields), dict(row))
    split = split_examples(examples, input_fields, dev_fraction=dev_fraction, seed=seed)
    return TrainingSet(split, sources, list(input_fields), len(rows), len(rows) - len(examples))
