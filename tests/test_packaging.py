"""The packaging promises: environment.yml and pyproject.toml agree, and CI runs the README's command."""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent


def _name(requirement: str) -> str:
    return re.split(r"[\s<>=!~\[;]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def _spec(requirement: str) -> str:
    # conda has no extras: compare the name and the version bounds only
    return re.sub(r"\[[^\]]*\]", "", requirement).replace(" ", "").lower()


def test_environment_yml_lists_the_same_dependencies_as_pyproject() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = project["dependencies"] + project["optional-dependencies"]["test"]
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    listed: list[str] = []
    for dep in env["dependencies"]:
        if isinstance(dep, dict):
            listed += dep["pip"]
        elif _name(dep) not in {"python", "pip"}:
            listed.append(dep)
    assert sorted(map(_spec, listed)) == sorted(map(_spec, wanted))
    assert "python=3.11" in env["dependencies"]


def test_litellm_is_kept_off_the_compromised_release() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    litellm = [d for d in project["dependencies"] if _name(d) == "litellm"]
    assert litellm and "!=1.107.0" in litellm[0]


def test_ci_runs_the_readme_test_command() -> None:
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "./run test" in ci
    quick_start = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"^\s*(\./run \w+)\s*$", quick_start, flags=re.M)
    assert commands == ["./run demo", "./run test"]


# --- the wheel: notebooks/ and dashboards/ ride along as flywheel/_data/ ----------------------------

SOURCES = ("pyproject.toml", "README.md", "flywheel", "notebooks", "dashboards")
DASHBOARD = "rating.ipynb"


def test_every_subpackage_and_the_notebooks_are_packaged() -> None:
    """pyproject.toml lists flywheel's packages by hand: a new subpackage must be added there."""
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    subpackages = {
        ".".join(p.parent.relative_to(ROOT).parts)
        for p in (ROOT / "flywheel").rglob("__init__.py")
        if "__pycache__" not in p.parts
    }
    assert subpackages <= set(tool["packages"])
    assert tool["package-dir"] == {
        "flywheel._data.notebooks": "notebooks",
        "flywheel._data.dashboards": "dashboards",
    }
    for name in tool["package-dir"]:
        assert name in tool["packages"] and tool["package-data"][name][0] == "*.ipynb"
    # Voila's own settings for the dashboards (voila.json in the folder Voila runs in)
    assert tool["package-data"]["flywheel._data.dashboards"] == ["*.ipynb", "voila.json"]
    template = ROOT / "flywheel" / "ui" / "jupyter" / "voila" / "templates" / "flywheel"
    assert {p.name for p in template.iterdir()} == {"conf.json", "index.html.j2", "error.html"}
    assert tool["package-data"]["flywheel.ui"] == ["jupyter/voila/templates/flywheel/*"]


def _copy_source(dest: Path) -> Path:
    """What `pip install .` reads, copied: building writes build/ and an egg-info next to pyproject.toml,
    which must not land in the checkout other people work in."""
    ignore = shutil.ignore_patterns("__pycache__", ".ipynb_checkpoints", "*.egg-info", "*.db")
    dest.mkdir(parents=True)
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, dest / name, ignore=ignore)
        else:
            shutil.copy2(ROOT / name, dest / name)
    return dest


def _build_isolation() -> list[str]:
    """--no-build-isolation when this interpreter has the backend pyproject.toml asks for (and can make
    wheels: setuptools>=70.1, or the `wheel` package); otherwise pip fetches it from the package index."""
    from importlib.metadata import PackageNotFoundError, version
    from importlib.util import find_spec

    from packaging.requirements import Requirement
    from packaging.version import Version

    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"]
    try:
        ok = all(Requirement(r).specifier.contains(version(Requirement(r).name)) for r in requires)
        wheels = Version(version("setuptools")) >= Version("70.1") or find_spec("wheel") is not None
    except PackageNotFoundError:
        return []
    return ["--no-build-isolation"] if ok and wheels else []


def _run(
    cmd: list[str | Path], cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, f"{cmd}\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    return done


def _venv(path: Path, install: list[str], cwd: Path) -> Path:
    """A fresh venv with flywheel installed from `install` (pip arguments) and this environment's
    packages beside it, minus flywheel's editable finder: whatever `import flywheel` finds is the
    installed one. Returns its python."""
    _run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", path], cwd)
    python = path / "bin" / "python"
    # installed before this environment's packages are visible: pip never sees (or touches) its flywheel
    _run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", *install], cwd)
    purelib = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    site = Path(_run([python, "-c", purelib], cwd).stdout.strip())
    ours = Path(sysconfig.get_paths()["purelib"])
    # the system site-packages are the base interpreter's; this environment's come next by a .pth file
    # (a path line: the .pth files in `ours` are not run, so copy all but flywheel's editable finder)
    (site / "00-flywheel-test-deps.pth").write_text(f"{ours}\n")
    for pth in ours.glob("*.pth"):
        if not fnmatch.fnmatch(pth.name, "__editable__*flywheel*"):
            shutil.copyfile(pth, site / pth.name)
    return python


def _clean_env(**extra: str) -> dict[str, str]:
    drop = ("FLYWHEEL_", "MLFLOW_", "API_", "PYTHON", "VIRTUAL_ENV", "JUPYTER")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    return env | extra


_LOCATE = """
import json, flywheel
from jupyter_client.manager import KernelManager
from flywheel.ui.dashboards import dashboards_dir, notebooks_dir
print(json.dumps({
    "flywheel": flywheel.__file__,
    "dashboards": str(dashboards_dir()),
    "notebooks": str(notebooks_dir()),
    "kernel": KernelManager(kernel_name="python3").format_kernel_cmd()[0],
}))
"""


def _locate(python: Path, cwd: Path) -> dict[str, Path]:
    done = _run([python, "-c", _LOCATE], cwd, env=_clean_env())
    # absolute, symlinks kept: a venv's bin/python is a link to the base interpreter
    return {k: Path(os.path.abspath(v)) for k, v in json.loads(done.stdout.strip().splitlines()[-1]).items()}


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("*.ipynb"))


@pytest.mark.slow
def test_the_wheel_ships_the_dashboards_and_notebooks_and_runs_a_dashboard(tmp_path: Path) -> None:
    source = _copy_source(tmp_path / "src")
    _run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", *_build_isolation(), "-w", "dist", source],
        tmp_path,
    )
    (wheel,) = (tmp_path / "dist").glob("flywheel-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        shipped = set(zf.namelist())
    for name in [*_names(ROOT / "dashboards"), "voila.json"]:
        assert f"flywheel/_data/dashboards/{name}" in shipped
    for name in _names(ROOT / "notebooks"):
        assert f"flywheel/_data/notebooks/{name}" in shipped
    for name in ("conf.json", "index.html.j2"):  # the dashboards' Voila template
        assert f"flywheel/ui/jupyter/voila/templates/flywheel/{name}" in shipped

    venv = tmp_path / "venv"
    python = _venv(venv, ["--force-reinstall", str(wheel)], tmp_path)
    elsewhere = tmp_path / "elsewhere"  # not the checkout: the source tree is not importable from here
    elsewhere.mkdir()
    found = _locate(python, elsewhere)
    installed = found["flywheel"].parent
    assert installed.is_relative_to(venv) and installed.name == "flywheel"
    assert found["kernel"] == python  # the notebook's kernel is the venv's python: it imports the same
    assert found["dashboards"] == installed / "_data" / "dashboards"
    assert found["notebooks"] == installed / "_data" / "notebooks"
    assert _names(found["dashboards"]) == _names(ROOT / "dashboards")
    assert _names(found["notebooks"]) == _names(ROOT / "notebooks")

    cli = _run([venv / "bin" / "flywheel", "dashboards", "--help"], elsewhere, env=_clean_env())
    assert "usage: flywheel dashboards" in cli.stdout

    env = _clean_env(FLYWHEEL_HOME=str(tmp_path / "home"))
    nbmake = [python, "-m", "pytest", "--nbmake", "-q", "-p", "no:cacheprovider", "-o", "addopts="]
    done = _run([*nbmake, found["dashboards"] / DASHBOARD], elsewhere, env=env)
    assert "1 passed" in done.stdout


@pytest.mark.slow
def test_an_editable_install_finds_the_checkouts_dashboards_and_notebooks(tmp_path: Path) -> None:
    source = _copy_source(tmp_path / "src")
    python = _venv(tmp_path / "venv", ["--editable", str(source)], tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    found = _locate(python, elsewhere)
    assert found["flywheel"] == source / "flywheel" / "__init__.py"
    assert found["dashboards"] == source / "dashboards"
    assert found["notebooks"] == source / "notebooks"
