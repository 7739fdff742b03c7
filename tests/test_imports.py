"""`import flywheel` and the command line stay light: MLflow, DSPy and the web stack load only when used.

Each check runs in a fresh interpreter, so what this test process already imported does not count.
"""

from __future__ import annotations

import ast
import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

import flywheel

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("mlflow", "dspy", "fastapi", "uvicorn", "litellm")

_REPORT = "import json, sys; print(json.dumps(sorted(sys.modules)))"


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, cwd=ROOT, timeout=120, check=False
    )


def _modules_after(statement: str) -> set[str]:
    done = _run("-c", f"{statement}\n{_REPORT}")
    assert done.returncode == 0, done.stderr
    return set(json.loads(done.stdout.strip().splitlines()[-1]))


def _heavy(modules: set[str]) -> list[str]:
    return sorted(m for m in modules if m.split(".")[0] in HEAVY)


def _third_party(modules: set[str]) -> set[str]:
    """Top-level names of what `modules` adds to a bare interpreter, leaving out the stdlib and flywheel."""
    bare = _modules_after("pass")
    tops = {m.split(".")[0] for m in modules - bare}
    return {t for t in tops if t not in sys.stdlib_module_names and t != "flywheel" and not t.startswith("_")}


@pytest.mark.parametrize("module", ["flywheel", "flywheel.errors", "flywheel.config", "flywheel.cli"])
def test_importing_loads_nothing_heavy(module: str) -> None:
    assert _heavy(_modules_after(f"import {module}")) == []


def test_errors_imports_nothing_outside_the_standard_library() -> None:
    assert _third_party(_modules_after("import flywheel.errors")) == set()


def test_config_imports_python_dotenv_only() -> None:
    assert _third_party(_modules_after("import flywheel.config")) == {"dotenv"}


def test_cli_help_loads_nothing_heavy() -> None:
    done = _run("-X", "importtime", "-m", "flywheel", "--help")
    assert done.returncode == 0, done.stderr
    assert "usage: flywheel" in done.stdout
    # stderr lines: "import time: self [us] | cumulative | imported package" (nested names indented)
    imported = {
        line.rsplit("|", 1)[1].strip()
        for line in done.stderr.splitlines()
        if line.startswith("import time:") and line.count("|") == 2
    }
    assert "flywheel.cli" in imported  # the importtime report was read
    assert _heavy(imported) == []


def test_subcommand_help_loads_nothing_heavy() -> None:
    done = _run("-c", f"import sys\nfrom flywheel.cli import build_parser\nbuild_parser()\n{_REPORT}")
    assert done.returncode == 0, done.stderr
    assert _heavy(set(json.loads(done.stdout.strip().splitlines()[-1]))) == []


def test_every_public_name_resolves() -> None:
    assert flywheel.__all__ == sorted(flywheel._EXPORTS)
    for name in flywheel.__all__:
        module, _, attribute = flywheel._EXPORTS[name].partition(":")
        value = getattr(flywheel, name)
        assert value is getattr(importlib.import_module(module), attribute), name
        assert name in dir(flywheel)
    with pytest.raises(AttributeError):
        flywheel.no_such_name  # noqa: B018


def test_type_checking_imports_name_every_public_name() -> None:
    """The `if TYPE_CHECKING:` block of flywheel/__init__.py (for IDEs) matches the lazy exports."""
    tree = ast.parse((ROOT / "flywheel" / "__init__.py").read_text())
    block = next(
        node
        for node in tree.body
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"
    )
    named: dict[str, str] = {}
    for node in block.body:
        assert isinstance(node, ast.ImportFrom)
        for alias in node.names:
            named[alias.asname or alias.name] = f"{node.module}:{alias.name}"
    assert named == flywheel._EXPORTS


@pytest.mark.slow  # the subprocess imports MLflow and DSPy
def test_submodules_do_not_shadow_the_public_functions() -> None:
    """`import flywheel.loop` (the module) leaves `flywheel.loop` the function, in either order."""
    code = (
        "import flywheel\n"
        "first = flywheel.loop\n"
        "import flywheel.loop, flywheel.gate, flywheel.runtime\n"
        "assert first is flywheel.loop is flywheel.runtime.loop, flywheel.loop\n"
        "assert flywheel.gate is flywheel.runtime.gate, flywheel.gate\n"
        "from flywheel import gate\n"
        "assert gate is flywheel.runtime.gate\n"
        "from flywheel.loop import training_rows\n"
        "print('ok')\n"
    )
    done = _run("-c", code)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-2000:]
