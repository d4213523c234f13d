"""The fleet page (the operator's): live sandboxes by status and image, owners and what they
use, the latency of creates and commands (from the metrics' histograms: counts per bucket and
the quantiles they bound), and the nodes the placement knows."""

from __future__ import annotations

from collections import Counter, defaultdict

from aviato.server.dashboard.render import bars, bytes_text, esc, table
from aviato.server.lifecycle import Lifecycle
from aviato.server.metrics import RPC_SECONDS, SANDBOX_START_SECONDS
from aviato.server.placement import Placement

__all__ = ["quantile", "render"]

_SHOWN_METHODS = ("CreateSandbox", "Exec", "RunCommand", "ReadFile", "WriteFile", "PullImage")


def _buckets(metric: object, method: str | None) -> list[tuple[float, float]]:
    """The cumulative (upper bound, count) pairs of a histogram, of one method when labelled."""
    out: list[tuple[float, float]] = []
    for family in metric.collect():  # type: ignore[attr-defined]
        for sample in family.samples:
            if not sample.name.endswith("_bucket"):
                continue
            if method is not None and sample.labels.get("method") != method:
                continue
            out.append((float(sample.labels["le"]), float(sample.value)))
    return sorted(out)


def quantile(buckets: list[tuple[float, float]], q: float) -> float | None:
    """The upper bound of the bucket holding the q-quantile (None without observations)."""
    if not buckets or buckets[-1][1] == 0:
        return None
    wanted = q * buckets[-1][1]
    for bound, count in buckets:
        if count >= wanted:
            return bound
    return buckets[-1][0]  # pragma: no cover


def _seconds(value: float | None) -> str:
    if value is None:
        return ""
    if value == float("inf"):
        return "> 300 s"
    return f"≤ {value * 1000:g} ms" if value < 1 else f"≤ {value:g} s"


def _latency_rows() -> tuple[list[list[str]], str]:
    rows: list[list[str]] = []
    charts = ""
    series = [("time to RUNNING", _buckets(SANDBOX_START_SECONDS, None))]
    series += [(m, _buckets(RPC_SECONDS, m)) for m in _SHOWN_METHODS]
    for name, buckets in series:
        total = buckets[-1][1] if buckets else 0
        rows.append([esc(name), f"{total:g}"] + [
            esc(_seconds(quantile(buckets, q))) for q in (0.5, 0.9, 0.99)
        ])  # fmt: skip
        if name in ("time to RUNNING", "RunCommand", "Exec") and total:
            previous = 0.0
            per_bucket = []
            for bound, count in buckets:
                if count - previous > 0:
                    per_bucket.append((_seconds(bound), count - previous))
                previous = count
            charts += bars(f"latency-{name}", f"{name}: calls per latency bucket", per_bucket)
    return rows, charts


def render(lifecycle: Lifecycle, placement: Placement) -> str:
    records = lifecycle.live_records()
    history = lifecycle.usage
    states = Counter(r.status.name.lower() for r in records)
    images = Counter(r.config.image for r in records)
    owners: dict[str, list[float]] = defaultdict(lambda: [0, 0, 0])
    for rec in records:
        totals = owners[rec.owner]
        totals[0] += 1
        latest = history.latest(rec.id)
        if latest is not None:
            totals[1] += max(0, latest.memory_bytes)
            totals[2] += max(0, latest.pids)
    latency, latency_charts = _latency_rows()
    per_node = Counter(r.node for r in records)
    nodes = [
        [esc(n.node), esc(n.hostname), f'<span class="status {esc(n.state)}">{esc(n.state)}</span>',
         f"{n.cpu:g}" if n.cpu else "", bytes_text(n.memory_bytes) if n.memory_bytes else "",
         str(per_node.get(n.node, 0)), esc(n.detail)]
        for n in placement.health()
    ]  # fmt: skip
    return (
        '<section class="counts">'
        + bars("states", "Live sandboxes by status", sorted(states.items()))
        + bars("images", "Live sandboxes by image", images.most_common(12))
        + "</section><h2>Owners</h2>"
        + table(
            ["owner", "live sandboxes", "memory", "tasks"],
            [
                [esc(o), f"{t[0]:g}", bytes_text(t[1]), f"{t[2]:g}"]
                for o, t in sorted(owners.items())
            ],
        )
        + "<h2>Latency</h2>"
        + table(["what", "calls", "p50", "p90", "p99"], latency, cls="latency")
        + latency_charts
        + f"<h2>Nodes ({esc(placement.name)} placement)</h2>"
        + table(["node", "host", "state", "cpu", "memory", "sandboxes", "detail"], nodes)
        + f'<p class="empty">Usage sampled every {history.interval:g} s; '
        f"{history.sample_count()} samples held.</p>"
    )
