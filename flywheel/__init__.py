"""flywheel: close the data-flywheel loop for DSPy programs on MLflow.

The public API, re-exported from small modules (one concept each).
"""

from flywheel.config import STAGES, ConfigError, Settings, get_settings, load_settings
from flywheel.errors import InvalidStage, ModelNotFound
from flywheel.lm import OfflineLM, make_lm, persistable_lm
from flywheel.registry import (
    LoadedProgram,
    ModelInfo,
    VersionInfo,
    get_version,
    list_models,
    list_versions,
    load,
    promote,
    register_program,
    resolve,
    set_alias,
)
from flywheel.store import Store, connect

__all__ = [
    "STAGES",
    "ConfigError",
    "InvalidStage",
    "LoadedProgram",
    "ModelInfo",
    "ModelNotFound",
    "OfflineLM",
    "Settings",
    "Store",
    "VersionInfo",
    "connect",
    "get_settings",
    "get_version",
    "list_models",
    "list_versions",
    "load",
    "load_settings",
    "make_lm",
    "persistable_lm",
    "promote",
    "register_program",
    "resolve",
    "set_alias",
]
