"""Every exception flywheel raises on purpose, under one base that carries its HTTP status.

The API maps errors by class (`FlywheelError.status`), the widgets and the CLI
show `str(error)`, so a message is written once, for a person, here. Kept free
of heavy imports: the CLI reports these without loading MLflow or DSPy.
"""

from __future__ import annotations

STAGES: tuple[str, ...] = ("None", "Staging", "Production", "Archived")

__all__ = [
    "STAGES",
    "Cancelled",
    "CompileError",
    "ConfigError",
    "EvaluationFailed",
    "ExportError",
    "FeedbackError",
    "FlywheelError",
    "InputError",
    "InvalidStage",
    "LMFailure",
    "LoopError",
    "ModelNotFound",
    "PredictTimeout",
    "ProgramError",
    "RetentionError",
    "ReviewError",
    "RollbackError",
    "SchemaNotTested",
    "TooManyPending",
    "TraceNotFound",
    "Unavailable",
    "UntrustedVersion",
]


class FlywheelError(Exception):
    """Base of flywheel's errors. `status` is the HTTP status the API answers with; `retry_after`,
    when set, the seconds of its `Retry-After` header (503 and 429 set it)."""

    status: int = 500
    retry_after: int | None = None


class ConfigError(FlywheelError, ValueError):
    """A setting has a value flywheel cannot use; the message is one line for a person."""

    status = 500


class SchemaNotTested(ConfigError):
    """The trace database's MLflow schema is not one the bulk writer (trace_copy) was tested with."""


class ModelNotFound(FlywheelError, LookupError):
    """No registered model, version, stage or alias matches a reference."""

    status = 404

    def __init__(self, name: str, ref: str | None = None) -> None:
        self.name, self.ref = name, ref
        where = f"{name!r}" if ref is None else f"{name!r} ({ref})"
        super().__init__(f"Model not found: {where}")


class InvalidStage(FlywheelError, ValueError):
    status = 422

    def __init__(self, stage: str) -> None:
        self.stage = stage
        super().__init__(f"Invalid stage {stage!r}; valid stages are: {', '.join(STAGES)}")


class InputError(FlywheelError, ValueError):
    """The request's inputs do not match the program's input fields."""

    status = 422


class PredictTimeout(FlywheelError, TimeoutError):
    """The prediction took longer than REQUEST_TIMEOUT."""

    status = 504


class LMFailure(FlywheelError, RuntimeError):
    """The language model failed (the provider's error, an unreachable provider, or an answer the
    program's adapter cannot parse); the message is the provider's."""

    status = 502


class ProgramError(FlywheelError, RuntimeError):
    """The served program's own code raised (not the LM): a bug or an unhandled case in it."""

    status = 500


class FeedbackError(FlywheelError, ValueError):
    """The feedback itself is malformed."""

    status = 422


class TraceNotFound(FlywheelError, LookupError):
    status = 404

    def __init__(self, trace_id: str) -> None:
        self.trace_id = trace_id
        super().__init__(f"Trace not found: {trace_id!r}")


class ExportError(FlywheelError, ValueError):
    """An export request that cannot be answered (unknown format, bad dates)."""

    status = 422


class ReviewError(FlywheelError, RuntimeError):
    """A queue action that cannot be done now; the message is for the reviewer."""

    status = 409


class CompileError(FlywheelError, ValueError):
    """The inputs of a compile cannot work (no data, unknown optimizer or parameter)."""

    status = 422


class EvaluationFailed(CompileError):
    """A compile step got no answer to score (usually the LM is unreachable), as opposed to a
    wrong or unparseable answer; the compile registers nothing. The message says where and why."""

    status = 502

    def __init__(self, detail: str, step: str = "score") -> None:
        self.detail, self.step = detail, step
        super().__init__(f"compile step {step!r} failed on {detail}; nothing was registered")


class Cancelled(FlywheelError, RuntimeError):
    """The caller asked to stop; nothing was registered."""

    status = 409

    def __init__(self, step: str) -> None:
        self.step = step
        super().__init__(f"compile cancelled during step {step!r}; nothing was registered")


class LoopError(FlywheelError, RuntimeError):
    """A turn cannot run yet (e.g. no rated feedback); the message says what is missing."""

    status = 409


class Unavailable(FlywheelError, RuntimeError):
    """What cannot be answered right now from durable local state while MLflow (or the local
    outbox) is unreachable; the API answers 503 with `Retry-After`. Never a 404 or 422:
    those are for what is known to be wrong."""

    status = 503

    def __init__(self, message: str, retry_after: int = 5) -> None:
        self.retry_after = retry_after
        super().__init__(message)


class TooManyPending(FlywheelError, RuntimeError):
    """Feedback for a trace not known yet would pass FEEDBACK_PENDING_PER_CLIENT or
    FEEDBACK_PENDING_MAX_BYTES; nothing was stored. The API answers 429 with `Retry-After`
    (seconds until the oldest waiting item's deadline, when room is likely)."""

    status = 429

    def __init__(self, message: str, retry_after: int = 5) -> None:
        self.retry_after = retry_after
        super().__init__(message)


class RollbackError(FlywheelError, RuntimeError):
    """A rollback that cannot happen now: no previous Production is recorded, Production is no
    longer the version the caller judged, or another host already rolled this promotion back."""

    status = 409


class UntrustedVersion(FlywheelError, RuntimeError):
    """A version flywheel will not load: not registered by flywheel (no content hash recorded), or
    its files differ from what was registered. 409: the request is fine and the server works; the
    registry's state (what the reference points at) has to change first (promote another version,
    or `flywheel trust` this one after inspecting it). Not a 404: the version exists."""

    status = 409

    def __init__(self, name: str, version: str, why: str) -> None:
        self.name, self.version, self.why = name, version, why
        super().__init__(f"version {version} of {name!r} {why} — refusing to load it")


class RetentionError(FlywheelError, RuntimeError):
    """A retention pass (flywheel.retention) that could not do what its settings ask: the lineage of
    a registered version cannot be read (so nothing is deleted), traces could not be archived, or
    the tracking server does not archive. Never reported as a count of zero."""

    status = 500
