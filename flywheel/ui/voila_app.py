"""The dashboards' Voila server: Voila 0.5 with a token or a trusted proxy's header, a Host check,
a cap on kernels per visitor and the culling of pages that never connected.

`flywheel dashboards` and `flywheel up` start it as `python -m flywheel.ui.voila_app` (see
`flywheel.ui.dashboards.voila_command`); it takes Voila's own options. What it adds to Voila:

- **Who the visitor is** (`FlywheelIdentityProvider`, jupyter_server's identity machinery): the
  token in FLYWHEEL_DASHBOARDS_TOKEN (read from the environment, then removed from it, so no kernel
  inherits it) as `?token=` once (the page then redirects to itself without it and a cookie carries
  the login), as `Authorization: token ...`, or typed into Voila's login page; or, with
  FLYWHEEL_REVIEWER_HEADER, that header when the TCP peer is in FLYWHEEL_TRUSTED_PROXIES (loopback by
  default). From any other peer the header is dropped before Voila hands headers to the kernel. A
  page request that is neither is sent to the login page before any kernel is taken; kernel and
  websocket requests get 403.
- **Host check** (DNS rebinding): a request whose Host is not an IP address, `localhost`, the bound
  host name or one of FLYWHEEL_DASHBOARDS_HOSTS gets 403, whatever its path (a routing rule ahead of
  every handler).
- **Kernels per visitor** (FLYWHEEL_KERNELS_PER_USER): the signed-in user (header) or, with the
  token, the client's address. A page beyond the cap first shuts down that visitor's oldest kernels
  with no page connected (closed tabs, pages fetched and never opened); when every one of them has a
  page connected the request is refused with 429 before a kernel is taken.
- **Pages that never connected** (FLYWHEEL_KERNEL_CONNECT_TIMEOUT): a kernel handed to a page whose
  browser never opened its websocket is shut down that many seconds after it went idle, instead of
  FLYWHEEL_KERNEL_IDLE_TIMEOUT. Preheated kernels waiting in the pool are never culled (Voila's own
  rule); kernels whose page connected once keep the idle timeout (a dropped connection may return).

Voila's `prelaunch_hook` would be the documented place for such checks, but Voila refuses it
together with `preheat_kernel`, which the rating page needs to open in under 2 s.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import secrets
import time
from typing import Any
from urllib.parse import parse_qsl, urlencode

from jupyter_server.auth.identity import PasswordIdentityProvider, User
from jupyter_server.services.kernels.kernelmanager import AsyncMappingKernelManager
from tornado import web
from tornado.httputil import HTTPServerRequest
from tornado.routing import Matcher, Rule
from traitlets import Float, Integer, Unicode
from voila.app import Voila
from voila.tornado.handler import TornadoVoilaHandler

from flywheel.config import take_environment
from flywheel.ui.dashboards import TOKEN_VARIABLE, is_ip_literal, proxy_networks

# read by Voila alone: taken out of its environment before the first kernel starts
VOILA_ONLY_VARIABLES = (TOKEN_VARIABLE, "JUPYTER_TOKEN", "JUPYTER_TOKEN_FILE")


class FlywheelIdentityProvider(PasswordIdentityProvider):
    """The token (query, header, cookie, login form) or a trusted proxy's header names the visitor."""

    reviewer_header = Unicode("", config=True, help="the header a trusted proxy signs users in with")
    trusted_proxies = Unicode("127.0.0.1,::1", config=True, help="peers whose header counts")

    @property
    def proxy_networks(self) -> list[Any]:
        if getattr(self, "_networks_of", None) != self.trusted_proxies:
            self._networks, self._networks_of = proxy_networks(self.trusted_proxies), self.trusted_proxies
        return self._networks

    def trusts(self, handler: web.RequestHandler) -> bool:
        """Is the request's TCP peer a trusted proxy? (Voila's server ignores X-Forwarded-For.)"""
        try:
            peer = ipaddress.ip_address(handler.request.remote_ip or "")
        except ValueError:
            return False
        return any(peer in net for net in self.proxy_networks)

    def header_user(self, handler: web.RequestHandler) -> str | None:
        if not self.reviewer_header or not self.trusts(handler):
            return None
        name = (handler.request.headers.get(self.reviewer_header) or "").strip().lower()
        return name or None

    async def _get_user(self, handler: web.RequestHandler) -> User | None:
        name = self.header_user(handler)
        if name is not None:
            return User(username=name, name=name, display_name=name)
        return await super()._get_user(handler)

    async def get_user_token(self, handler: web.RequestHandler) -> User | None:
        """The token, compared in constant time (jupyter_server compares with ==)."""
        given = self.get_token(handler) or ""
        if not self.token or not hmac.compare_digest(given.encode(), self.token.encode()):
            return None
        user = self.get_user_cookie(handler)
        if not isinstance(user, User) and user is not None:
            user = await user
        return user or self.generate_anonymous_user(handler)

    def process_login_form(self, handler: web.RequestHandler) -> User | None:
        typed = handler.get_argument("password", default="")
        if self.token and hmac.compare_digest(typed.encode(), self.token.encode()):
            return self.generate_anonymous_user(handler)
        return None


# seconds a kernel let go to make room lives on: its shutdown (a process exiting, over a second of
# CPU) then does not compete with the page being drawn, as a preheated kernel's refill waits too
LET_GO_DELAY = 5.0


class FlywheelKernelManager(AsyncMappingKernelManager):
    """Jupyter's kernel manager, knowing whose page each kernel serves and whether it ever connected."""

    connect_timeout = Float(45.0, config=True, help="cull a handed-out kernel never connected after this")

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._pages: dict[str, tuple[str, float]] = {}  # kernel id -> (visitor, handed out at)
        self._connected_once: set[str] = set()
        self._leaving: set[asyncio.Future[Any]] = set()  # shutdowns under way (`let_go`)

    def hand_out(self, kernel_id: str, visitor: str) -> None:
        self._pages[kernel_id] = (visitor, time.monotonic())

    def pages_of(self, visitor: str) -> list[str]:
        """The visitor's live kernels, oldest first."""
        for kernel_id in [k for k in self._pages if k not in self]:
            self._pages.pop(kernel_id, None)
            self._connected_once.discard(kernel_id)
        mine = [(at, k) for k, (who, at) in self._pages.items() if who == visitor]
        return [k for _, k in sorted(mine)]

    def let_go(self, kernel_id: str) -> None:
        """Shut the kernel down in the background, `LET_GO_DELAY` seconds later: it no longer counts
        as anyone's page at once, and the page that made room neither waits for it nor shares the CPU
        with it (awaited in the request, every page opened over the cap took 1.5 s longer to be
        interactive: benchmarks/page_bench.py, returning reviewer 2.56 s vs 1.05 s before the cap)."""
        self._pages.pop(kernel_id, None)
        task = asyncio.ensure_future(self._shut_down_later(kernel_id))
        self._leaving.add(task)
        task.add_done_callback(self._leaving.discard)

    async def _shut_down_later(self, kernel_id: str) -> None:
        await asyncio.sleep(LET_GO_DELAY)  # after the page that made room has drawn
        if kernel_id in self:
            await self.shutdown_kernel(kernel_id)

    def connected(self, kernel_id: str) -> bool:
        return self._kernel_connections.get(kernel_id, 0) > 0

    def notify_connect(self, kernel_id: str) -> None:
        self._connected_once.add(kernel_id)
        super().notify_connect(kernel_id)

    async def cull_kernel_if_idle(self, kernel_id: str) -> None:
        page = self._pages.get(kernel_id)
        kernel = self._kernels.get(kernel_id)
        never = kernel_id not in self._connected_once and not self.connected(kernel_id)
        if page and kernel is not None and never:
            last = getattr(kernel, "last_activity", None)
            quiet = time.time() - last.timestamp() if last is not None else float("inf")
            waited = min(time.monotonic() - page[1], quiet)
            if getattr(kernel, "execution_state", None) != "busy" and waited > self.connect_timeout:
                self.log.warning(
                    "Culling kernel %s: its page (%s) never connected in %.0f s", kernel_id, page[0], waited
                )
                await self.shutdown_kernel(kernel_id)
                return
        await super().cull_kernel_if_idle(kernel_id)


class _HandingOut:
    """The kernel manager as one page request sees it: the kernel it gets is recorded as that
    visitor's (Voila's handler takes a preheated kernel or starts one in the middle of its code)."""

    def __init__(self, manager: Any, visitor: str) -> None:
        self._manager, self._visitor = manager, visitor

    def __getattr__(self, name: str) -> Any:
        return getattr(self._manager, name)

    async def get_rendered_notebook(self, *args: Any, **kwargs: Any) -> Any:
        task, cache, kernel_id = await self._manager.get_rendered_notebook(*args, **kwargs)
        self._manager.hand_out(kernel_id, self._visitor)
        return task, cache, kernel_id

    async def start_kernel(self, *args: Any, **kwargs: Any) -> str:
        kernel_id = await self._manager.start_kernel(*args, **kwargs)
        self._manager.hand_out(kernel_id, self._visitor)
        return str(kernel_id)


class FlywheelVoilaHandler(TornadoVoilaHandler):
    """Voila's page handler with the token taken out of the address, untrusted headers dropped and
    the visitor's kernels capped, all before a kernel is taken."""

    visitor = ""

    @property
    def kernel_manager(self) -> Any:  # jupyter_server's property, seen through _HandingOut
        manager = self.settings["kernel_manager"]
        return _HandingOut(manager, self.visitor) if self.visitor else manager

    @web.authenticated
    async def get(self, path: str | None = None) -> None:
        provider: FlywheelIdentityProvider = self.identity_provider  # type: ignore[assignment]
        if self.get_query_argument("token", None) is not None:
            # signed in by the token (the cookie is set): the same page without it, so the token
            # stays out of the address bar, the history, the kernel's QUERY_STRING and later links
            query = [(k, v) for k, v in parse_qsl(self.request.query, keep_blank_values=True) if k != "token"]
            self.redirect(self.request.path + (f"?{urlencode(query)}" if query else ""))
            return
        header_user = provider.header_user(self)
        if provider.reviewer_header and header_user is None:
            self.request.headers.pop(provider.reviewer_header, None)  # an untrusted peer's claim
        self.visitor = f"user:{header_user}" if header_user else f"address:{self.request.remote_ip}"
        await self._make_room()
        await super().get(path)

    async def _make_room(self) -> None:
        manager = self.settings["kernel_manager"]
        cap = self.settings["flywheel_kernels_per_user"]
        pages = manager.pages_of(self.visitor)
        for kernel_id in [k for k in pages if not manager.connected(k)]:
            if len(pages) < cap:
                break
            self.log.warning("Shutting down kernel %s of %s: over %d pages", kernel_id, self.visitor, cap)
            manager.let_go(kernel_id)
            pages.remove(kernel_id)
        if len(pages) >= cap:
            raise web.HTTPError(
                429,
                "%d dashboard pages are open for you (FLYWHEEL_KERNELS_PER_USER); close one and reload",
                cap,
                reason="Too many open dashboard pages",
            )


class _BadHost(Matcher):
    def __init__(self, allowed: set[str]) -> None:
        self.allowed = allowed

    def match(self, request: HTTPServerRequest) -> dict[str, Any] | None:
        host = request.host_name
        return None if is_ip_literal(host) or host in self.allowed else {}


class _Forbidden(web.RequestHandler):
    def prepare(self) -> None:
        self.set_status(403)
        self.finish("403: this server does not answer to that Host name\n")


class FlywheelVoila(Voila):
    name = "voila"  # Voila's config files (voila.json) and settings key

    allowed_hosts = Unicode("", config=True, help="Host names accepted besides IP addresses and localhost")
    kernels_per_user = Integer(5, config=True, help="kernels one visitor's pages may hold")

    def initialize(self, argv: Any = None) -> None:
        super().initialize(argv)
        token = take_environment(VOILA_ONLY_VARIABLES).get(TOKEN_VARIABLE, "").strip()
        if not token:
            token = secrets.token_urlsafe(24)
            self.log.warning("No %s given: the dashboards' token is %s", TOKEN_VARIABLE, token)
        self.token = token
        self.identity_provider_class = FlywheelIdentityProvider
        self.voila_configuration.multi_kernel_manager_class = FlywheelKernelManager

    def init_settings(self) -> dict[str, Any]:
        settings = super().init_settings()
        settings["flywheel_kernels_per_user"] = self.kernels_per_user
        return settings

    def init_handlers(self) -> list[Any]:
        handlers = super().init_handlers()
        return [
            (h[0], FlywheelVoilaHandler, *h[2:]) if len(h) > 1 and h[1] is TornadoVoilaHandler else h
            for h in handlers
        ]

    def listen(self) -> None:
        allowed = {"localhost", *(h.strip().lower() for h in self.allowed_hosts.split(",") if h.strip())}
        if self.ip and not is_ip_literal(self.ip):
            allowed.add(self.ip.lower())
        self.app.default_router.rules.insert(0, Rule(_BadHost(allowed), _Forbidden))
        super().listen()


main = FlywheelVoila.launch_instance

if __name__ == "__main__":
    main()
