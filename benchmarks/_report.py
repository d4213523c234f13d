"""The table: one row per figure, absolute values per system, ratios to each reference, targets.

A ratio is always aviato's value divided by the reference's, whatever the unit: for times and
memory below 1 means aviato is faster or smaller; for rates above 1 means aviato is faster.
The table is printed as Markdown, so it can be pasted into docs/benchmarks.md as it is.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from benchmarks._plan import Plan
from benchmarks._stats import MiB

TIMES = "\u00d7"  # multiplication sign
NONE = "\u2013"  # en dash: no value
SUBJECT = "aviato"
REFERENCES = ("floor", "bwrap", "docker")
SYSTEM_LABELS = {"aviato": "aviato", "floor": "floor", "bwrap": "raw bwrap", "docker": "docker"}


@dataclass(frozen=True)
class Target:
    """A goal: `op` "<=" or ">=" on aviato's value, or "ratio<=" / "ratio>=" on aviato's
    value divided by the reference `against`'s. `against_path` names the reference's value
    when it is not the row's own (async exec is held to the floor's `subprocess.run`)."""

    op: str
    value: float
    against: str = ""
    against_path: tuple[str, ...] = ()
    reference_text: str = ""

    def text(self, unit: str) -> str:
        sign = "≤" if self.op.endswith("<=") else "≥"
        if self.op.startswith("ratio"):
            what = self.reference_text or SYSTEM_LABELS[self.against]
            return f"{sign} {self.value:g}{TIMES} {what}"
        if unit == TIMES:
            return f"{sign} {self.value:g}{TIMES}"
        return f"{sign} {self.value:g} {unit}".rstrip()

    def ratio(self, subject: float | None, reference: float | None) -> float | None:
        if subject is None or reference is None or reference == 0:
            return None
        return round(subject / reference, 3)

    def met(self, value: float | None, ratio: float | None) -> bool | None:
        measured = ratio if self.op.startswith("ratio") else value
        if measured is None:
            return None
        return measured <= self.value if self.op.endswith("<=") else measured >= self.value


@dataclass(frozen=True)
class Row:
    figure: str
    key: str
    label: str
    path: tuple[str, ...]
    unit: str
    target: Target | None = None
    ratio: bool = True


def _size(nbytes: int) -> str:
    return f"{nbytes // MiB} MiB" if nbytes >= MiB else f"{nbytes // 1024} KiB"


FLOOR_SYNC = ("sync", "p50_ms")  # both APIs are held to `subprocess.run`
FLOOR_SYNC_P99 = ("sync", "p99_ms")
RUN = "floor (subprocess.run)"


def rows_for(plan: Plan) -> list[Row]:
    """Every figure's rows; the targets are issue 19's goals (and the density ones before)."""
    small, large = _size(plan.file_small), _size(plan.file_large)
    many = f"{plan.throughput_sandboxes} sandboxes {TIMES} {plan.in_flight} in flight"
    one = f"1 sandbox {TIMES} {plan.in_flight} in flight"
    return [
        Row("create", "create_p50", "create → first exec, p50", ("p50_ms",), "ms",
            Target("ratio<=", 1.2, "bwrap")),
        Row("create", "create_p99", "create → first exec, p99", ("p99_ms",), "ms"),
        Row("warm_pool", "warm_pool_p50", "create → first exec, warm pool, p50", ("p50_ms",),
            "ms", Target("<=", 3)),
        Row("burst", "burst_seconds", f"burst of {plan.burst}: all results", ("seconds",), "s",
            Target("ratio<=", 1.5, "bwrap")),
        Row("burst", "burst_errors", f"burst of {plan.burst}: errors", ("errors",), "",
            Target("<=", 0), ratio=False),
        Row("exec", "exec_sync_p50", "warm exec, sync API, p50", ("sync", "p50_ms"), "ms",
            Target("ratio<=", 1.3, "floor", FLOOR_SYNC, RUN)),
        Row("exec", "exec_sync_p99", "warm exec, sync API, p99", ("sync", "p99_ms"), "ms",
            Target("ratio<=", 2, "floor", FLOOR_SYNC_P99, RUN)),
        Row("exec", "exec_async_p50", "warm exec, async API, p50", ("async", "p50_ms"), "ms",
            Target("ratio<=", 1.3, "floor", FLOOR_SYNC, RUN)),
        Row("exec", "exec_async_p99", "warm exec, async API, p99", ("async", "p99_ms"), "ms",
            Target("ratio<=", 2, "floor", FLOOR_SYNC_P99, RUN)),
        Row("throughput", "throughput_many", f"peak execs/s, {many}", ("many", "execs_per_s"),
            "/s", Target("ratio>=", 0.8, "floor", (), "floor (fork+exec)")),
        Row("throughput", "throughput_one", f"peak execs/s, {one}", ("one", "execs_per_s"),
            "/s", Target("ratio>=", 0.8, "floor", (), "floor (fork+exec)")),
        Row("rl", "rl_rate",
            f"RL reward ({plan.rl_sandboxes}{TIMES}{plan.rl_programs}): programs/s",
            ("programs_per_s",), "/s", Target("ratio>=", 1.0, "floor")),
        Row("files", "write_small", f"file write {small}", ("small", "write_mb_s"), "MB/s"),
        Row("files", "read_small", f"file read {small}", ("small", "read_mb_s"), "MB/s"),
        Row("files", "write_large", f"file write {large}", ("large", "write_mb_s"), "MB/s",
            Target("ratio>=", 0.8, "floor", (), "floor (cat)")),
        Row("files", "read_large", f"file read {large}", ("large", "read_mb_s"), "MB/s",
            Target("ratio>=", 0.8, "floor", (), "floor (cat)")),
        Row("density", "idle_mib", f"idle memory per sandbox ({plan.idle})",
            ("per_sandbox_mib",), "MiB", Target("<=", 4)),
        Row("density", "stop_all", f"stop {plan.idle} idle sandboxes", ("stop_seconds",), "s",
            Target("<=", 5)),
        Row("memory", "memory_warm", f"service memory after {plan.memory_warmup} sandboxes",
            ("warm_mib",), "MiB", ratio=False),
        Row("memory", "memory_after",
            f"service memory after {plan.memory_warmup} + {plan.memory_sandboxes:,}",
            ("after_mib",), "MiB", ratio=False),
        Row("memory", "memory_growth", "service memory: after ÷ after warm-up", ("growth",),
            TIMES, Target("<=", 1.1), ratio=False),
    ]  # fmt: skip


def _dig(result: dict[str, Any] | None, path: tuple[str, ...]) -> float | None:
    node: Any = result
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return float(node) if isinstance(node, int | float) and not isinstance(node, bool) else None


def _truncated(result: dict[str, Any] | None, path: tuple[str, ...]) -> bool:
    if not isinstance(result, dict):
        return False
    if result.get("truncated"):
        return True
    sub = result.get(path[0]) if len(path) > 1 else None
    return isinstance(sub, dict) and bool(sub.get("truncated"))


def build_rows(plan: Plan, figures: dict[str, dict[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    """The table as data: values, ratios, target and whether aviato meets it."""
    out = []
    for row in rows_for(plan):
        by_system = figures.get(row.figure)
        if by_system is None:
            continue
        values = {name: _dig(by_system.get(name), row.path) for name in (SUBJECT, *REFERENCES)}
        truncated = [name for name, res in by_system.items() if _truncated(res, row.path)]
        unmeasured = [name for name, res in by_system.items() if res.get("not_measured")]
        ratios: dict[str, float | None] = {}
        subject = values.get(SUBJECT)
        for ref in REFERENCES:
            other = values.get(ref)
            ok = row.ratio and subject is not None and other not in (None, 0)
            ratios[ref] = round(subject / other, 3) if ok else None  # type: ignore[operator]
        met, goal_ratio = None, None
        if row.target is not None:
            target = row.target
            if target.against:
                path = target.against_path or row.path
                reference = _dig(by_system.get(target.against), path)
                goal_ratio = target.ratio(subject, reference)
            if not plan.quick:
                met = target.met(subject, goal_ratio)
        out.append({
            "figure": row.figure,
            "key": row.key,
            "label": row.label,
            "unit": row.unit,
            "values": values,
            "ratios": ratios,
            "truncated": truncated,
            "not_measured": unmeasured,
            "target": row.target.text(row.unit) if row.target else None,
            "goal_ratio": goal_ratio,
            "met": met,
        })  # fmt: skip
    return out


def fmt(value: float | None) -> str:
    if value is None:
        return NONE
    a = abs(value)
    if a >= 100:
        return f"{value:,.0f}"
    if a >= 10:
        return f"{value:.1f}"
    if a >= 1:
        return f"{value:.2f}"
    if a == 0:
        return "0"
    return f"{value:.3f}"


def _cell(
    rows_value: float | None,
    system: str,
    status: dict[str, dict[str, Any]],
    truncated: bool,
    unmeasured: bool = False,
) -> str:
    state = status.get(system, {})
    if state.get("status") == "skipped":
        return "skipped"
    if unmeasured:
        return "n/a"
    if rows_value is None:
        return "failed" if state.get("status") == "ok" else NONE
    return fmt(rows_value) + ("*" if truncated else "")


def render_table(
    rows: list[dict[str, Any]], status: dict[str, dict[str, Any]], systems: Sequence[str]
) -> str:
    refs = [s for s in systems if s != SUBJECT]
    head = ["figure", "unit", *(SYSTEM_LABELS[s] for s in systems),
            *(f"÷ {SYSTEM_LABELS[r]}" for r in refs), "target", "goal's ratio", "met"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for row in rows:
        cells = [row["label"], row["unit"]]
        for s in systems:
            cells.append(_cell(row["values"].get(s), s, status, s in row["truncated"],
                               s in row.get("not_measured", ())))  # fmt: skip
        for r in refs:
            ratio = row["ratios"].get(r)
            cells.append(NONE if ratio is None else f"{fmt(ratio)}{TIMES}")
        cells.append(row["target"] or "")
        goal = row.get("goal_ratio")
        cells.append("" if goal is None else f"{fmt(goal)}{TIMES}")
        met = row["met"]
        cells.append("" if row["target"] is None else {True: "yes", False: "**no**",
                                                       None: "n/a"}[met])  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def notes(
    figures: dict[str, dict[str, dict[str, Any]]], status: dict[str, dict[str, Any]]
) -> list[str]:
    """Skips, failures and errors, one line each."""
    out = []
    for name, state in status.items():
        if state.get("status") == "skipped":
            out.append(f"{SYSTEM_LABELS.get(name, name)} skipped: {state.get('reason')}")
    for figure, by_system in figures.items():
        for name, res in by_system.items():
            if res.get("failed"):
                out.append(f"{figure}/{name} failed: {res['failed']}")
            count = res.get("errors") or 0
            if count:
                examples = "; ".join(res.get("error_examples", [])[:2])
                for sub in ("sync", "async"):
                    if isinstance(res.get(sub), dict):
                        examples += "; ".join(res[sub].get("error_examples", [])[:2])
                out.append(f"{figure}/{name}: {count} errors ({examples})")
    return out
