"""Loading registered programs, with a time-limited resolution cache owned by one runtime.

A `Loader` belongs to whoever built it (normally the `Runtime`), so two stores
in one process never share or empty each other's caches. A reference (stage,
alias, `latest`) is remembered for FLYWHEEL_RESOLVE_TTL seconds: the bound on
how long another process's promotion takes to be seen here. A change made in
this process (registry.generation) is seen at once. When the registry cannot
be reached, the last resolution keeps serving.
"""

from __future__ import annotations

import threading
import time
import warnings
from dataclasses import dataclass

import dspy
import mlflow

from flywheel import registry
from flywheel.errors import ModelNotFound
from flywheel.registry import VersionInfo
from flywheel.store import Store, quiet


@dataclass(frozen=True)
class LoadedProgram:
    info: VersionInfo
    program: dspy.Module

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def version(self) -> str:
        return self.info.version


@dataclass(frozen=True)
class _Resolved:
    at: float
    generation: int
    info: VersionInfo


class Loader:
    """Resolve references and load programs for one store; safe to share between threads."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._lock = threading.Lock()
        self._programs: dict[tuple[str, str], LoadedProgram] = {}
        self._resolved: dict[tuple[str, str], _Resolved] = {}
        self._loading: dict[tuple[str, str], threading.Lock] = {}

    def _ref_key(self, ref: str | int | None) -> str:
        return str(ref if ref is not None else self.store.settings.default_model_stage)

    def _fresh(self, name: str, hit: _Resolved | None, now: float) -> bool:
        return (
            hit is not None
            and now - hit.at < self.store.settings.flywheel_resolve_ttl
            and hit.generation == registry.generation(self.store, name)
        )

    def resolve(self, name: str, ref: str | int | None = None) -> VersionInfo:
        """registry.resolve, remembered for FLYWHEEL_RESOLVE_TTL seconds."""
        key = (name, self._ref_key(ref))
        now = time.monotonic()
        gen = registry.generation(self.store, name)
        with self._lock:
            hit = self._resolved.get(key)
        if self._fresh(name, hit, now) and hit is not None:
            return hit.info
        try:
            info = registry.resolve(name, ref, self.store)
        except ModelNotFound:
            raise
        except Exception:
            if hit is None:
                raise
            with self._lock:  # the registry is unreachable: keep serving what was resolved last,
                self._resolved[key] = _Resolved(now, gen, hit.info)  # and ask again after another TTL
            return hit.info
        with self._lock:
            self._resolved[key] = _Resolved(now, gen, info)
        return info

    def peek(self, name: str, ref: str | int | None) -> LoadedProgram | None:
        """The loaded program when both its resolution and the program are cached, else None.

        Pure memory: the serving hot path calls this on the event loop and only
        falls back to a thread for `load` on a miss.
        """
        if not self.store.settings.model_cache_enabled:
            return None
        with self._lock:
            hit = self._resolved.get((name, self._ref_key(ref)))
        if not self._fresh(name, hit, time.monotonic()) or hit is None:
            return None
        with self._lock:
            return self._programs.get((hit.info.name, hit.info.version))

    def load(self, name: str, ref: str | int | None = None) -> LoadedProgram:
        """The program a reference names, loaded once per version and shared between threads.

        Loads through pyfunc's loader, which (unlike `mlflow.dspy.load_model`) leaves
        the global dspy.settings and tracing callbacks alone and works off the main thread.
        """
        info = self.resolve(name, ref)
        key = (info.name, info.version)
        if not self.store.settings.model_cache_enabled:
            return LoadedProgram(info, load_program(self.store, info))
        with self._lock:
            if key in self._programs:
                return self._programs[key]
            key_lock = self._loading.setdefault(key, threading.Lock())
        with key_lock:
            with self._lock:
                if key in self._programs:
                    return self._programs[key]
            loaded = LoadedProgram(info, load_program(self.store, info))
            with self._lock:
                self._programs[key] = loaded
            return loaded

    def output_fields(self, name: str, version: str) -> list[str]:
        """A version's output fields: from the cache when loaded, so it works while MLflow is down."""
        with self._lock:
            loaded = self._programs.get((name, str(version)))
        if loaded is not None:
            return loaded.info.output_fields
        try:
            return registry.get_version(name, version, self.store).output_fields
        except Exception:
            return []  # unknown or unreachable: corrections are then not checked field by field

    def cached_versions(self) -> list[tuple[str, str]]:
        with self._lock:
            return sorted(self._programs)

    def clear(self) -> None:
        with self._lock:
            self._programs.clear()
            self._resolved.clear()
            self._loading.clear()


def load_program(store: Store, info: VersionInfo) -> dspy.Module:
    """Load one version's DSPy program through pyfunc, leaving global and per-thread MLflow state alone."""
    with (
        store.fluent(),  # a models:/ URI resolves in the fluent registry: this store's
        store.active_model_preserved(),
        quiet("mlflow.tracking.fluent"),
        warnings.catch_warnings(),
    ):
        warnings.simplefilter("ignore")
        pyfunc = mlflow.pyfunc.load_model(info.uri)
    program = store.unwrap_pyfunc(pyfunc)
    if not isinstance(program, dspy.Module):
        raise TypeError(f"{info.uri} is not a DSPy program logged with the mlflow.dspy flavor")
    return program
