"""flywheel: close the data-flywheel loop for DSPy programs on MLflow.

The public API, imported lazily (PEP 562): `import flywheel` loads neither
MLflow nor DSPy, so the CLI, `--help` and a uvicorn worker's supervisor stay
fast; a name is imported from its module the first time it is used.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

# public name -> "module:attribute"
_EXPORTS: dict[str, str] = {
    "STAGES": "flywheel.errors:STAGES",
    "AgreementReport": "flywheel.agreement:AgreementReport",
    "agreement_report": "flywheel.runtime:agreement_report",
    "AsyncClient": "flywheel.http.client:AsyncClient",
    "Cancelled": "flywheel.errors:Cancelled",
    "Client": "flywheel.http.client:Client",
    "CompileResult": "flywheel.compile:CompileResult",
    "ConfigError": "flywheel.errors:ConfigError",
    "FlywheelError": "flywheel.errors:FlywheelError",
    "GateResult": "flywheel.gate:GateResult",
    "InvalidStage": "flywheel.errors:InvalidStage",
    "LoadedProgram": "flywheel.loader:LoadedProgram",
    "LoopTurn": "flywheel.loop:LoopTurn",
    "ModelInfo": "flywheel.registry:ModelInfo",
    "ModelNotFound": "flywheel.errors:ModelNotFound",
    "OfflineLM": "flywheel.lm:OfflineLM",
    "Prediction": "flywheel.serving:Prediction",
    "Runtime": "flywheel.runtime:Runtime",
    "Settings": "flywheel.config:Settings",
    "Store": "flywheel.store:Store",
    "VersionInfo": "flywheel.registry:VersionInfo",
    "apredict": "flywheel.runtime:apredict",
    "available_optimizers": "flywheel.compile:available_optimizers",
    "compile_program": "flywheel.compile:compile_program",
    "connect": "flywheel.store:connect",
    "export_rows": "flywheel.runtime:export_rows",
    "gate": "flywheel.runtime:gate",
    "get_runtime": "flywheel.runtime:get_runtime",
    "get_settings": "flywheel.config:get_settings",
    "get_version": "flywheel.registry:get_version",
    "list_models": "flywheel.registry:list_models",
    "list_versions": "flywheel.registry:list_versions",
    "load": "flywheel.runtime:load",
    "load_settings": "flywheel.config:load_settings",
    "loop": "flywheel.runtime:loop",
    "make_lm": "flywheel.lm:make_lm",
    "open": "flywheel.runtime:open_runtime",
    "persistable_lm": "flywheel.lm:persistable_lm",
    "predict": "flywheel.runtime:predict",
    "promote": "flywheel.runtime:promote",
    "register_program": "flywheel.registry:register_program",
    "resolve": "flywheel.registry:resolve",
    "set_alias": "flywheel.runtime:set_alias",
    "start_background": "flywheel.http.server:start_background",
    "stop_background": "flywheel.http.server:stop_background",
    "submit_feedback": "flywheel.runtime:submit_feedback",
    "to_examples": "flywheel.export:to_examples",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    target = _EXPORTS.get(name)
    if target is None:
        raise AttributeError(f"module 'flywheel' has no attribute {name!r}")
    module, _, attribute = target.partition(":")
    value = getattr(importlib.import_module(module), attribute)
    globals()[name] = value  # the next lookup is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


class _Package(types.ModuleType):
    """Keeps `flywheel.loop` and `flywheel.gate` the public functions.

    Importing a submodule sets it as an attribute of its package, so the first
    `import flywheel.loop` anywhere would replace the function `flywheel.loop`
    with the module. Inside the package, import such a module by its full name
    (`from flywheel.loop import loop`), never as `from flywheel import loop`.
    """

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _EXPORTS and getattr(value, "__name__", None) == f"{__name__}.{name}":
            return  # the submodule stays reachable as sys.modules["flywheel.<name>"]
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


if TYPE_CHECKING:  # for type checkers and IDEs; never executed
    from flywheel.agreement import AgreementReport
    from flywheel.compile import CompileResult, available_optimizers, compile_program
    from flywheel.config import Settings, get_settings, load_settings
    from flywheel.errors import (
        STAGES,
        Cancelled,
        ConfigError,
        FlywheelError,
        InvalidStage,
        ModelNotFound,
    )
    from flywheel.export import to_examples
    from flywheel.gate import GateResult
    from flywheel.http.client import AsyncClient, Client
    from flywheel.http.server import start_background, stop_background
    from flywheel.lm import OfflineLM, make_lm, persistable_lm
    from flywheel.loader import LoadedProgram
    from flywheel.loop import LoopTurn
    from flywheel.registry import (
        ModelInfo,
        VersionInfo,
        get_version,
        list_models,
        list_versions,
        register_program,
        resolve,
    )
    from flywheel.runtime import (
        Runtime,
        agreement_report,
        apredict,
        export_rows,
        gate,
        get_runtime,
        load,
        loop,
        predict,
        promote,
        set_alias,
        submit_feedback,
    )
    from flywheel.runtime import open_runtime as open
    from flywheel.serving import Prediction
    from flywheel.store import Store, connect
