"""Rating page: time from request to interactive, preheated Voila kernels vs a kernel per page.

    .venv/bin/python -m benchmarks.page_bench [--loads 5]

One run: `flywheel demo` into a temporary FLYWHEEL_HOME, then `flywheel up --preheat 1` and
`flywheel up --preheat 0` on it, one after the other. For each, headless Chromium (Debian's, at
/usr/bin/chromium) opens the rating page `--loads` times, each in a fresh page, and the time is
taken from the request (`page.goto`) until the page is interactive: the card of the first item
is drawn, the key listener is installed and the rate buttons are enabled (a key press rates).
With preheating, each load waits until the rating page's pool holds a warm kernel again
(`warm_up`'s line in Voila's log), as a reviewer coming back later would find it.
Prints a markdown table; nothing is asserted.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = os.environ.get("FLYWHEEL_TEST_CHROMIUM", "/usr/bin/chromium")
INTERACTIVE = (
    "() => window.__fwKeys === true && !!document.querySelector('.fw-item .fw-card')"
    " && !!document.querySelector('button.fw-rate-up')"
    " && !document.querySelector('button.fw-rate-up').disabled"
)


def _env(home: Path) -> dict[str, str]:
    env = dict(os.environ, FLYWHEEL_HOME=str(home), LITELLM_LOCAL_MODEL_COST_MAP="True")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    return env


def _up(home: Path, preheat: int) -> tuple[subprocess.Popen[str], dict[str, str]]:
    cmd = [sys.executable, "-m", "flywheel", "up", "--preheat", str(preheat)]
    cmd += ["--api-port", "0", "--dashboards-port", "0", "--mlflow-port", "0"]
    proc = subprocess.Popen(cmd, env=_env(home), stdout=subprocess.PIPE, text=True, start_new_session=True)
    urls: dict[str, str] = {}
    assert proc.stdout is not None
    for line in proc.stdout:
        m = re.match(r"\s+([A-Za-z ]+):\s+(http\S+)", line)
        if m:
            urls[m.group(1).strip()] = m.group(2)
        if line.startswith("Dashboards") or (preheat == 0 and "Ctrl-C" in line):
            break
    if "rating" not in urls:
        raise RuntimeError(f"flywheel up did not print its URLs (exit {proc.poll()})")
    return proc, urls


def _stop(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _warm(home: Path, kernels: int, timeout: float = 300) -> None:
    """Until `kernels` dashboard kernels have run their first cell (`warm_up` logs a line)."""
    from flywheel.ui.widgets import READY_LINE

    log = home / "logs" / "dashboards.log"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if log.read_text(errors="replace").count(READY_LINE) >= kernels:
            time.sleep(1)  # its first cell's output reaches Voila's rendered cache
            return
        time.sleep(0.2)
    raise TimeoutError("the rating page's kernel pool was not refilled")


def measure(home: Path, preheat: int, loads: int, browser: object) -> list[float]:
    proc, urls = _up(home, preheat)
    times: list[float] = []
    try:
        for i in range(loads):
            if preheat:
                _warm(home, 4 + i)  # the four pages' kernels, then the one refilled per load
            page = browser.new_page(viewport={"width": 1100, "height": 900})  # type: ignore[attr-defined]
            start = time.monotonic()
            page.goto(urls["rating"], wait_until="commit", timeout=180_000)
            page.wait_for_function(INTERACTIVE, timeout=180_000)
            times.append(time.monotonic() - start)
            page.close(run_before_unload=True)  # as a closed tab (its kernel goes when idle: culling)
            time.sleep(2)
    finally:
        _stop(proc)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--loads", type=int, default=5)
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory(prefix="page-bench-") as tmp:
        home = Path(tmp) / "home"
        seeded = subprocess.run(
            [sys.executable, "-m", "flywheel", "demo"],
            env=_env(home),
            cwd=tmp,
            capture_output=True,
            text=True,
        )
        if seeded.returncode:
            sys.exit(seeded.stdout + seeded.stderr)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=["--headless", "--no-sandbox"])
            rows = []
            for preheat in (1, 0):
                times = measure(home, preheat, args.loads, browser)
                rows.append((preheat, times))
                print(f"preheat={preheat}: " + ", ".join(f"{t:.2f}" for t in times), file=sys.stderr)
            browser.close()
    print(f"\nRating page, request to interactive ({args.loads} loads each, {os.cpu_count()} cores):\n")
    print("| Voila kernels | median (s) | min (s) | max (s) |")
    print("|---|---|---|---|")
    for preheat, times in rows:
        name = "preheated (`FLYWHEEL_PREHEAT_KERNELS=1`)" if preheat else "one started per page (`=0`)"
        print(f"| {name} | {statistics.median(times):.2f} | {min(times):.2f} | {max(times):.2f} |")


if __name__ == "__main__":
    main()
