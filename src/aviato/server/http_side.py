"""The HTTP side of the service (`aviato server --http HOST:PORT`): `/metrics` for Prometheus
and the dashboard (`server/dashboard/`), with `aiohttp` on the service's own event loop.

Where: the operator's address (`--http`, or `AVIATO_HTTP` for a service the SDK starts by
itself), else 127.0.0.1 on a free port for a service that listens on no other host
(`config.default_http`), else nowhere. On a loopback address the service's own user needs no
key (`http_auth`); anywhere else every request needs an API key, and the traffic is plaintext
unless the service has `--tls-cert/--tls-key` (then the HTTP side speaks HTTPS with the same
certificate).

Every request is authenticated first (`http_auth.HttpCaller`): 401 without an owner (an HTML
page that links to the login form for a browser's page, plain text otherwise). `/metrics` and
the fleet page answer the operator only (owner "local"): 403 for other owners.

The side shares the loop with gRPC: handlers do no blocking work (the registry's reads are
the same SQLite reads the API does; a scrape renders in about a millisecond with 500
sandboxes, docs/benchmarks.md). Request bodies are bounded (the login form: 4 KiB).
"""

from __future__ import annotations

import contextlib
import logging
import ssl
from collections.abc import Awaitable, Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from aviato.server.auth import LOCAL_OWNER, Authenticator
from aviato.server.config import ServerConfig, parse_listen
from aviato.server.dashboard import OWNER, Dashboard
from aviato.server.errors import ServiceError
from aviato.server.http_auth import COOKIE, HttpCaller
from aviato.server.lifecycle import Lifecycle
from aviato.server.metrics import REGISTRY
from aviato.server.metrics_state import ServiceState
from aviato.server.placement import Placement

__all__ = ["HttpSide"]

log = logging.getLogger("aviato.server.http")

_MAX_BODY = 4096
SHUTDOWN_SECONDS = 1.0
_OPEN_PATHS = frozenset({"/login", "/static/dashboard.js", "/static/dashboard.css"})

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class HttpSide:
    """The HTTP side's server: `start()` binds, `close()` stops (see the module docstring)."""

    def __init__(
        self,
        config: ServerConfig,
        lifecycle: Lifecycle,
        placement: Placement,
        auth: Authenticator,
    ) -> None:
        assert config.http is not None
        self._config = config
        self._caller = HttpCaller(auth)
        self._state = ServiceState(lifecycle, placement, config.max_sandboxes)
        self._tls = bool(config.tls_cert and config.tls_key)
        self._dashboard = Dashboard(lifecycle, placement, auth, secure_cookie=self._tls)
        self._runner: web.AppRunner | None = None
        self.address = ""

    def _app(self) -> web.Application:
        app = web.Application(middlewares=[self._authenticate], client_max_size=_MAX_BODY)
        app.router.add_get("/metrics", self._metrics)
        self._dashboard.add_routes(app)
        return app

    async def start(self) -> None:
        host, port = parse_listen(self._config.http or "")
        context: ssl.SSLContext | None = None
        if self._tls:
            assert self._config.tls_cert is not None and self._config.tls_key is not None
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(self._config.tls_cert, self._config.tls_key)
        REGISTRY.register(self._state)
        # A handler is cancelled when its client goes (a log follower whose browser left must
        # not hold its slot, or the service's stop, until the sandbox writes again); at stop,
        # requests still running get a second.
        self._runner = web.AppRunner(
            self._app(),
            access_log=None,
            handle_signals=False,
            handler_cancellation=True,
            shutdown_timeout=SHUTDOWN_SECONDS,
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port, ssl_context=context, reuse_address=True)
        try:
            await site.start()
        except OSError as e:
            await self.close()
            raise OSError(f"--http: cannot listen on {host}:{port}: {e.strerror or e}") from e
        bound = self._runner.addresses[0] if self._runner.addresses else (host, port)
        shown = f"[{bound[0]}]" if ":" in str(bound[0]) else str(bound[0])
        self.address = f"{shown}:{bound[1]}"
        scheme = "https" if context else "http"
        log.info("http side on %s://%s (/metrics, dashboard at /)", scheme, self.address)
        if context is None and not _loopback(host):
            log.warning("the HTTP side on %s is plaintext: API keys are sent in the clear", host)

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
            with contextlib.suppress(KeyError):
                REGISTRY.unregister(self._state)

    @web.middleware
    async def _authenticate(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        transport = request.transport
        peer = transport.get_extra_info("peername") if transport else None
        local = transport.get_extra_info("sockname") if transport else None
        try:
            owner = self._caller.owner_of(
                request.headers,
                request.cookies,
                tuple(peer[:2]) if peer else None,
                tuple(local[:2]) if local else None,
            )
        except ServiceError as e:
            if request.path in _OPEN_PATHS:
                return await handler(request)
            return self._dashboard.refused(
                request, 401, str(e), drop_cookie=COOKIE in request.cookies
            )
        request[OWNER] = owner
        return await handler(request)

    async def _metrics(self, request: web.Request) -> web.StreamResponse:
        if request[OWNER] != LOCAL_OWNER:
            return web.Response(
                status=403,
                text="metrics are the operator's: the local user, or a key of owner 'local'\n",
            )
        body = generate_latest(REGISTRY)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def _loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")
