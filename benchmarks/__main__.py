"""`python -m benchmarks`: measure aviato and its references in one run; print the table.

Run it from the repository root. See benchmarks/__init__.py and docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
try:  # a checkout without `pip install -e .`
    import aviato  # noqa: F401
except ImportError:  # pragma: no cover
    sys.path.insert(0, str(ROOT / "src"))

from benchmarks import _report  # noqa: E402
from benchmarks._plan import FULL, QUICK, Plan  # noqa: E402
from benchmarks._stats import load_average, machine_facts  # noqa: E402
from benchmarks._system import Skip, System  # noqa: E402
from benchmarks.figures import FIGURES  # noqa: E402
from benchmarks.floor import FloorSystem  # noqa: E402
from benchmarks.raw_bwrap import RawBwrapSystem  # noqa: E402
from benchmarks.scenarios import run_figure  # noqa: E402
from benchmarks.sdk import AviatoSystem  # noqa: E402

REQUIRED = ("aviato", "floor", "bwrap")  # must run; docker may be skipped
# What a two-worker test cluster can hold (the density figure's 500 sandboxes do not fit).
CLUSTER_FIGURES = ("create", "exec", "files")


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Measure aviato against plain subprocess, raw bubblewrap and Docker.",
    )
    p.add_argument("--quick", action="store_true",
                   help="a reduced set that runs in under a minute (smoke test)")  # fmt: skip
    p.add_argument("--only", default="",
                   help=f"comma-separated figures to run: {','.join(FIGURES)}")  # fmt: skip
    p.add_argument("--json", metavar="PATH",
                   help="where to write the results (default: a file in the temp dir)")  # fmt: skip
    p.add_argument("--no-docker", action="store_true", help="skip the Docker reference")
    p.add_argument("--base-url", default="", metavar="URL",
                   help="measure the aviato service at URL (e.g. one on a cluster) instead of "
                        "the local one the SDK starts")  # fmt: skip
    p.add_argument("--cluster", action="store_true",
                   help="start the test Ray cluster (tests/cluster/raycluster.py: 2 workers in "
                        "network namespaces, root only) and measure aviato placed on it; "
                        f"figures default to {','.join(CLUSTER_FIGURES)}")  # fmt: skip
    args = p.parse_args(argv)
    only = [f.strip() for f in args.only.split(",") if f.strip()]
    unknown = [f for f in only if f not in FIGURES]
    if unknown:
        p.error(f"unknown figure(s) {', '.join(unknown)}; choose from {', '.join(FIGURES)}")
    args.figures = only or list(CLUSTER_FIGURES if args.cluster else FIGURES)
    return args


def _sigterm(signo: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signo)  # runs the cleanup in `finally`


def start_systems(
    args: argparse.Namespace, started: list[System], status: dict[str, dict[str, Any]]
) -> None:
    """Starts every system, appending those that run to `started` (so that an interruption
    still closes them) and recording each one's status."""
    candidates: list[System] = [AviatoSystem(args.base_url), FloorSystem(), RawBwrapSystem()]
    if args.no_docker:
        status["docker"] = {"status": "skipped", "reason": "--no-docker"}
    else:
        from benchmarks.docker_ref import DockerSystem

        candidates.append(DockerSystem())
    for system in candidates:
        t0 = time.perf_counter()
        log(f"starting {system.label} ...")
        started.append(system)
        try:
            system.start()
        except Skip as exc:
            status[system.name] = {"status": "skipped", "reason": str(exc)}
            log(f"  skipped: {exc}")
            started.remove(system)
            system.close()
            continue
        except Exception as exc:
            reason = f"could not start: {type(exc).__name__}: {exc}"
            status[system.name] = {"status": "skipped", "reason": reason}
            log(f"  skipped: {reason}")
            started.remove(system)
            system.close()
            continue
        status[system.name] = {"status": "ok", "start_seconds": round(time.perf_counter() - t0, 2),
                               **system.describe()}  # fmt: skip


def run(args: argparse.Namespace) -> int:
    plan: Plan = QUICK if args.quick else FULL
    command = shlex.join(["python", "-m", "benchmarks", *sys.argv[1:]])
    json_path = Path(args.json or Path(tempfile.gettempdir()) / f"aviato-benchmarks-"
                     f"{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}.json")  # fmt: skip
    t_start = time.perf_counter()
    meta: dict[str, Any] = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": command,
        "machine": machine_facts(),
        "quick": plan.quick,
        "load_average_before": load_average(),
    }
    figures: dict[str, dict[str, dict[str, Any]]] = {}
    systems: list[System] = []
    status: dict[str, dict[str, Any]] = {}
    cluster: Any = None
    try:
        if args.cluster:
            log("starting the test Ray cluster ...")
            sys.path.insert(0, str(ROOT / "tests" / "cluster"))
            from raycluster import RayCluster

            cluster = RayCluster()
            cluster.start()
            args.base_url = cluster.base_url
            meta["placement"] = "ray (tests/cluster/raycluster.py: head + 2 workers, netns)"
        start_systems(args, systems, status)
        for name in args.figures:
            figure = FIGURES[name]
            log(f"[{name}] {figure.title}")
            figures[name] = run_figure(figure, systems, plan, log)
    finally:
        for system in reversed(systems):
            try:
                system.close()
            except Exception as exc:  # close() must not raise; report and go on
                log(f"closing {system.name}: {exc}")
        if cluster is not None:
            cluster.stop()
    names = [n for n in ("aviato", "floor", "bwrap", "docker") if n in status]
    rows = _report.build_rows(plan, figures)
    table = _report.render_table(rows, status, names)
    notes = _report.notes(figures, status)
    missed = [r["label"] for r in rows if r["met"] is False]
    document = {
        "schema": 1,
        "meta": {
            **meta,
            "load_average_after": load_average(),
            "seconds": round(time.perf_counter() - t_start, 1),
        },
        "plan": plan.as_dict(),
        "systems": status,
        "figures": figures,
        "rows": rows,
        "targets_missed": missed,
        "notes": notes,
    }
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(document, indent=2) + "\n")
    machine: dict[str, Any] = machine_facts()
    print(f"\naviato benchmarks — {meta['date']} — {machine['cpu']}, {machine['cores']} cores, "
          f"{machine['memory_gib']} GiB, {machine['os']}, kernel {machine['kernel']}, "
          f"cgroup {machine['cgroup']}, {machine['host_mounts']} host mounts, "
          f"{machine['supervisor']}")  # fmt: skip
    print(f"command: {command}" + ("   (quick: reduced sizes; targets not judged)"
                                   if plan.quick else ""))  # fmt: skip
    print()
    print(table)
    print("\nratio = aviato ÷ reference (times, memory: < 1 is better; rates: > 1 is better); "
          "* = series cut short by its time bound")  # fmt: skip
    for line in notes:
        print(f"note: {line}")
    if missed:
        print("targets missed: " + "; ".join(missed))
    print(f"JSON: {json_path}")
    if any(status.get(n, {}).get("status") != "ok" for n in REQUIRED):
        return 2
    failed = any(
        res.get("errors") or res.get("stop_errors") or res.get("failed")
        for by_system in figures.values()
        for name, res in by_system.items()
        if name in REQUIRED
    )
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _sigterm)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
