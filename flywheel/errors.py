"""Errors a person acts on; kept free of heavy imports so the CLI can report them fast."""

from __future__ import annotations

from flywheel.config import STAGES, ConfigError

__all__ = ["ConfigError", "InvalidStage", "ModelNotFound"]


class ModelNotFound(LookupError):
    """No registered model, version, stage or alias matches a reference."""

    def __init__(self, name: str, ref: str | None = None) -> None:
        self.name, self.ref = name, ref
        where = f"{name!r}" if ref is None else f"{name!r} ({ref})"
        super().__init__(f"Model not found: {where}")


class InvalidStage(ValueError):
    def __init__(self, stage: str) -> None:
        self.stage = stage
        super().__init__(f"Invalid stage {stage!r}; valid stages are: {', '.join(STAGES)}")
