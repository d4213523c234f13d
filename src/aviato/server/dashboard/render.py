"""HTML of the dashboard: the page around every view, tables, numbers in words, and charts as
inline SVG (no script, no library: a polyline over a frame, labelled with its range).

Everything a user or a sandbox chose (ids, tags, images, commands, owners, log lines) goes
through `esc` (html.escape with quotes) before it reaches a page.
"""

from __future__ import annotations

import html
import time
from collections.abc import Iterable, Sequence

__all__ = ["bytes_text", "chart", "esc", "page", "table", "when"]

_WIDTH, _HEIGHT, _PAD = 560, 140, 28


def esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def bytes_text(n: float) -> str:
    if n < 0:
        return "?"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def when(ns: int | None) -> str:
    if not ns:
        return ""
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ns / 1e9))


def age(ns: int | None, now_ns: int | None = None) -> str:
    if not ns:
        return ""
    seconds = max(0, ((now_ns or time.time_ns()) - ns) // 1_000_000_000)
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    if seconds < 172800:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d"


def table(headers: Sequence[str], rows: Iterable[Sequence[str]], *, cls: str = "") -> str:
    """A table; the cells are HTML already (escape what they hold with `esc`)."""
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    if not body:
        body = f'<tr><td colspan="{len(headers)}" class="empty">none</td></tr>'
    return f'<table class="{esc(cls)}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def chart(kind: str, title: str, points: Sequence[tuple[int, float]], unit: str) -> str:
    """A line chart of (time ns, value) as inline SVG; "no samples yet" when there are none."""
    if len(points) < 2:
        return (
            f'<figure class="chart" data-kind="{esc(kind)}"><figcaption>{esc(title)}</figcaption>'
            f'<p class="empty">no samples yet</p></figure>'
        )
    t0, t1 = points[0][0], points[-1][0]
    top = max(max(v for _, v in points), 1e-9)
    span = max(t1 - t0, 1)
    inner_w, inner_h = _WIDTH - 2 * _PAD, _HEIGHT - 2 * _PAD
    coords = " ".join(
        f"{_PAD + (t - t0) / span * inner_w:.1f},{_PAD + inner_h - v / top * inner_h:.1f}"
        for t, v in points
    )
    label = _value_text(top, unit)
    return (
        f'<figure class="chart" data-kind="{esc(kind)}"><figcaption>{esc(title)}</figcaption>'
        f'<svg viewBox="0 0 {_WIDTH} {_HEIGHT}" width="{_WIDTH}" height="{_HEIGHT}" '
        f'role="img" aria-label="{esc(title)}">'
        f'<rect x="{_PAD}" y="{_PAD}" width="{inner_w}" height="{inner_h}" class="frame"/>'
        f'<polyline points="{coords}" class="line"/>'
        f'<text x="{_PAD}" y="{_PAD - 8}" class="label">{esc(label)}</text>'
        f'<text x="{_PAD}" y="{_HEIGHT - 8}" class="label">{esc(_clock(t0))}</text>'
        f'<text x="{_WIDTH - _PAD}" y="{_HEIGHT - 8}" class="label end">{esc(_clock(t1))}</text>'
        f"</svg></figure>"
    )


def bars(kind: str, title: str, values: Sequence[tuple[str, float]]) -> str:
    """A horizontal bar chart (label, value) as inline SVG."""
    if not values:
        return f'<figure class="chart" data-kind="{esc(kind)}"><p class="empty">none</p></figure>'
    top = max(max(v for _, v in values), 1e-9)
    row = 18
    height = row * len(values) + 8
    parts = []
    for i, (name, value) in enumerate(values):
        y = 4 + i * row
        w = value / top * (_WIDTH - 200)
        parts.append(
            f'<text x="0" y="{y + 12}" class="label">{esc(name)}</text>'
            f'<rect x="120" y="{y + 2}" width="{w:.1f}" height="{row - 6}" class="bar"/>'
            f'<text x="{124 + w:.1f}" y="{y + 12}" class="label">{value:g}</text>'
        )
    return (
        f'<figure class="chart" data-kind="{esc(kind)}"><figcaption>{esc(title)}</figcaption>'
        f'<svg viewBox="0 0 {_WIDTH} {height}" width="{_WIDTH}" height="{height}" role="img" '
        f'aria-label="{esc(title)}">{"".join(parts)}</svg></figure>'
    )


def _value_text(value: float, unit: str) -> str:
    if unit == "bytes":
        return bytes_text(value)
    return f"{value:.1f}{unit}" if unit else f"{value:g}"


def _clock(ns: int) -> str:
    return time.strftime("%H:%M:%S", time.gmtime(ns / 1e9))


def page(title: str, body: str, *, owner: str, script: bool = False) -> str:
    """A whole page: the navigation, who is looking, `body` (HTML), the script if asked."""
    admin = owner == "local"
    nav = '<a href="/">Sandboxes</a>' + (' <a href="/fleet">Fleet</a>' if admin else "")
    who = f"{esc(owner)} (operator)" if admin else esc(owner)
    logout = '<form method="post" action="/logout" class="logout"><button>log out</button></form>'
    if not owner:  # nobody yet: a refusal, the login form
        nav = who = logout = ""
    tail = '<script src="/static/dashboard.js"></script>' if script else ""
    return (
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        f"<title>{esc(title)} · aviato</title>"
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        '<link rel="stylesheet" href="/static/dashboard.css"></head><body>'
        f'<header><strong>aviato</strong> <nav>{nav}</nav><span class="who">{who}</span>'
        f"{logout}</header><main><h1>{esc(title)}</h1>{body}</main>{tail}</body></html>"
    )
