"""The MLflow Model Registry for DSPy programs: register, list, resolve, promote.

Stages and aliases are kept true at once: a version in stage Production also
carries the alias `Production`, so `models:/name/Production` and
`models:/name@Production` name the same version. One version holds a stage at
a time; promoting into Staging or Production archives the previous holder.

Promotion is atomic for readers: the alias moves to the target first (one write,
and `resolve` asks the alias before the stage), then the target takes the stage,
and only then is the previous holder archived, so a concurrent resolution sees
the old version or the new one, never none.

Only what flywheel registered is served. `register_program` tags every version it makes
`flywheel.registered=true` with the sha256 of its model files (`content_sha256`, as stored:
the files are read back once right after the upload); the loader recomputes it over the files
it is about to unpickle and refuses anything else. `trust` adopts a version made some other
way, after a person has inspected it. Every alias and stage flywheel moves is an audit entry;
`audit_outside_move` writes one for a move it finds made some other way (a raw MLflow call).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import sys
import threading
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import dspy
import mlflow
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.types.schema import ColSpec, Schema

from flywheel import audit
from flywheel.config import STAGES, ConfigError, canonical_stage
from flywheel.errors import InvalidStage, ModelNotFound
from flywheel.programs import INPUT_TYPES_ATTR, input_types, optional_inputs, program_fields
from flywheel.store import Store, connect, quiet

INPUTS_TAG = "flywheel.inputs"
OUTPUTS_TAG = "flywheel.outputs"
OPTIONAL_TAG = "flywheel.optional_inputs"
SCORE_TAG = "score"
PREVIOUS_TAG = "flywheel.previous_production"  # the version a Production promotion replaced
PROMOTED_AT_TAG = "flywheel.promoted_at"  # ms: tells one promotion of a version from a later one
PROMOTED_BY_TAG = "flywheel.promoted_by"  # the action that made it Production: promote or rollback
REGISTERED_TAG = "flywheel.registered"  # "true" on every version flywheel registered (or `trust` adopted)
CONTENT_TAG = "flywheel.content_sha256"  # content_sha256 of the version's model files, as stored
MOVED_AT_TAG = "flywheel.moved_at."  # + alias: ms when flywheel began moving that alias (or stage) here
OUTSIDE_ACTION = "moved-outside"  # the audit action of an alias move flywheel did not make
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_DOWNLOAD_META = "registered_model_meta"  # written by MLflow into each models:/ download, not stored
_DIGITS = re.compile(r"^v?(\d+)$")


@dataclass(frozen=True)
class VersionInfo:
    name: str
    version: str
    stage: str
    aliases: tuple[str, ...]
    created_at: datetime
    run_id: str | None
    description: str
    tags: dict[str, str] = field(default_factory=dict)
    model_id: str | None = None

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"

    @property
    def score(self) -> float | None:
        try:
            return float(self.tags[SCORE_TAG])
        except (KeyError, ValueError):
            return None

    @property
    def input_fields(self) -> list[str]:
        return json.loads(self.tags.get(INPUTS_TAG, "[]"))

    @property
    def output_fields(self) -> list[str]:
        return json.loads(self.tags.get(OUTPUTS_TAG, "[]"))

    @property
    def optional_inputs(self) -> list[str]:
        return json.loads(self.tags.get(OPTIONAL_TAG, "[]"))

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "stage": self.stage,
            "aliases": list(self.aliases),
            "created_at": self.created_at.isoformat(),
            "run_id": self.run_id,
            "description": self.description,
            "score": self.score,
            "input_fields": self.input_fields,
            "output_fields": self.output_fields,
            "tags": self.tags,
        }


@dataclass(frozen=True)
class ModelInfo:
    name: str
    description: str
    latest_version: str | None
    stages: dict[str, str]
    aliases: dict[str, str]
    updated_at: datetime

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "latest_version": self.latest_version,
            "stages": self.stages,
            "aliases": self.aliases,
            "updated_at": self.updated_at.isoformat(),
        }


def _ts(millis: int | None) -> datetime:
    return datetime.fromtimestamp((millis or 0) / 1000, tz=UTC)


def _version_info(mv: Any) -> VersionInfo:
    return VersionInfo(
        name=mv.name,
        version=str(mv.version),
        stage=mv.current_stage or "None",
        aliases=tuple(sorted(mv.aliases or ())),
        created_at=_ts(mv.creation_timestamp),
        run_id=mv.run_id or None,
        description=mv.description or "",
        tags=dict(mv.tags or {}),
        model_id=getattr(mv, "model_id", None) or _model_id_from_source(mv.source),
    )


def _model_id_from_source(source: str | None) -> str | None:
    # MLflow 3 registers logged models by `models:/m-<id>`; older stores may not fill model_id
    if source and source.startswith("models:/m-"):
        return source.removeprefix("models:/").split("/", 1)[0]
    return None


def _raise_unless_missing(exc: MlflowException) -> None:
    """Only "does not exist" means not found; an unreachable registry must not look like a 404."""
    if exc.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
        raise exc


def content_sha256(root: str | os.PathLike[str]) -> str:
    """The sha256 of a model directory: every file's relative path (sorted) and bytes.

    A symlink counts as its target's text (a registered model holds none). Left out: the
    `registered_model_meta` file MLflow writes (name and version, overwriting any) into every
    copy it downloads by a `models:/` URI, and `__pycache__` directories: MLflow removes them
    before it uploads a model, and Python writes them into a local copy when a model's
    `code_paths` are imported (the loader deletes them before it checks a copy, so no bytecode
    it did not check is ever used).
    """
    digest = hashlib.sha256()
    entries: list[tuple[str, str]] = []
    for folder, dirs, files in os.walk(root, followlinks=False):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        links = [d for d in dirs if os.path.islink(os.path.join(folder, d))]
        for name in [*files, *links]:
            full = os.path.join(folder, name)
            rel = os.path.relpath(full, root).replace(os.sep, "/")
            if rel != _DOWNLOAD_META:
                entries.append((rel, full))
    for rel, full in sorted(entries):
        if os.path.islink(full):
            kind, body = b"L", hashlib.sha256(os.readlink(full).encode()).hexdigest()
        else:
            file_digest = hashlib.sha256()
            with open(full, "rb") as handle:
                for chunk in iter(lambda: handle.read(1 << 20), b""):
                    file_digest.update(chunk)
            kind, body = b"F", file_digest.hexdigest()
        name = rel.encode("utf-8", "surrogateescape")
        digest.update(b"%d:" % len(name) + name + kind + body.encode() + b"\n")
    return digest.hexdigest()


def _stored_sha256(uri: str, store: Store) -> str:
    """content_sha256 of the model files at `uri` as the artifact store holds them (read back once)."""
    import tempfile

    with (
        tempfile.TemporaryDirectory(prefix="flywheel-hash-") as tmp,
        store.fluent(),
        quiet("mlflow.tracking.fluent"),
        warnings.catch_warnings(),
    ):
        warnings.simplefilter("ignore")
        local = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=tmp)
        return content_sha256(local)


def trust_state(info: VersionInfo) -> tuple[bool, str | None]:
    """(registered by flywheel, the content sha256 it recorded) as the version's tags say."""
    expected = info.tags.get(CONTENT_TAG, "").strip().lower()
    registered = info.tags.get(REGISTERED_TAG, "").strip().lower() == "true"
    return registered, expected if _SHA256.match(expected) else None


def _pip_requirements() -> list[str]:
    # Explicit requirements: MLflow would otherwise spend seconds inferring them.
    from importlib.metadata import version

    return [f"mlflow=={mlflow.__version__}", f"dspy=={dspy.__version__}", f"flywheel=={version('flywheel')}"]


def register_program(
    program: dspy.Module,
    name: str,
    *,
    description: str = "",
    tags: Mapping[str, Any] | None = None,
    model_description: str = "",
    lm: dspy.BaseLM | None = None,
    store: Store | None = None,
    input_fields: Sequence[str] | None = None,
    output_fields: Sequence[str] | None = None,
    code_paths: Sequence[str | os.PathLike[str]] | None = None,
) -> VersionInfo:
    """Log `program` with MLflow's dspy flavor and register it as a new version of `name`.

    Any dspy.Module: a built-in one or a class of your own. A class defined in a notebook
    (`__main__`) or in a module file of your own (anything not installed as a package) is
    pickled by value, so the version loads in a server started in another directory, where
    your file cannot be imported; `code_paths` (MLflow's) ships files to import instead.
    `input_fields`/`output_fields` override the fields read from the program (see
    `programs.program_fields`). The LM pickled beside the program (so `mlflow models serve`
    can run it) is stripped of secrets first; callbacks are never pickled.
    """
    from flywheel.lm import configured_lm, persistable_lm

    store = store or connect()
    inputs, outputs = program_fields(program)
    inputs = list(input_fields) if input_fields is not None else inputs
    outputs = list(output_fields) if output_fields is not None else outputs
    optional = [f for f in optional_inputs(program) if f in inputs]
    all_tags = {str(k): str(v) for k, v in (tags or {}).items() if v is not None}
    all_tags.update({INPUTS_TAG: json.dumps(inputs), OUTPUTS_TAG: json.dumps(outputs)})
    if optional:
        all_tags[OPTIONAL_TAG] = json.dumps(optional)
    signature = ModelSignature(
        inputs=Schema([ColSpec("string", f) for f in inputs]),
        outputs=Schema([ColSpec("string", f) for f in outputs]),
    )
    saved_lm = persistable_lm(lm or dspy.settings.lm or configured_lm(store.settings))
    try:  # resolved here, where the program's module imports; kept on the program for servers
        setattr(program, INPUT_TYPES_ATTR, input_types(program, inputs))
    except Exception:
        pass
    if any(getattr(p, "lm", None) is not None for p in program.predictors()):
        program = program.deepcopy()  # an LM set on a predictor is pickled with it: without secrets
        for predictor in program.predictors():
            predictor.lm = persistable_lm(predictor.lm)
    client = store.client
    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name, description=model_description)
    with store.fluent():  # log_model is fluent: its run and artifacts go to this store
        active = mlflow.active_run()  # inside compile's run: log the model there
        run_ctx = (
            mlflow.start_run(experiment_id=store.experiment_id, run_name=f"register-{name}")
            if active is None
            else _nullcontext(active)
        )
        with (
            run_ctx as run,
            dspy.context(lm=saved_lm, callbacks=[]),
            warnings.catch_warnings(),
            quiet("mlflow.dspy.save", level=logging.ERROR),  # the pickle caution, on every single save
            pickled_by_value(),
        ):
            warnings.simplefilter("ignore")
            model_info = mlflow.dspy.log_model(
                program,
                name="program",
                signature=signature,
                pip_requirements=_pip_requirements(),
                metadata={"flywheel_inputs": inputs, "flywheel_outputs": outputs},
                code_paths=[str(p) for p in code_paths] if code_paths else None,
            )
            # MLflow uploads from a temporary folder of its own (no hook): the sha256 is taken of
            # the files as stored, read back at once, before the version exists to be served
            all_tags[CONTENT_TAG] = _stored_sha256(model_info.model_uri, store)
            all_tags[REGISTERED_TAG] = "true"
            mv = client.create_model_version(
                name,
                source=model_info.model_uri,
                run_id=run.info.run_id,
                tags=all_tags,
                description=description,
                model_id=model_info.model_id,
            )
    _forget(name, store)
    return _version_info(client.get_model_version(name, mv.version))


_NEVER_BY_VALUE = frozenset({"__main__", "flywheel", "dspy", "mlflow", "builtins"})


def user_modules() -> list[str]:
    """Top-level modules loaded from files that no installed distribution provides: your code.

    Excludes the standard library, installed packages (flywheel itself too, even when it is
    imported from a source tree) and `__main__` (cloudpickle pickles that by value anyway).
    """
    from importlib.metadata import packages_distributions

    installed = set(packages_distributions()) | set(sys.stdlib_module_names) | _NEVER_BY_VALUE
    prefixes = tuple({os.path.realpath(p) + os.sep for p in (sys.prefix, sys.base_prefix, sys.exec_prefix)})
    found = set()
    for name in list(sys.modules):
        top = name.partition(".")[0]
        if top in installed or top in found or top.startswith("_"):
            continue
        file = getattr(sys.modules.get(top), "__file__", None)
        if not file or os.path.realpath(file).startswith(prefixes):
            continue
        found.add(top)
    return sorted(found)


@contextmanager
def pickled_by_value() -> Iterator[None]:
    """While saving: pickle your own modules' classes and functions by value (see user_modules)."""
    import cloudpickle

    added = []
    try:
        for name in user_modules():
            module = sys.modules.get(name)
            if module is None or cloudpickle.list_registry_pickle_by_value() & {name}:
                continue
            try:
                cloudpickle.register_pickle_by_value(module)
            except ValueError:
                continue
            added.append(module)
        yield
    finally:
        for module in added:
            cloudpickle.unregister_pickle_by_value(module)


class _nullcontext:
    def __init__(self, value: Any) -> None:
        self.value = value

    def __enter__(self) -> Any:
        return self.value

    def __exit__(self, *exc: object) -> None:
        return None


def list_models(store: Store | None = None) -> list[ModelInfo]:
    client = (store or connect()).client
    models = []
    for rm in client.search_registered_models(max_results=1000):
        versions = [_version_info(mv) for mv in rm.latest_versions or ()]
        stages = {v.stage: v.version for v in versions if v.stage in ("Staging", "Production")}
        latest = max((int(v.version) for v in versions), default=None)
        models.append(
            ModelInfo(
                name=rm.name,
                description=rm.description or "",
                latest_version=None if latest is None else str(latest),
                stages=stages,
                aliases={a: str(v) for a, v in (rm.aliases or {}).items()},
                updated_at=_ts(rm.last_updated_timestamp),
            )
        )
    return sorted(models, key=lambda m: m.name)


def list_versions(name: str, store: Store | None = None) -> list[VersionInfo]:
    """Every version of `name`, newest first; ModelNotFound when there is no such model."""
    client = (store or connect()).client
    try:
        rm = client.get_registered_model(name)
    except MlflowException as exc:
        _raise_unless_missing(exc)
        raise ModelNotFound(name) from None
    newest = max((int(mv.version) for mv in rm.latest_versions or ()), default=0)
    versions = []
    for number in range(newest, 0, -1):
        try:
            versions.append(_version_info(client.get_model_version(name, str(number))))
        except MlflowException as exc:
            _raise_unless_missing(exc)
            continue  # deleted versions leave gaps
    return versions


def get_version(name: str, version: str | int, store: Store | None = None) -> VersionInfo:
    client = (store or connect()).client
    try:
        return _version_info(client.get_model_version(name, str(version)))
    except MlflowException as exc:
        _raise_unless_missing(exc)
        raise ModelNotFound(name, f"version {version}") from None


def resolve(name: str, ref: str | int | None = None, store: Store | None = None) -> VersionInfo:
    """A version number, a stage name, an alias or `latest` -> that version.

    Stage names resolve through the alias of the same name first and the
    registry stage second, so a promotion made either way is honoured.
    """
    store = store or connect()
    ref = str(ref if ref is not None else store.settings.default_model_stage).strip()
    if not name or not ref:
        raise ModelNotFound(name or "(empty)", ref)
    client = store.client
    if match := _DIGITS.match(ref):
        return get_version(name, match.group(1), store)
    if ref.lower() == "latest":
        versions = list_versions(name, store)
        if not versions:
            raise ModelNotFound(name, ref)
        return versions[0]
    try:
        stage = canonical_stage(ref)
    except ConfigError:
        stage = None
    alias = stage or ref
    try:
        return _version_info(client.get_model_version_by_alias(name, alias))
    except MlflowException as exc:
        _raise_unless_missing(exc)
        pass
    versions = list_versions(name, store)  # raises ModelNotFound for an unknown model
    holders = [v for v in versions if stage is not None and v.stage == stage]
    if holders:
        return holders[0]  # the newest; only None and Archived are held by several versions
    raise ModelNotFound(name, f"stage {stage}" if stage else f"alias {ref}")


def promote(
    name: str,
    version: str | int,
    stage: str,
    store: Store | None = None,
    *,
    actor: str | None = None,
    reason: str = "",
    evidence: Mapping[str, Any] | None = None,
    action: str = "promote",
) -> VersionInfo:
    """Move `version` to `stage`, keeping the stage alias in step and archiving the previous holder.

    Every move is audited (who, why, evidence: `audit.record`). A move into Production also
    tags the target with the version it replaced and when, so a rollback knows where to go
    and a watcher can tell one promotion of a version from a later one.
    """
    store = store or connect()
    try:
        stage = canonical_stage(stage)
    except ConfigError:
        raise InvalidStage(stage) from None
    target = get_version(name, version, store)
    client = store.client
    previous = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # registry stages are deprecated in MLflow 3, still shown
        if stage in ("Staging", "Production"):
            previous = _holder(name, stage, store)
            if stage == "Production" and previous != target.version:
                # written before the alias moves: a reader that sees the new Production sees these too
                client.set_model_version_tag(name, target.version, PROMOTED_AT_TAG, str(audit.now_ms()))
                client.set_model_version_tag(name, target.version, PROMOTED_BY_TAG, action)
                if previous is not None:
                    client.set_model_version_tag(name, target.version, PREVIOUS_TAG, previous)
            _mark_move(store, name, target.version, stage)
            # the target first (the alias moves in one write), the previous holder after
            client.set_registered_model_alias(name, stage, target.version)
            client.transition_model_version_stage(name, target.version, stage)
            for other in list_versions(name, store):
                if other.version != target.version and other.stage == stage:
                    client.transition_model_version_stage(name, other.version, "Archived")
        else:
            client.transition_model_version_stage(name, target.version, stage)
            for held in ("Staging", "Production"):
                if held in target.aliases:
                    client.delete_registered_model_alias(name, held)
    _forget(name, store)
    entry = audit.record(
        store,
        name,
        action,
        target.version,
        actor=actor,
        reason=reason,
        evidence={"stage": stage, "previous": previous, **(evidence or {})},
    )
    _tag_audit(store, name, target.version, entry)
    return get_version(name, target.version, store)


def _holder(name: str, stage: str, store: Store) -> str | None:
    """The version that holds `stage` now (alias first, then the stage), or None."""
    try:
        return resolve(name, stage, store).version
    except ModelNotFound:
        return None


def _moved_key(alias: str) -> str:
    """The version tag that says when flywheel began moving `alias` (or that stage) to the version."""
    if re.fullmatch(r"[A-Za-z0-9_\-]{1,200}", alias):
        return MOVED_AT_TAG + alias
    return MOVED_AT_TAG + hashlib.sha256(alias.encode()).hexdigest()[:32]


def _mark_move(store: Store, name: str, version: str, alias: str) -> None:
    # written before the alias moves: a host that resolves the new holder before the audit entry
    # exists sees a flywheel move in progress, not a move made outside flywheel
    store.client.set_model_version_tag(name, version, _moved_key(alias), str(audit.now_ms()))


def _moves_alias(entry: audit.AuditEntry, alias: str) -> bool:
    """True when the audit entry moved `alias` (a stage through promote/rollback, or a free alias)."""
    if entry.action in ("promote", "rollback"):
        return entry.evidence.get("stage") == alias
    if entry.action in ("alias", OUTSIDE_ACTION):
        return entry.evidence.get("alias") == alias
    return False


def audit_outside_move(store: Store, name: str, ref: str, info: VersionInfo) -> audit.AuditEntry | None:
    """When `ref` (Staging, Production or a free alias) resolves to `info` and flywheel did not put
    it there, write one audit entry `moved-outside` (from, to) and return it; else None.

    What flywheel did is the audit trail: the newest entry that moved this alias names the version
    it should resolve to. A version whose move flywheel began after that entry (`MOVED_AT_TAG`,
    written before the alias moves) is a promotion in progress, not an outside move. Each outside
    move is written once across hosts: the entry is taken as a claim (`Store.claim`) named after
    the entry it departs from and the version it found, so every host that resolves it at the same
    moment agrees who writes it, and the next resolution finds it as the newest entry.
    """
    try:
        stage: str | None = canonical_stage(ref)
    except ConfigError:
        stage = None
    if _DIGITS.match(ref) or ref.strip().lower() == "latest" or stage in ("None", "Archived"):
        return None
    alias = stage or ref
    newest = next((e for e in audit.timeline(store, name) if _moves_alias(e, alias)), None)
    if newest is not None and newest.version == info.version:
        return None
    try:
        began = int(info.tags.get(_moved_key(alias), "0"))
    except ValueError:
        began = 0
    if began and (newest is None or began >= newest.at_ms):
        return None
    departed = newest.run_id if newest is not None else "none"
    alias_key = hashlib.sha256(alias.encode()).hexdigest()[:16]
    claim = f"moved/{audit.model_key(name)}/{alias_key}/{departed}/{info.version}"
    if not store.claim(claim):
        return None  # another host writes it
    previous = newest.version if newest is not None else None
    entry = audit.record(
        store,
        name,
        OUTSIDE_ACTION,
        info.version,
        reason=(
            f"{alias} points at version {info.version}, "
            + (f"not {previous} where flywheel last moved it" if previous else "and flywheel never moved it")
            + "; the move was made outside flywheel (no audit entry)"
        ),
        evidence={"alias": alias, "from": previous, "to": info.version},
    )
    _tag_audit(store, name, info.version, entry)
    return entry


def trust(
    name: str, version: str | int, store: Store | None = None, *, actor: str | None = None, reason: str = ""
) -> VersionInfo:
    """Adopt a version flywheel did not register (or whose files changed), after a person has
    inspected it: record the sha256 of its files as stored now and mark it flywheel's; audited."""
    store = store or connect()
    info = get_version(name, version, store)
    before = trust_state(info)
    digest = _stored_sha256(info.uri, store)
    store.client.set_model_version_tag(name, info.version, CONTENT_TAG, digest)
    store.client.set_model_version_tag(name, info.version, REGISTERED_TAG, "true")
    _forget(name, store)
    entry = audit.record(
        store,
        name,
        "trust",
        info.version,
        actor=actor,
        reason=reason,
        evidence={"content_sha256": digest, "previous_sha256": before[1], "was_registered": before[0]},
    )
    _tag_audit(store, name, info.version, entry)
    return get_version(name, info.version, store)


def _tag_audit(store: Store, name: str, version: str, entry: audit.AuditEntry) -> None:
    """The audit entry on the registry version too, where the MLflow UI shows it beside the version."""
    store.client.set_model_version_tag(name, version, entry.tag_key, entry.tag_value())


def model_tags(name: str, store: Store | None = None) -> dict[str, str]:
    """The registered model's own tags (the traffic plan lives here: every host reads the same)."""
    client = (store or connect()).client
    try:
        return dict(client.get_registered_model(name).tags or {})
    except MlflowException as exc:
        _raise_unless_missing(exc)
        raise ModelNotFound(name) from None


def set_model_tag(
    name: str,
    key: str,
    value: str | None,
    store: Store | None = None,
    *,
    actor: str | None = None,
    reason: str = "",
    evidence: Mapping[str, Any] | None = None,
    action: str = "model-tag",
) -> None:
    """Set (or with None, delete) a registered-model tag, audited like every registry move."""
    store = store or connect()
    model_tags(name, store)  # ModelNotFound first, not a half-made change
    if value is None:
        try:
            store.client.delete_registered_model_tag(name, key)
        except MlflowException as exc:
            _raise_unless_missing(exc)
    else:
        store.client.set_registered_model_tag(name, key, value)
    _forget(name, store)
    audit.record(
        store, name, action, None, actor=actor, reason=reason, evidence={key: value, **(evidence or {})}
    )


def set_alias(
    name: str,
    alias: str,
    version: str | int,
    store: Store | None = None,
    *,
    actor: str | None = None,
    reason: str = "",
) -> VersionInfo:
    """Point a free alias (e.g. `champion`) at a version; stage names go through promote()."""
    if alias.strip().lower() in {s.lower() for s in STAGES}:
        return promote(name, version, alias, store, actor=actor, reason=reason)
    store = store or connect()
    target = get_version(name, version, store)
    try:
        before: str | None = str(store.client.get_model_version_by_alias(name, alias).version)
    except MlflowException:
        before = None
    _mark_move(store, name, target.version, alias)
    store.client.set_registered_model_alias(name, alias, target.version)
    _forget(name, store)
    entry = audit.record(
        store,
        name,
        "alias",
        target.version,
        actor=actor,
        reason=reason,
        evidence={"alias": alias, "previous": before},
    )
    _tag_audit(store, name, target.version, entry)
    return get_version(name, target.version, store)


# --- change notices: a loader in this process drops a resolution the moment it moves --------

_generation_lock = threading.Lock()
_generations: dict[tuple[str, str], int] = {}


def generation(store: Store, name: str) -> int:
    """How many times `name` changed here (register, promote, alias) since this process started.

    Loaders compare it with what they saw when they resolved, so a promotion made in
    this process is served at once; other processes see it within FLYWHEEL_RESOLVE_TTL.
    """
    with _generation_lock:
        return _generations.get((store.tracking_uri, name), 0)


def _forget(name: str, store: Store) -> None:
    with _generation_lock:
        key = (store.tracking_uri, name)
        _generations[key] = _generations.get(key, 0) + 1
