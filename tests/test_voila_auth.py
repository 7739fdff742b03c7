"""Voila behind an identity (issue 31): the token or a trusted proxy's header, the Host check, kernels
capped per visitor, pages that never connected culled, and kernels without the API's keys.

Real `flywheel dashboards` servers (`launch`, the same command and environment) on a one-page probe
notebook that prints what its kernel was given, so each test costs seconds of kernel start, not
the dashboards' imports; the dashboards themselves run behind the same server in
tests/test_dashboards.py and tests/test_workbench.py.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import nbformat
import psutil
import pytest

from flywheel.config import get_settings, load_settings
from flywheel.errors import ConfigError
from flywheel.ui.dashboards import Launched, launch, voila_command, voila_env, with_token

CHROMIUM = Path(os.environ.get("FLYWHEEL_TEST_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run"]
PAGE = "/voila/render/probe.ipynb"
SETTINGS = [
    "FLYWHEEL_DASHBOARDS_TOKEN",
    "FLYWHEEL_REVIEWER_HEADER",
    "FLYWHEEL_TRUSTED_PROXIES",
    "FLYWHEEL_DASHBOARDS_HOSTS",
    "FLYWHEEL_KERNELS_PER_USER",
    "FLYWHEEL_KERNEL_CONNECT_TIMEOUT",
    "FLYWHEEL_KERNEL_IDLE_TIMEOUT",
    "FLYWHEEL_PREDICT_KEY",
    "FLYWHEEL_FEEDBACK_KEY",
    "FLYWHEEL_ADMIN_KEY",
    "MLFLOW_TRACKING_URI",
]
KERNEL_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def probe_notebook(folder: Path) -> Path:
    """A dashboard-shaped notebook (a first cell, `wait_for_request()`, then the page) that shows its
    kernel's pid, the reviewer header it was handed and its query string."""
    folder.mkdir(parents=True, exist_ok=True)
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [
        nbformat.v4.new_code_cell("import os"),
        nbformat.v4.new_code_cell("from voila.utils import wait_for_request\nwait_for_request()"),
        nbformat.v4.new_code_cell(
            "from IPython.display import HTML\n"
            "HTML('<p>probe pid=%d user=%s query=%s end</p>' % (os.getpid(), "
            "os.environ.get('HTTP_X_FORWARDED_USER', '-'), os.environ.get('QUERY_STRING', '-')))"
        ),
    ]
    nbformat.write(nb, folder / "probe.ipynb")
    return folder


def probe(html: str) -> dict[str, str]:
    """What the probe page's kernel printed."""
    m = re.search(r"probe pid=(\d+) user=(\S*) query=(.*?) end", html)
    assert m, html[-2000:]
    pid, user, query = (json.loads(f'"{v}"') for v in m.groups())  # the page holds it as JSON text
    return {"pid": pid, "user": user, "query": query}


def kernel_of(html: str) -> str:
    m = re.search(r'"kernelId": "([0-9a-f-]{36})"', html) or KERNEL_ID.search(html.split("probe pid=")[0])
    assert m, "no kernel id in the page"
    return m[1] if m.lastindex else m[0]


def kernels(launched: Launched) -> list[psutil.Process]:
    """The kernel processes under Voila."""
    found = []
    for p in psutil.Process(launched.process.pid).children(recursive=True):
        try:
            if "ipykernel_launcher" in " ".join(p.cmdline()):
                found.append(p)
        except psutil.NoSuchProcess:
            pass
    return found


def environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode(errors="replace").partition("=")[::2] for item in raw if item)


def client(source: str = "127.0.0.1", **kwargs: Any) -> httpx.Client:
    """An HTTP client whose TCP connections come from `source` (any 127.x.y.z reaches 127.0.0.1)."""
    return httpx.Client(transport=httpx.HTTPTransport(local_address=source), timeout=120, **kwargs)


def kernel_model(launched: Launched, kernel_id: str) -> httpx.Response:
    headers = {"Authorization": f"token {launched.token}"}
    return httpx.get(f"{launched.base_url}/api/kernels/{kernel_id}", headers=headers, timeout=30)


def wait_for(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"not within {timeout:.0f} s: {what}"
        time.sleep(0.5)


@pytest.fixture
def serve(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., Launched]]:
    """`serve(preheat=0, **settings)`: `flywheel dashboards` (no API) on the probe notebook."""
    started: list[Launched] = []

    def start(preheat: int = 0, **env: str) -> Launched:
        for name in SETTINGS:
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("FLYWHEEL_HOME", str(tmp_path / "home"))
        monkeypatch.chdir(tmp_path)
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        get_settings.cache_clear()
        launched = launch(
            port=0,
            open_api=False,
            directory=probe_notebook(tmp_path / "pages"),
            block=False,
            echo=lambda line: None,
            preheat=preheat,
        )
        started.append(launched)
        return launched

    yield start
    for launched in started:
        launched.stop()
    get_settings.cache_clear()


@pytest.fixture
def chromium() -> Iterator[Any]:
    if not CHROMIUM.exists():
        pytest.fail("no /usr/bin/chromium: run scripts/install-test-deps (as root)", pytrace=False)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def open_connected(browser: Any, launched: Launched, url: str) -> tuple[Any, str]:
    """A page opened in Chromium from its token URL, once its kernel has the page's connection."""
    page = browser.new_page()
    page.goto(with_token(url, launched.token), wait_until="domcontentloaded", timeout=120_000)
    assert "token=" not in page.url  # the page dropped the token from its address
    kernel_id = kernel_of(page.content())
    wait_for(lambda: kernel_model(launched, kernel_id).json()["connections"] > 0, 60, "the page connected")
    return page, kernel_id


def test_voila_command_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = load_settings(
        {
            "FLYWHEEL_REVIEWER_HEADER": "X-Forwarded-User",
            "FLYWHEEL_TRUSTED_PROXIES": "10.0.0.0/8, 127.0.0.1",
            "FLYWHEEL_DASHBOARDS_HOSTS": "dash.example",
            "FLYWHEEL_KERNELS_PER_USER": "3",
            "FLYWHEEL_KERNEL_CONNECT_TIMEOUT": "20",
            "FLYWHEEL_DASHBOARDS_TOKEN": "sekrit",
        },
        env_file=None,
    )
    cmd = voila_command(Path("dashboards"), 1234, settings=settings)
    assert cmd[1:3] == ["-m", "flywheel.ui.voila_app"]
    assert "--FlywheelIdentityProvider.trusted_proxies=10.0.0.0/8,127.0.0.1/32" in cmd
    assert "--FlywheelVoila.allowed_hosts=dash.example" in cmd
    assert "--FlywheelVoila.kernels_per_user=3" in cmd
    assert "--FlywheelKernelManager.connect_timeout=20" in cmd
    assert "--MappingKernelManager.cull_interval=5" in cmd  # a never-connected page goes within 25 s
    assert not any("sekrit" in part for part in cmd)  # argv is readable by every local user
    bad = load_settings({"FLYWHEEL_TRUSTED_PROXIES": "127.0.0.1,proxy.example"}, env_file=None)
    with pytest.raises(ConfigError, match="proxy.example"):
        voila_command(Path("dashboards"), 1234, settings=bad)
    env = voila_env(
        {"FLYWHEEL_PREDICT_KEY": "p", "FLYWHEEL_FEEDBACK_KEY": "f", "FLYWHEEL_ADMIN_KEY": "a"},
        "tok",
    )
    assert "FLYWHEEL_PREDICT_KEY" not in env and "FLYWHEEL_FEEDBACK_KEY" not in env
    assert env["FLYWHEEL_ADMIN_KEY"] == "a" and env["FLYWHEEL_DASHBOARDS_TOKEN"] == "tok"
    assert with_token("http://h/p", "t") == "http://h/p?token=t"
    assert with_token("http://h/p?a=1", "t") == "http://h/p?a=1&token=t"


@pytest.mark.slow
def test_no_page_and_no_kernel_without_the_token_nor_for_another_host(serve: Callable[..., Launched]) -> None:
    secrets = {
        "FLYWHEEL_PREDICT_KEY": "predict-key-1",
        "FLYWHEEL_FEEDBACK_KEY": "feedback-key-1",
        "FLYWHEEL_ADMIN_KEY": "admin-key-1",
    }
    voila = serve(FLYWHEEL_DASHBOARDS_HOSTS="dash.example", **secrets)
    assert voila.token and voila.token != os.environ.get("FLYWHEEL_DASHBOARDS_TOKEN")  # made for this start
    url = voila.base_url + PAGE
    assert kernels(voila) == []
    with client() as anonymous:
        for attempt in (url, f"{url}?token=wrong", f"{url}?token="):
            r = anonymous.get(attempt)
            assert r.status_code == 302, (attempt, r.status_code)
            assert r.headers["location"].startswith("/login?")
        r = anonymous.get(url, headers={"Authorization": "token wrong"})
        assert r.status_code == 302 and r.headers["location"].startswith("/login?")
        nobody = "00000000-0000-0000-0000-000000000000"
        assert anonymous.get(f"{voila.base_url}/api/kernels/{nobody}").status_code == 403
        # DNS rebinding: a name that is not this server's is refused, token or not, any path
        signed = {"Authorization": f"token {voila.token}"}
        for path in (PAGE, "/voila/tree", "/voila/static/voila.js", "/login"):
            r = anonymous.get(voila.base_url + path, headers={**signed, "Host": "evil.example:8866"})
            assert r.status_code == 403, (path, r.status_code)
        for host in ("localhost", "127.0.0.1", "dash.example"):
            r = anonymous.get(f"{voila.base_url}/voila/tree", headers={**signed, "Host": f"{host}:1"})
            assert r.status_code == 200, (host, r.status_code)
    time.sleep(2)
    assert kernels(voila) == []  # nothing above took a kernel

    with client() as browser:  # the printed URL, as a person clicks it
        r = browser.get(with_token(url + "?model=m&user=ann", voila.token))
        assert r.status_code == 302 and r.headers["location"] == PAGE + "?model=m&user=ann"
        page = browser.get(url + "?model=m&user=ann")  # with the cookie the first answer set
        assert page.status_code == 200
    shown = probe(page.text)
    assert shown["query"] == "model=m&user=ann"  # the token never reached the kernel
    assert [p.pid for p in kernels(voila)] == [int(shown["pid"])]
    env = environ(int(shown["pid"]))
    for name in ("FLYWHEEL_PREDICT_KEY", "FLYWHEEL_FEEDBACK_KEY", "FLYWHEEL_DASHBOARDS_TOKEN"):
        assert name not in env, name
    assert voila.token not in "\0".join(env.values())
    assert env["FLYWHEEL_ADMIN_KEY"] == "admin-key-1"  # deliberate: the models page checks a typed key


@pytest.mark.slow
def test_reviewer_header_counts_only_from_a_trusted_proxy(serve: Callable[..., Launched]) -> None:
    header = {"FLYWHEEL_REVIEWER_HEADER": "X-Forwarded-User", "FLYWHEEL_TRUSTED_PROXIES": "127.0.0.1"}
    voila = serve(preheat=1, **header)
    url = voila.base_url + PAGE
    mallory = {"X-Forwarded-User": "Mallory"}
    with client("127.0.0.1") as proxy:  # the proxy signed her in: no token needed
        shown = probe(proxy.get(url, headers=mallory).text)
        assert shown["user"] == "Mallory"
    with client("127.0.0.2") as outsider:  # the same header, straight from a client
        r = outsider.get(url, headers=mallory)
        assert r.status_code == 302 and r.headers["location"].startswith("/login?")
        r = outsider.get(url, headers={**mallory, "Authorization": f"token {voila.token}"})
        assert r.status_code == 200
        assert probe(r.text)["user"] == "-"  # signed in by the token; the header was dropped


@pytest.mark.slow
@pytest.mark.browser
def test_kernels_are_capped_per_visitor(serve: Callable[..., Launched], chromium: Any) -> None:
    voila = serve(FLYWHEEL_KERNELS_PER_USER="2", FLYWHEEL_KERNEL_CONNECT_TIMEOUT="600")
    url = voila.base_url + PAGE
    signed = {"Authorization": f"token {voila.token}"}
    first, k1 = open_connected(chromium, voila, url)
    with client() as script:
        k2 = kernel_of(script.get(url, headers=signed).text)  # fetched, never connected
        k3 = kernel_of(script.get(url, headers=signed).text)  # over the cap: k2 makes room
        gone = lambda k: lambda: kernel_model(voila, k).status_code == 404  # noqa: E731
        wait_for(gone(k2), 30, "k2 shut down to make room")  # in the background, the page waits not
        assert kernel_model(voila, k1).status_code == 200 and kernel_model(voila, k3).status_code == 200
        second, k4 = open_connected(chromium, voila, url)  # k3 makes room
        wait_for(gone(k3), 30, "k3 shut down to make room")
        wait_for(lambda: len(kernels(voila)) == 2, 30, "two kernel processes left")
        before = len(kernels(voila))
        r = script.get(url, headers=signed)  # both open pages are connected: refused
        assert r.status_code == 429 and "FLYWHEEL_KERNELS_PER_USER" in r.text
        assert len(kernels(voila)) == before == 2
    with client("127.0.0.2") as other:  # another visitor has a cap of their own
        assert other.get(url, headers=signed).status_code == 200
    for page in (first, second):
        page.close()


@pytest.mark.slow
@pytest.mark.browser
def test_a_page_that_never_connected_loses_its_kernel(serve: Callable[..., Launched], chromium: Any) -> None:
    voila = serve(FLYWHEEL_KERNEL_CONNECT_TIMEOUT="5")
    url = voila.base_url + PAGE
    with client() as script:
        lost = kernel_of(script.get(url, headers={"Authorization": f"token {voila.token}"}).text)
    page, kept = open_connected(chromium, voila, url)
    fetched = time.monotonic()
    wait_for(lambda: kernel_model(voila, lost).status_code == 404, 60, "the unconnected page's kernel culled")
    assert time.monotonic() - fetched < 60
    page.close()  # a closed tab keeps its kernel FLYWHEEL_KERNEL_IDLE_TIMEOUT (a reload may come back)
    time.sleep(10)
    assert kernel_model(voila, kept).status_code == 200


def test_dashboards_auth_proxy_takes_the_header_and_the_proxies() -> None:
    from flywheel.cli import build_parser, dashboards_settings

    def settings(*argv: str) -> Any:
        return dashboards_settings(build_parser().parse_args(["dashboards", *argv]))

    get_settings.cache_clear()
    chosen = settings("--auth", "proxy", "--reviewer-header", "X-Auth-User", "--trusted-proxies", "10.1.2.3")
    assert chosen.flywheel_reviewer_header == "X-Auth-User"
    assert chosen.flywheel_trusted_proxies == "10.1.2.3"
    assert settings().flywheel_reviewer_header == get_settings().flywheel_reviewer_header
    with pytest.raises(ConfigError, match="--reviewer-header"):
        settings("--reviewer-header", "X-Auth-User")  # only with --auth proxy
    if not get_settings().flywheel_reviewer_header:
        with pytest.raises(ConfigError, match="needs the header your proxy sets"):
            settings("--auth", "proxy")


@pytest.mark.slow
def test_flywheel_dashboards_auth_proxy_signs_in_by_the_proxys_header(tmp_path: Path) -> None:
    """The documented reverse-proxy setup, as a user starts it: `flywheel dashboards --auth proxy`."""
    import subprocess
    import sys

    from processes import free_port, interrupt_up

    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in SETTINGS}
    env.update(FLYWHEEL_HOME=str(tmp_path / "home"), FLYWHEEL_PREHEAT_KERNELS="0", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "flywheel", "dashboards", "--no-api", "--port", str(port)]
    cmd += ["--auth", "proxy", "--reviewer-header", "X-Forwarded-User", "--trusted-proxies", "127.0.0.1"]
    log = (tmp_path / "dashboards.log").open("wb")
    process = subprocess.Popen(
        cmd, env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    tree = f"http://127.0.0.1:{port}/voila/tree"
    try:

        def up() -> bool:
            assert process.poll() is None, (tmp_path / "dashboards.log").read_text()[-3000:]
            try:
                return httpx.get(tree, timeout=5).status_code in (200, 302)
            except httpx.HTTPError:
                return False

        wait_for(up, 120, "flywheel dashboards answered")
        with client("127.0.0.1") as proxy:
            assert proxy.get(tree, headers={"X-Forwarded-User": "alice"}).status_code == 200
            r = proxy.get(tree)  # the proxy let a request through without signing anyone in
            assert r.status_code == 302 and r.headers["location"].startswith("/login?")
        with client("127.0.0.2") as outsider:  # the header straight from a client counts for nothing
            r = outsider.get(tree, headers={"X-Forwarded-User": "alice"})
            assert r.status_code == 302 and r.headers["location"].startswith("/login?")
        wait_for(
            lambda: (
                "signed in by the X-Forwarded-User header from 127.0.0.1"
                in (tmp_path / "dashboards.log").read_text()
            ),
            30,
            "the printed sign-in line",
        )
    finally:
        # Ctrl-C, as a user stops it (Voila runs in a session of its own: what is left is killed)
        interrupt_up(process)
        log.close()
