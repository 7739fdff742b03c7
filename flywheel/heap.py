"""Keep Python's cyclic garbage collector off a serving process's long-lived heap.

A serving worker holds about a million long-lived objects (MLflow, DSPy, LiteLLM, pydantic, the
loaded programs). Every full (generation 2) collection walks all of them: under load that took
0.3 to 1.2 s of wall time in a worker, several times a minute, and every request in flight on
that worker waited (benchmarks/RESULTS.md, 2026-12-08). `settle()` moves what exists now into
the permanent generation (`gc.freeze()`), which collections skip; a process calls it once it has
built its long-lived state (a worker after it started, and after it loaded a program).

Frozen objects are still freed by reference counting; only a reference cycle among them, left
unreachable later, stays in memory: a loaded program replaced by a promotion, at most.
"""

from __future__ import annotations

import gc


def settle() -> int:
    """Freeze everything the cyclic collector tracks now; returns the frozen count."""
    gc.freeze()
    return gc.get_freeze_count()
