"""The dashboard's views: the list of sandboxes, a sandbox's page, the fleet, the login form,
and the two live feeds the script reads (a sandbox's log as server-sent events, its charts).

Scoping is the API's: an owner sees its own sandboxes and no other (another owner's id is
"not found", as on the API); the operator (owner "local") sees every owner's and may filter
by owner, and alone sees the fleet page. Pages are rendered on the server; the script only
follows the log and refreshes the charts.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from importlib import resources

from aiohttp import web

from aviato.runtime.base import SandboxRuntimeError
from aviato.server.auth import LOCAL_OWNER, Authenticator
from aviato.server.command_log import COMMANDS
from aviato.server.dashboard import fleet
from aviato.server.dashboard.render import age, bytes_text, chart, esc, page, table, when
from aviato.server.errors import ServiceError
from aviato.server.lifecycle import Lifecycle
from aviato.server.log_stream import sandbox_log_records
from aviato.server.placement import Placement
from aviato.server.records import ALL_STATUSES, LIVE_STATUSES, SandboxRecord, SandboxStatus
from aviato.server.usage_history import UsagePoint

__all__ = ["OWNER", "Dashboard"]

OWNER = "aviato_owner"  # the request's owner, set by the HTTP side's authentication
COOKIE = "aviato_key"
MAX_LOG_STREAMS = 64  # followers of logs at once (each holds a task and a file)
LOG_TAIL = 200
LOG_LINE_BYTES = 16 << 10
LIST_LIMIT = 200
_STATIC = ("dashboard.js", "dashboard.css")
_TYPES = {"js": "text/javascript", "css": "text/css"}


def _owner(request: web.Request) -> str:
    return str(request[OWNER])


def cpu_series(points: list[UsagePoint]) -> list[tuple[int, float]]:
    """CPU % of one core between each two samples, at the later one's time."""
    out = []
    for a, b in itertools.pairwise(points):
        if b.time_ns > a.time_ns and a.cpu_ns >= 0 and b.cpu_ns >= 0:
            out.append((b.time_ns, max(0.0, (b.cpu_ns - a.cpu_ns) / (b.time_ns - a.time_ns) * 100)))
    return out


class Dashboard:
    """The views (see the module docstring), added to an aiohttp app by `add_routes`."""

    def __init__(
        self,
        lifecycle: Lifecycle,
        placement: Placement,
        auth: Authenticator,
        *,
        secure_cookie: bool,
    ) -> None:
        self._lifecycle = lifecycle
        self._placement = placement
        self._auth = auth
        self._secure = secure_cookie
        self._log_streams = asyncio.Semaphore(MAX_LOG_STREAMS)

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get("/", self.sandboxes)
        app.router.add_get("/sandboxes/{id}", self.sandbox)
        app.router.add_get("/sandboxes/{id}/charts", self.charts)
        app.router.add_get("/sandboxes/{id}/logs", self.logs)
        app.router.add_get("/api/sandboxes/{id}/usage", self.usage_json)
        app.router.add_get("/fleet", self.fleet)
        app.router.add_get("/login", self.login_form)
        app.router.add_post("/login", self.login)
        app.router.add_post("/logout", self.logout)
        app.router.add_get("/static/{name}", self.static)

    # -- refusals and login -----------------------------------------------------------------

    def refused(
        self, request: web.Request, status: int, why: str, *, drop_cookie: bool = False
    ) -> web.Response:
        """401/403/404 in the form the asker reads: a page for a browser, text otherwise."""
        if "text/html" in request.headers.get("Accept", ""):
            body = f'<p class="error">{esc(why)}</p>' + (
                '<p><a href="/login">Log in with an API key</a></p>' if status == 401 else ""
            )
            response = web.Response(
                status=status, text=page("Refused", body, owner=""), content_type="text/html"
            )
        else:
            response = web.Response(status=status, text=why + "\n")
        if drop_cookie:
            response.del_cookie(COOKIE, path="/")
        return response

    async def login_form(self, request: web.Request) -> web.Response:
        form = (
            '<form method="post" action="/login" class="login">'
            '<label>API key <input type="password" name="key" autocomplete="off" '
            'placeholder="avt_..." required></label> <button>Log in</button></form>'
            "<p>The key is kept in a cookie of this site only (HttpOnly, SameSite=Strict). "
            "The service's own user needs none on a loopback address.</p>"
        )
        return web.Response(text=page("Log in", form, owner=""), content_type="text/html")

    async def login(self, request: web.Request) -> web.Response:
        origin = request.headers.get("Origin")
        if origin is not None and origin.split("://", 1)[-1] != request.host:
            return self.refused(request, 403, "a login must come from this site's own form")
        form = await request.post()
        key = str(form.get("key", "")).strip()
        try:
            self._auth.owner_of("http", [("authorization", f"Bearer {key}")])
        except ServiceError as e:
            return self.refused(request, 401, str(e))
        response = web.HTTPSeeOther("/")
        response.set_cookie(
            COOKIE, key, httponly=True, samesite="Strict", secure=self._secure, path="/"
        )
        return response

    async def logout(self, request: web.Request) -> web.Response:
        response = web.HTTPSeeOther("/login")
        response.del_cookie(COOKIE, path="/")
        return response

    async def static(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in _STATIC:
            raise web.HTTPNotFound()
        text = resources.files("aviato.server.dashboard").joinpath("static", name).read_text()
        return web.Response(text=text, content_type=_TYPES[name.rsplit(".", 1)[1]])

    # -- finding sandboxes --------------------------------------------------------------------

    def _find(self, request: web.Request) -> SandboxRecord:
        """The sandbox of the path, as its owner or the operator may see it; 404 otherwise."""
        owner, sandbox_id = _owner(request), request.match_info["id"]
        if owner == LOCAL_OWNER:
            found = next((r for r in self._lifecycle.live_records() if r.id == sandbox_id), None)
            found = found or self._lifecycle.registry.get_sandbox(sandbox_id)
            if found is not None:
                return found
            raise web.HTTPNotFound(text=f"sandbox {sandbox_id} not found")
        try:
            return self._lifecycle.record(owner, sandbox_id)
        except ServiceError:
            raise web.HTTPNotFound(text=f"sandbox {sandbox_id} not found") from None

    async def _listed(
        self, owner: str, statuses: frozenset[SandboxStatus], tag: str
    ) -> list[SandboxRecord]:
        """The newest LIST_LIMIT sandboxes of `owner` ("" every owner) in `statuses` with
        `tag`. Live ones come from memory; ended ones from the registry, an owner at a time
        with the loop let go between owners (a page of records is a few ms of decoding)."""
        live = [
            r for r in self._lifecycle.live_records(owner or None)
            if r.status in statuses and (not tag or tag in r.tags)
        ]  # fmt: skip
        records = live
        if statuses - LIVE_STATUSES:
            seen = {r.id for r in live}
            for who in [owner] if owner else self._owners():
                found, _ = self._lifecycle.registry.list_sandboxes(
                    who, statuses=statuses - LIVE_STATUSES, tags=[tag] if tag else [],
                    limit=LIST_LIMIT,
                )  # fmt: skip
                records += [r for r in found if r.id not in seen]
                await asyncio.sleep(0)
        records.sort(key=lambda r: r.created_ns, reverse=True)
        return records[:LIST_LIMIT]

    def _owners(self) -> list[str]:
        keys = {k.owner for k in self._lifecycle.registry.list_keys()}
        live = {r.owner for r in self._lifecycle.live_records()}
        return sorted(keys | live | {LOCAL_OWNER})

    async def sandboxes(self, request: web.Request) -> web.Response:
        owner = _owner(request)
        admin = owner == LOCAL_OWNER
        tag = request.query.get("tag", "").strip()
        status_text = request.query.get("status", "live").strip().lower()
        statuses = _statuses(status_text)
        if statuses is None:
            return self.refused(request, 400, f"status: {status_text!r} is not a status")
        wanted_owner = request.query.get("owner", "").strip() if admin else owner
        records = await self._listed(wanted_owner, statuses, tag)
        history = self._lifecycle.usage
        rows = []
        for rec in records:
            recent = None if rec.terminal else history.recent(rec.id)
            rows.append([
                f'<a href="/sandboxes/{esc(rec.id)}">{esc(rec.id)}</a>',
                f'<span class="status {esc(rec.status.name.lower())}">'
                f"{esc(rec.status.name.lower())}</span>",
                esc(rec.config.image), esc(" ".join(rec.tags)), esc(rec.owner),
                f"{recent[2] * 100:.1f}%" if recent and recent[2] is not None else "",
                bytes_text(recent[0]) if recent and recent[0] >= 0 else "",
                esc(age(rec.created_ns)),
            ])  # fmt: skip
        owner_field = (
            '<label>owner <select name="owner"><option value="">all</option>'
            + "".join(
                f"<option{' selected' if o == wanted_owner else ''}>{esc(o)}</option>"
                for o in self._owners()
            )
            + "</select></label> "
            if admin
            else ""
        )
        status_options = "".join(
            f"<option{' selected' if s == status_text else ''}>{s}</option>"
            for s in ("live", "all", *(s.name.lower() for s in SandboxStatus))
        )
        filters = (
            f'<form method="get" class="filters">{owner_field}'
            f'<label>tag <input name="tag" value="{esc(tag)}"></label> '
            f'<label>status <select name="status">{status_options}</select></label> '
            "<button>Filter</button></form>"
        )
        body = filters + table(
            ["id", "status", "image", "tags", "owner", "cpu", "memory", "age"], rows,
            cls="sandboxes",
        )  # fmt: skip
        return web.Response(text=page("Sandboxes", body, owner=owner), content_type="text/html")

    # -- one sandbox --------------------------------------------------------------------------

    def _charts_html(self, rec: SandboxRecord) -> str:
        history = self._lifecycle.usage.history(rec.id)
        if history.unavailable:
            return f'<p class="empty">No usage history: {esc(history.unavailable)}.</p>'
        points = history.points
        memory = [(p.time_ns, float(p.memory_bytes)) for p in points if p.memory_bytes >= 0]
        pids = [(p.time_ns, float(p.pids)) for p in points if p.pids >= 0]
        return (
            chart("cpu", "CPU (% of one core)", cpu_series(points), "%")
            + chart("memory", "Memory", memory, "bytes")
            + chart("pids", "Tasks", pids, "")
        )

    async def sandbox(self, request: web.Request) -> web.Response:
        rec = self._find(request)
        config = rec.config
        usage = rec.network_usage
        facts = [
            ("status", rec.status.name.lower() + (f" ({rec.reason})" if rec.reason else "")),
            ("owner", rec.owner), ("image", config.image),
            ("command", " ".join(config.command) or "(keep-alive)"),
            ("tags", " ".join(rec.tags)), ("node", rec.node),
            ("created", when(rec.created_ns)), ("started", when(rec.started_ns)),
            ("ended", when(rec.ended_ns)), ("expires", when(rec.expires_ns)),
            ("exit code", "" if rec.exit_code is None else str(rec.exit_code)),
            ("limits", f"memory {bytes_text(config.memory_bytes)}, pids {config.pids}, cpu "
                       + (f"{config.cpu_millis / 1000:g}" if config.cpu_millis else "no limit")),
            ("network", f"{bytes_text(usage.bytes_sent)} sent, "
                        f"{bytes_text(usage.bytes_received)} received, "
                        f"{usage.connections} connections, {usage.refused} refused"),
            ("running now", f"{self._lifecycle.active_calls(rec.id)} commands and file "
                            "transfers"),
        ]  # fmt: skip
        record = "<dl class=record>" + "".join(
            f"<dt>{esc(k)}</dt><dd>{esc(v)}</dd>" for k, v in facts if v
        ) + "</dl>"  # fmt: skip
        body = (
            f'<div class="sandbox" data-sandbox="{esc(rec.id)}" '
            f'data-live="{"0" if rec.terminal else "1"}">{record}'
            f'<h2>Usage</h2><div id="charts">{self._charts_html(rec)}</div>'
            f"<h2>Recent commands</h2>{_commands_html(rec.id)}"
            '<h2>Log <span id="log-state" class="empty"></span></h2>'
            '<pre id="log" class="log"></pre></div>'
        )
        return web.Response(
            text=page(f"Sandbox {rec.id}", body, owner=_owner(request), script=True),
            content_type="text/html",
        )

    async def charts(self, request: web.Request) -> web.Response:
        return web.Response(text=self._charts_html(self._find(request)), content_type="text/html")

    async def usage_json(self, request: web.Request) -> web.Response:
        rec = self._find(request)
        history = self._lifecycle.usage.history(rec.id)
        return web.json_response({
            "sandbox_id": rec.id,
            "step_seconds": history.step_ns / 1e9,
            "unavailable": history.unavailable,
            "active_calls": self._lifecycle.active_calls(rec.id),
            "samples": [
                {"time_ns": p.time_ns, "cpu_ns": p.cpu_ns, "memory_bytes": p.memory_bytes,
                 "pids": p.pids}
                for p in history.points
            ],
        })  # fmt: skip

    async def logs(self, request: web.Request) -> web.StreamResponse:
        """The sandbox's main log as server-sent events: the last LOG_TAIL records, then the
        new ones until it ends (event "end"). At most MAX_LOG_STREAMS at once (503 beyond)."""
        rec = self._find(request)
        if self._log_streams.locked():
            return self.refused(request, 503, "too many log streams are open; try again later")
        async with self._log_streams:
            response = web.StreamResponse(
                headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store"}
            )
            await response.prepare(request)
            records = sandbox_log_records(self._lifecycle, rec.owner, rec.id, LOG_TAIL, True)
            try:
                async for record in records:
                    text = record.data[:LOG_LINE_BYTES].decode("utf-8", "replace")
                    event = json.dumps({"stream": record.stream, "text": text})
                    await response.write(f"data: {event}\n\n".encode())
                await response.write(b"event: end\ndata: {}\n\n")
            except (ServiceError, SandboxRuntimeError, ConnectionResetError):
                pass
            return response

    # -- the fleet ----------------------------------------------------------------------------

    async def fleet(self, request: web.Request) -> web.Response:
        owner = _owner(request)
        if owner != LOCAL_OWNER:
            return self.refused(request, 403, "the fleet page is the operator's")
        body = fleet.render(self._lifecycle, self._placement)
        return web.Response(text=page("Fleet", body, owner=owner), content_type="text/html")


def _commands_html(sandbox_id: str) -> str:
    rows = [
        [esc(when(c.started_ns)), f"<code>{esc(c.argv)}</code>",
         esc(c.error or str(c.exit_code)), f"{c.wall_seconds:.3f} s",
         f"{c.cpu_seconds:.3f} s" if not c.error else "",
         bytes_text(c.peak_memory_bytes) if not c.error else ""]
        for c in COMMANDS.of(sandbox_id)
    ]  # fmt: skip
    return table(["started", "command", "exit", "wall", "cpu", "peak memory"], rows)


def _statuses(text: str) -> frozenset[SandboxStatus] | None:
    if text == "live":
        return LIVE_STATUSES
    if text == "all":
        return ALL_STATUSES
    for status in SandboxStatus:
        if status.name.lower() == text:
            return frozenset({status})
    return None
