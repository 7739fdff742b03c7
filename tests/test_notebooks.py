"""Every notebook and dashboard runs top to bottom (nbmake) on a fresh store, in a subprocess.

A subprocess, so the kernels see only the environment given here (a temp
FLYWHEEL_HOME, no keys) and nothing of this test process's state.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def nbmake(home: Path, *paths: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLYWHEEL_", "MLFLOW_", "API_"))}
    env.update(FLYWHEEL_HOME=str(home), FLYWHEEL_NB_SAMPLES="4", FLYWHEEL_LOOP_TURNS="2")
    cmd = [sys.executable, "-m", "pytest", "--nbmake", "-q", "-p", "no:cacheprovider", "-o", "addopts="]
    cmd += paths
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


OWN_PROGRAM = "notebooks/06_your_program.ipynb"  # runs alone, on an empty store (below)


def test_notebooks_and_dashboards_run_on_a_fresh_store(tmp_path: Path) -> None:
    paths = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "notebooks").glob("*.ipynb"))
    paths = [p for p in paths if p != OWN_PROGRAM] + ["dashboards/"]
    done = nbmake(tmp_path / "home", *paths)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    passed = re.search(r"(\d+) passed", done.stdout)
    expected = len(list((ROOT / "notebooks").glob("*.ipynb")) + list((ROOT / "dashboards").glob("*.ipynb")))
    assert expected >= 10 and passed and int(passed.group(1)) == expected - 1


def test_your_program_notebook_runs_on_an_empty_store(tmp_path: Path) -> None:
    # 06 seeds nothing: its own Module class, CSV, compile, promote, HTTP predict, trace, feedback, loop turn
    done = nbmake(tmp_path / "own", OWN_PROGRAM)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "1 passed" in done.stdout


def test_dashboards_run_on_an_empty_store(tmp_path: Path) -> None:
    done = nbmake(tmp_path / "empty", "dashboards/")
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    shipped = len(list((ROOT / "dashboards").glob("*.ipynb")))
    assert shipped == 4 and f"{shipped} passed" in done.stdout  # the friendly empty state, no seeding
