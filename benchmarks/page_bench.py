"""Rating page: time from request to interactive, preheated Voila kernels vs a kernel per page.

    .venv/bin/python -m benchmarks.page_bench [--loads 5]

One run: `flywheel demo` into a temporary FLYWHEEL_HOME, then `flywheel up --preheat 1` and
`flywheel up --preheat 0` on it, one after the other. For each, headless Chromium (Debian's, at
/usr/bin/chromium) opens the rating page `--loads` times, each in a fresh page, and the time is
taken from the request (`page.goto`) until the page is interactive: the card of the first item
is drawn, the key listener is installed and the rate buttons are enabled (a key press rates).
With preheating, each load waits until the rating page's pool holds a warm kernel again
(`warm_up`'s line in Voila's log), as a reviewer coming back later would find it. Preheated pages
are measured twice: on a first visit (a fresh browser context each load: Voila's scripts and
styles fetched, about 4.9 MB in 93 requests) and returning (one context, its cache filled by an
uncounted load). Prints a markdown table; nothing is asserted.
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
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = os.environ.get("FLYWHEEL_TEST_CHROMIUM", "/usr/bin/chromium")
# Debian's Chromium runs the full browser headless, and each new tab started a renderer for the
# browser's own omnibox popup (a WebUI page never shown here) that took 0.6 to 1 s of CPU during
# the page's load. That is the browser's own interface, on the reviewer's machine in real use; on
# this one machine it took a core from the page, Voila and the kernel being measured.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-features=WebUIOmniboxPopup,WebUIOmniboxAimPopup",
]
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


def _load(page: Any, url: str) -> float:
    start = time.monotonic()
    page.goto(url, wait_until="commit", timeout=180_000)
    page.wait_for_function(INTERACTIVE, timeout=180_000)
    took = time.monotonic() - start
    page.close(run_before_unload=True)  # as a closed tab (its kernel goes when idle: culling)
    time.sleep(2)
    return took


def measure(home: Path, preheat: int, loads: int, browser: Any) -> dict[str, list[float]]:
    """{series: seconds per load}. "first visit": each load in a fresh browser context (nothing
    cached). "returning" (preheated only): one context whose cache one earlier, uncounted load
    filled, as a reviewer's browser holds Voila's scripts and styles after the first page."""
    proc, urls = _up(home, preheat)
    used = 0  # preheated kernels taken so far: each load waits for the pool to hold one again

    def warm_kernel() -> None:
        if preheat:
            _warm(home, 4 + used)  # the four pages' kernels, then the one refilled per load

    series: dict[str, list[float]] = {"first visit": []}
    try:
        for _ in range(loads):
            warm_kernel()
            page = browser.new_page(viewport={"width": 1100, "height": 900})
            series["first visit"].append(_load(page, urls["rating"]))
            used += 1
        if preheat:
            context = browser.new_context(viewport={"width": 1100, "height": 900})
            series["returning"] = []
            for i in range(loads + 1):
                warm_kernel()
                took = _load(context.new_page(), urls["rating"])
                used += 1
                if i:  # the first load only fills the cache
                    series["returning"].append(took)
            context.close()
    finally:
        _stop(proc)
    return series


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
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            rows = []
            for preheat in (1, 0):
                for name, times in measure(home, preheat, args.loads, browser).items():
                    rows.append((preheat, name, times))
                    times_s = ", ".join(f"{t:.2f}" for t in times)
                    print(f"preheat={preheat} {name}: {times_s}", file=sys.stderr)
            browser.close()
    print(f"\nRating page, request to interactive ({args.loads} loads each, {os.cpu_count()} cores):\n")
    print("| Voila kernels | browser cache | median (s) | min (s) | max (s) |")
    print("|---|---|---|---|---|")
    for preheat, name, times in rows:
        kernels = "preheated (`FLYWHEEL_PREHEAT_KERNELS=1`)" if preheat else "one started per page (`=0`)"
        cache = "empty (first visit)" if name == "first visit" else "Voila's files cached (returning)"
        spread = f"{statistics.median(times):.2f} | {min(times):.2f} | {max(times):.2f}"
        print(f"| {kernels} | {cache} | {spread} |")


if __name__ == "__main__":
    main()
