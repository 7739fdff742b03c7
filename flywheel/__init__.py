"""flywheel: close the data-flywheel loop for DSPy programs on MLflow.

The public API, re-exported from small modules (one concept each).
"""

from flywheel.client import AsyncClient, Client
from flywheel.compile import Cancelled, CompileResult, available_optimizers, compile_program
from flywheel.config import STAGES, ConfigError, Settings, get_settings, load_settings
from flywheel.errors import InvalidStage, ModelNotFound
from flywheel.evaluate import GateResult, gate
from flywheel.export import export_rows, to_examples
from flywheel.feedback import submit as submit_feedback
from flywheel.lm import OfflineLM, make_lm, persistable_lm
from flywheel.loop import (
    LoopTurn,
    loop,  # noqa: E402  (the function `flywheel.loop(...)` shadows its module)
)
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
from flywheel.server import start_background, stop_background
from flywheel.serving import Prediction, apredict, predict
from flywheel.store import Store, connect

__all__ = [
    "STAGES",
    "AsyncClient",
    "Cancelled",
    "Client",
    "CompileResult",
    "GateResult",
    "LoopTurn",
    "Prediction",
    "apredict",
    "available_optimizers",
    "compile_program",
    "export_rows",
    "gate",
    "loop",
    "predict",
    "start_background",
    "stop_background",
    "submit_feedback",
    "to_examples",
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
