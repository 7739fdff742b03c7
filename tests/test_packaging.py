"""The packaging promises: environment.yml and pyproject.toml agree, and CI runs the README's command."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

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
