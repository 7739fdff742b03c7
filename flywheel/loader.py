"""Loading registered programs, with a time-limited resolution cache owned by one runtime,
and a last-known-good copy of both on disk.

A `Loader` belongs to whoever built it (normally the `Runtime`), so two stores
in one process never share or empty each other's caches. A reference (stage,
alias, `latest`) is remembered for FLYWHEEL_RESOLVE_TTL seconds: the bound on
how long another process's promotion takes to be seen here. A change made in
this process (registry.generation) is seen at once.

Refresh ahead, one flight: once a reference has served a program, serving (`peek`)
answers from memory. From half the TTL on, a request also starts one background
thread per reference (a single flight) that resolves it again and, when it names a
new version, loads that and swaps it in; under traffic a resolution is so renewed
before it expires and no request waits for the registry. Past the whole TTL after
an idle spell, `peek` answers nothing and the request resolves in `load`, one resolve
per reference however many wait (`_resolving`): nothing older than the TTL is served,
so a promotion is served by the first request after the TTL. When the registry is
slow or down (a refresh still runs past the TTL, or the last one fell back to what
was known) the program keeps serving and only the background thread waits for it
(the fall-back is logged once). A reference that now names a version flywheel
refuses, or nothing, stops serving from memory, so requests meet the 409 or 404 as
they would have without the cache.

Last known good: every resolution and every loaded version's artifacts are kept
under FLYWHEEL_HOME/last-known-good (`LastKnownGood`), shared by the host's
worker processes. On any registry error other than a definitive "not found" the
loader keeps serving what it resolved last, from memory or, in a cold or
restarted process, from disk; a reference this host never resolved, or a
version whose artifacts it never fetched, is `Unavailable` (503), not a 404.

Only what flywheel registered is unpickled: a version must carry `flywheel.registered=true` and
the sha256 of its files (`registry.CONTENT_TAG`), and the local copy must hash to it, checked
right before every load (`load_program`). Anything else is `UntrustedVersion` (409) and one
`refused-load` audit entry per version per process. A stage or alias found pointing somewhere
flywheel did not move it is written to the audit trail when it is resolved
(`registry.audit_outside_move`): only when the resolution differs from what this host knew
(memory, then its last-known-good disk), since that search reads up to 200 audit runs.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import socket
import threading
import time
import warnings
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import dspy
import mlflow

from flywheel import audit, heap, host_reads, registry
from flywheel.errors import ModelNotFound, Unavailable, UntrustedVersion
from flywheel.registry import VersionInfo
from flywheel.store import Store, is_missing, quiet

REGISTRY, FALLBACK = "mlflow", "last-known-good"  # where a resolution in memory came from
log = logging.getLogger("flywheel.loader")


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
    source: str = REGISTRY


def _key(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:32]


def _info_dict(info: VersionInfo) -> dict[str, Any]:
    data = asdict(info)
    data["created_at"] = info.created_at.isoformat()
    data["aliases"] = list(info.aliases)
    return data


def _info_from(data: dict[str, Any]) -> VersionInfo:
    data = dict(data)
    data["created_at"] = datetime.fromisoformat(data["created_at"])
    data["aliases"] = tuple(data["aliases"])
    return VersionInfo(**data)


class LastKnownGood:
    """Resolutions, version infos and model artifacts of one store, on this host's disk.

    Files are replaced atomically (write, then rename), so the worker processes of a
    host share them without locks.
    """

    def __init__(self, root: Path, store: Store) -> None:
        self.root = root / _key(store.tracking_uri)
        self.store = store

    def _write(self, path: Path, data: dict[str, Any]) -> None:
        host_reads.write_json(path, data)  # a full or read-only disk costs the fallback, never a request

    def _read(self, path: Path) -> dict[str, Any] | None:
        data = host_reads.read_json(path)
        return data if isinstance(data, dict) else None

    def _ref_path(self, name: str, ref: str) -> Path:
        return self.root / "refs" / f"{_key(name, ref)}.json"

    def _version_path(self, name: str, version: str) -> Path:
        return self.root / "versions" / _key(name) / f"{version}.json"

    def remember(self, name: str, ref: str, info: VersionInfo) -> None:
        self._write(self._ref_path(name, ref), {"name": name, "ref": ref, "info": _info_dict(info)})
        self.remember_version(info)

    def remember_version(self, info: VersionInfo) -> None:
        path = self._version_path(info.name, info.version)
        if self._read(path) != _info_dict(info):
            self._write(path, _info_dict(info))

    def resolution(self, name: str, ref: str) -> VersionInfo | None:
        data = self._read(self._ref_path(name, ref))
        try:
            return _info_from(data["info"]) if data else None
        except (KeyError, TypeError, ValueError):
            return None

    def version(self, name: str, version: str) -> VersionInfo | None:
        data = self._read(self._version_path(name, version))
        try:
            return _info_from(data) if data else None
        except (KeyError, TypeError, ValueError):
            return None

    def model_dir(self, info: VersionInfo) -> Path:
        return self.root / "models" / _key(info.name) / info.version

    def fetch(self, info: VersionInfo) -> Path:
        """The version's model directory on disk, downloaded once per host."""
        target = self.model_dir(info)
        if (target / "MLmodel").exists():
            return target
        staging = target.parent / f".{info.version}.{os.getpid()}.{threading.get_ident()}.tmp"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        try:
            # a models:/ URI resolves in the fluent registry: this store's
            with self.store.fluent(), quiet("mlflow.tracking.fluent"), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                got = mlflow.artifacts.download_artifacts(artifact_uri=info.uri, dst_path=str(staging))
            local = Path(got)
            if not (local / "MLmodel").exists():
                raise FileNotFoundError(f"{info.uri} has no MLmodel file")
            try:
                local.rename(target)
            except OSError:
                if not (target / "MLmodel").exists():  # not another process winning the race
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return target


class Loader:
    """Resolve references and load programs for one store; safe to share between threads."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.lkg = LastKnownGood(store.settings.flywheel_home / "last-known-good", store)
        self.host = host_reads.for_store(store)
        self._lock = threading.Lock()
        self._programs: dict[tuple[str, str], LoadedProgram] = {}
        self._resolved: dict[tuple[str, str], _Resolved] = {}
        self._loading: dict[tuple[str, str], threading.Lock] = {}
        self._served: dict[tuple[str, str], LoadedProgram] = {}  # per reference: what it served last
        self._refreshing: set[tuple[str, str]] = set()  # references a background thread resolves again
        self._resolving: dict[tuple[str, str], threading.Lock] = {}  # one registry resolve per reference
        # a version whose files did not match: not fetched again while its recorded hash is the same
        self._refused: dict[tuple[str, str], tuple[str | None, float, UntrustedVersion]] = {}

    def _ref_key(self, ref: str | int | None) -> str:
        return str(ref if ref is not None else self.store.settings.default_model_stage)

    def _fresh(self, name: str, hit: _Resolved | None, now: float) -> bool:
        return (
            hit is not None
            and now - hit.at < self.store.settings.flywheel_resolve_ttl
            and hit.generation == registry.generation(self.store, name)
        )

    def resolve(self, name: str, ref: str | int | None = None, *, renew: bool = False) -> VersionInfo:
        """registry.resolve, remembered for FLYWHEEL_RESOLVE_TTL seconds and kept on disk;
        `renew`: ask the registry even when the remembered resolution is fresh (a refresh ahead).

        On a registry error (anything but "not found"): the last resolution, from memory
        or from this host's disk; Unavailable when there is none.
        """
        key = (name, self._ref_key(ref))
        now = time.monotonic()
        gen = registry.generation(self.store, name)
        with self._lock:
            hit = self._resolved.get(key)
            resolving = self._resolving.setdefault(key, threading.Lock())
        if not renew and self._fresh(name, hit, now) and hit is not None:
            return hit.info
        with resolving:  # one flight: whoever waited here takes a resolution made since it asked
            with self._lock:
                latest = self._resolved.get(key)
            current = registry.generation(self.store, name)
            if latest is not None and latest.at >= now and latest.generation == current:
                return latest.info
            # a renewal of what this process has not changed may take the host's answer (host_reads)
            shared = renew and hit is not None and hit.generation == current
            return self._resolve(name, ref, key, hit, gen, shared=shared)

    def _ask(
        self, name: str, ref: str | int | None, key: tuple[str, str], shared: bool
    ) -> tuple[VersionInfo, float]:
        """The registry's resolution and when it was given (monotonic): asked now, or (`shared`)
        the answer another process of this host got less than half a TTL ago."""
        if not shared:
            return registry.resolve(name, ref, self.store), time.monotonic()
        data, wall = self.host.read(
            f"resolve\0{name}\0{key[1]}",
            self.store.settings.flywheel_resolve_ttl / 2,
            lambda: _info_dict(registry.resolve(name, ref, self.store)),
        )
        return _info_from(data), host_reads.monotonic_at(wall)

    def _resolve(
        self,
        name: str,
        ref: str | int | None,
        key: tuple[str, str],
        hit: _Resolved | None,
        gen: Any,
        *,
        shared: bool = False,
    ) -> VersionInfo:
        # a resolution is dated when it is known (the registry answered, or did not): whoever waited
        # for it meanwhile takes it (`resolve`), even while the registry takes its timeout to fail
        try:
            info, known_at = self._ask(name, ref, key, shared)
        except ModelNotFound:
            raise
        except Exception as exc:
            now = time.monotonic()
            known = hit.info if hit is not None else self.lkg.resolution(*key)
            if known is None:
                raise Unavailable(
                    f"the model registry cannot be reached ({type(exc).__name__}: {exc}) and this host "
                    f"has no last-known-good resolution of {name!r} ({key[1]})"
                ) from None
            if hit is None or hit.source != FALLBACK:
                log.warning(
                    "the model registry did not answer (%s: %s); %s (%s) serves version %s, as last resolved",
                    type(exc).__name__,
                    exc,
                    name,
                    key[1],
                    known.version,
                )
            with self._lock:  # keep serving what was resolved last, and ask again after another TTL
                self._resolved[key] = _Resolved(now, gen, known, FALLBACK)
            return known
        with self._lock:
            self._resolved[key] = _Resolved(known_at, gen, info, REGISTRY)
        known = hit.info if hit is not None else self.lkg.resolution(*key)
        if known is None or known.version != info.version:
            try:  # a new holder: did flywheel move the alias there? (once per change, not per request)
                registry.audit_outside_move(self.store, name, key[1], info)
            except Exception as exc:  # the audit never fails a request
                log.warning("could not check how %s (%s) moved: %s", name, key[1], exc)
        if hit is None or hit.info != info or hit.source != REGISTRY:
            self.lkg.remember(name, key[1], info)  # after the audit: a host that knew it has checked it
        return info

    def peek(self, name: str, ref: str | int | None) -> LoadedProgram | None:
        """The program this reference serves, without waiting: pure memory, so the serving hot
        path calls it on the event loop. From half the TTL on, one background thread also resolves
        the reference again (and loads what it names now). None when the resolution is older than
        the TTL (unless the registry is slow or down: a refresh still runs, or the last one fell
        back to what was known, which then keeps serving), the TTL is 0, this loader never loaded
        the reference, this process changed the model since, or the reference stopped serving
        (refused, removed): the caller runs `load` in a thread, which waits (one resolve per
        reference) or raises.
        """
        if not self.store.settings.model_cache_enabled:
            return None
        key = (name, self._ref_key(ref))
        with self._lock:
            hit = self._resolved.get(key)
            served = self._served.get(key)
        if hit is None or served is None or hit.generation != registry.generation(self.store, name):
            return None
        age, ttl = time.monotonic() - hit.at, self.store.settings.flywheel_resolve_ttl
        if ttl <= 0:
            return None  # TTL 0: every request resolves
        if age >= ttl:
            with self._lock:
                trying = key in self._refreshing
            if not trying and hit.source == REGISTRY:
                return None  # expired after an idle spell: the caller resolves (one flight) first
            # the registry is slow or down (a refresh still runs, or the last one fell back):
            # what was resolved last keeps serving, as last-known-good does, and nobody waits
        if age >= ttl / 2:
            self._refresh_in_background(name, ref, key)  # renewed before it expires
        return served

    def _refresh_in_background(self, name: str, ref: str | int | None, key: tuple[str, str]) -> None:
        """Resolve and load `ref` again in one thread per reference, however many requests ask."""
        with self._lock:
            if key in self._refreshing:
                return
            self._refreshing.add(key)

        def refresh() -> None:
            try:
                self.load(name, ref, renew=True)
            except (ModelNotFound, UntrustedVersion) as exc:  # `load` stopped serving it from memory
                log.warning("%s (%s) no longer serves from memory: %s", name, key[1], exc)
            except Exception as exc:  # the stale program keeps serving; the next TTL tries again
                log.warning("could not refresh %s (%s), serving what it served: %s", name, key[1], exc)
            finally:
                with self._lock:
                    self._refreshing.discard(key)

        threading.Thread(target=refresh, name="flywheel-loader-refresh", daemon=True).start()

    def load(self, name: str, ref: str | int | None = None, *, renew: bool = False) -> LoadedProgram:
        """The program a reference names, loaded once per version and shared between threads.

        Loads from this host's last-known-good copy of the version (fetched once) through
        pyfunc's loader, which (unlike `mlflow.dspy.load_model`) leaves the global
        dspy.settings and tracing callbacks alone and works off the main thread. When a
        newly resolved version cannot be fetched (the registry is busy or down), the
        version this reference served last keeps serving. `renew`: see `resolve`.
        """
        served_key = (name, self._ref_key(ref))
        try:
            info = self.resolve(name, ref, renew=renew)
            loaded = self._load_version(info, (info.name, info.version))
        except Unavailable:
            with self._lock:
                previous = self._served.get(served_key)
            if previous is None:
                raise
            return previous
        except (ModelNotFound, UntrustedVersion):
            with self._lock:  # `peek` no longer answers for it: requests meet this error, as it stands
                self._served.pop(served_key, None)
            raise
        with self._lock:
            self._served[served_key] = loaded
        return loaded

    def _load_version(self, info: VersionInfo, key: tuple[str, str]) -> LoadedProgram:
        if not self.store.settings.model_cache_enabled:
            return LoadedProgram(info, self._load_program(info))
        with self._lock:
            if key in self._programs:
                return self._programs[key]
            key_lock = self._loading.setdefault(key, threading.Lock())
        with key_lock:
            with self._lock:
                if key in self._programs:
                    return self._programs[key]
            loaded = LoadedProgram(info, self._load_program(info))
            with self._lock:
                self._programs[key] = loaded
            heap.settle()  # the program (and what loading it imported) lives as long as the process
            return loaded

    def _load_program(self, info: VersionInfo) -> dspy.Module:
        expected = registry.trust_state(info)[1]
        with self._lock:
            refused = self._refused.get((info.name, info.version))
        if refused is not None and refused[0] == expected:
            if time.monotonic() - refused[1] < max(self.store.settings.flywheel_resolve_ttl, 1.0):
                raise refused[2]  # no second check, log line or audit lookup per request
        try:
            check_registered(self.store, info)  # before any download
        except UntrustedVersion as exc:
            with self._lock:
                self._refused[(info.name, info.version)] = (expected, time.monotonic(), exc)
            raise
        try:
            path = self.lkg.fetch(info)
        except Exception as exc:
            if is_missing(exc):
                raise ModelNotFound(info.name, f"version {info.version}") from None
            raise Unavailable(
                f"version {info.version} of {info.name!r} is not on this host and cannot be fetched "
                f"({type(exc).__name__}: {exc})"
            ) from None
        self.lkg.remember_version(info)
        try:
            check_content(self.store, info, path)
        except UntrustedVersion as exc:
            shutil.rmtree(path, ignore_errors=True)  # fetched afresh next time (a copy spoilt on disk heals)
            with self._lock:
                self._refused[(info.name, info.version)] = (expected, time.monotonic(), exc)
            raise
        return _unpickle(self.store, info, path)

    def output_fields(self, name: str, version: str) -> list[str]:
        """A version's output fields, from what this host knows first (memory, then its disk), so
        it works while MLflow is down; [] for a version the registry says does not exist.
        Unavailable when neither this host nor the registry can tell."""
        with self._lock:
            loaded = self._programs.get((name, str(version)))
        if loaded is not None:
            return loaded.info.output_fields
        known = self.lkg.version(name, str(version))
        if known is not None:
            return known.output_fields
        try:
            return registry.get_version(name, version, self.store).output_fields
        except ModelNotFound:
            return []
        except Exception as exc:
            raise Unavailable(
                f"the output fields of {name!r} version {version} are not known on this host and the "
                f"registry cannot be reached ({type(exc).__name__}: {exc})"
            ) from None

    def cached_versions(self) -> list[tuple[str, str]]:
        with self._lock:
            return sorted(self._programs)

    def clear(self) -> None:
        with self._lock:
            self._programs.clear()
            self._resolved.clear()
            self._loading.clear()
            self._served.clear()
            self._refused.clear()


_audited_lock = threading.Lock()
_audited: set[tuple[str, ...]] = set()  # refusals already in the audit trail, from this process


def _refuse(store: Store, info: VersionInfo, why: str, **evidence: Any) -> UntrustedVersion:
    """The refusal to raise; its audit entry is written once per version (and reason) per process."""
    error = UntrustedVersion(info.name, info.version, why)
    identity = (store.tracking_uri, info.name, info.version, info.run_id or "", info.created_at.isoformat())
    once = (*identity, *(str(v) for v in evidence.values()))
    with _audited_lock:
        first = once not in _audited
        _audited.add(once)
    if first:
        try:
            entry = audit.record(
                store,
                info.name,
                "refused-load",
                info.version,
                reason=str(error),
                evidence={"host": socket.gethostname(), "pid": os.getpid(), **evidence},
            )
            registry._tag_audit(store, info.name, info.version, entry)
        except Exception as exc:  # the refusal stands without its entry; try again next time
            with _audited_lock:
                _audited.discard(once)
            log.warning("could not audit the refusal of %s v%s: %s", info.name, info.version, exc)
    log.warning("%s", error)
    return error


def check_registered(store: Store, info: VersionInfo) -> None:
    """UntrustedVersion unless the version's tags say flywheel registered it, with its files' sha256."""
    registered, expected = registry.trust_state(info)
    if not registered or expected is None:
        raise _refuse(
            store,
            info,
            f"was not registered by flywheel (no {registry.CONTENT_TAG} tag)",
            registered=registered,
            content_sha256=info.tags.get(registry.CONTENT_TAG),
        )


def check_content(store: Store, info: VersionInfo, path: Path) -> None:
    """UntrustedVersion unless the files under `path` hash to what flywheel recorded at registration.

    Bytecode caches are deleted first: a registered model holds none, so any there were written
    by this host's Python or put there by someone else, and none is used unchecked. Callers run
    `check_registered` first (before downloading); a version without a recorded hash fails here too.
    """
    for folder, dirs, _files in os.walk(path, followlinks=False):
        for cache in [d for d in dirs if d == "__pycache__"]:
            target = os.path.join(folder, cache)
            if os.path.islink(target):
                os.unlink(target)
            else:
                shutil.rmtree(target, ignore_errors=True)
    expected = registry.trust_state(info)[1]
    actual = registry.content_sha256(path)
    if actual != expected:
        raise _refuse(
            store,
            info,
            f"has files that differ from what flywheel registered (sha256 {actual[:12]}…, "
            f"registered {str(expected)[:12]}…)",
            expected=expected,
            actual=actual,
        )


def load_program(store: Store, info: VersionInfo, path: Path | None = None) -> dspy.Module:
    """Load one version's DSPy program through pyfunc, leaving global and per-thread MLflow state
    alone; only after checking that flywheel registered it and that its files are the ones it
    registered. From `path` (a local copy) when given, else from this host's last-known-good copy."""
    check_registered(store, info)
    if path is None:
        path = LastKnownGood(store.settings.flywheel_home / "last-known-good", store).fetch(info)
    check_content(store, info, path)
    return _unpickle(store, info, path)


def _unpickle(store: Store, info: VersionInfo, path: Path) -> dspy.Module:
    """The program from a local copy already checked (check_content)."""
    with (
        store.fluent(),
        store.active_model_preserved(),
        quiet("mlflow.tracking.fluent"),
        warnings.catch_warnings(),
    ):
        warnings.simplefilter("ignore")
        pyfunc = mlflow.pyfunc.load_model(str(path))
    program = store.unwrap_pyfunc(pyfunc)
    if not isinstance(program, dspy.Module):
        raise TypeError(f"{info.uri} is not a DSPy program logged with the mlflow.dspy flavor")
    return program
