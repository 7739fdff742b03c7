from __future__ import annotations

import os
import re
from dataclasses import fields
from pathlib import Path

import pytest

from flywheel.config import ConfigError, Settings, canonical_stage, load_settings

ROOT = Path(__file__).resolve().parent.parent


def test_defaults_are_the_embedded_store_under_flywheel_home(tmp_path: Path) -> None:
    s = load_settings({"FLYWHEEL_HOME": str(tmp_path / "h")}, env_file=None)
    assert s.flywheel_home == (tmp_path / "h").resolve()
    assert s.mlflow_tracking_uri == f"sqlite:///{(tmp_path / 'h' / 'mlflow.db').resolve()}"
    assert s.is_embedded
    assert (s.api_host, s.api_port, s.api_workers) == ("127.0.0.1", 8000, 4)
    assert s.default_model_stage == "Production"
    assert s.model_cache_enabled and s.feedback_enabled and s.mlflow_enabled
    assert s.flywheel_lm is None
    assert (s.gate_alpha, s.gate_margin, s.gate_min_rows, s.gate_non_inferiority) == (0.05, 0.0, 10, False)


def test_environment_overrides_dotenv(tmp_path: Path) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text("API_PORT=9001\nFLYWHEEL_LM=openai/gpt-4o-mini\nAPI_WORKERS=2\n")
    s = load_settings({"API_PORT": "9002", "FLYWHEEL_HOME": str(tmp_path)}, env_file=env_file)
    assert s.api_port == 9002
    assert s.api_workers == 2
    assert s.flywheel_lm == "openai/gpt-4o-mini"


def test_http_tracking_uri_is_kept(tmp_path: Path) -> None:
    s = load_settings({"MLFLOW_TRACKING_URI": "http://127.0.0.1:5000"}, env_file=None)
    assert s.mlflow_tracking_uri == "http://127.0.0.1:5000"
    assert not s.is_embedded


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"API_PORT": "eighty"}, "API_PORT='eighty' is not a number"),
        ({"API_PORT": "70000"}, "out of range"),
        ({"API_WORKERS": "0"}, "out of range"),
        ({"DEFAULT_MODEL_STAGE": "Prod"}, "valid stages are: None, Staging, Production, Archived"),
        ({"MODEL_CACHE_ENABLED": "maybe"}, "is not a boolean"),
        ({"MLFLOW_TRACKING_URI": "ftp://x"}, "is not supported"),
        ({"GATE_ALPHA": "0.9"}, "GATE_ALPHA='0.9' is out of range"),
        ({"GATE_MARGIN": "-0.1"}, "out of range"),
        ({"GATE_MIN_ROWS": "ten"}, "is not a number"),
        ({"GATE_NON_INFERIORITY": "perhaps"}, "is not a boolean"),
    ],
)
def test_bad_values_give_one_clear_line(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(env, env_file=None)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_stage_names_are_case_insensitive() -> None:
    assert canonical_stage("production") == "Production"
    assert canonical_stage(" STAGING ") == "Staging"
    assert load_settings({"DEFAULT_MODEL_STAGE": "staging"}, env_file=None).default_model_stage == ("Staging")


def test_every_setting_is_documented() -> None:
    doc = (ROOT / "docs" / "configuration.md").read_text()
    documented = set(re.findall(r"^\| `([A-Z_]+)`", doc, flags=re.M))
    names = {f.name.upper() for f in fields(Settings)}
    assert names - documented == set(), "undocumented settings"
    assert documented - names == set(), "documented settings that do not exist"


def test_config_is_the_only_reader_of_the_environment() -> None:
    offenders = [
        p.name
        for p in (ROOT / "flywheel").rglob("*.py")
        if p.name != "config.py" and re.search(r"os\.environ|os\.getenv", p.read_text())
    ]
    assert offenders == []


def test_a_kernel_in_a_subfolder_finds_the_project_env_and_store(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "pyproject.toml").write_text("")
    (tmp_path / ".env").write_text("FLYWHEEL_ADMIN_KEY=from-dotenv\n")
    (tmp_path / "notebooks").mkdir()
    monkeypatch.chdir(tmp_path / "notebooks")
    s = load_settings({}, env_file=".env")
    assert s.flywheel_admin_key == "from-dotenv"
    assert s.flywheel_home == (tmp_path / ".flywheel").resolve()
    assert s.mlflow_tracking_uri == f"sqlite:///{(tmp_path / '.flywheel' / 'mlflow.db').resolve()}"


def test_child_environment_passes_resolved_settings(tmp_path: Path) -> None:
    from flywheel.config import child_environment

    s = load_settings({"FLYWHEEL_HOME": str(tmp_path), "FEEDBACK_ENABLED": "no"}, env_file=None)
    env = child_environment(s, {"EXTRA": "1"})
    assert env["FLYWHEEL_HOME"] == str(tmp_path.resolve()) and env["FEEDBACK_ENABLED"] == "false"
    assert env["EXTRA"] == "1"
    assert env.get("FLYWHEEL_LM") == os.environ.get("FLYWHEEL_LM")  # unset settings add nothing
