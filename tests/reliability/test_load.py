"""Load: many sandboxes at once and many execs with zero errors and zero leaks.

Runs `benchmarks/reliability_load.py` (the full-size scenario is 500 sandboxes / 10,000 execs;
its result is in docs/reliability.md) in a reduced size: 100 sandboxes created at once and
1,000 execs, with the service's soft RLIMIT_NOFILE at the common default of 1024 (the service
must raise it itself). Afterwards: zero leaked processes, cgroups, mounts, runtime directories,
kept logs and temporary files, counted before and after.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from .harness import ROOT, slow_enabled


def run_load(tmp_path: Path, sandboxes: int, execs: int) -> dict[str, object]:
    out = tmp_path / "load.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "reliability_load.py"),
            "--sandboxes",
            str(sandboxes),
            "--execs",
            str(execs),
            "--nofile",
            "1024",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert out.exists(), f"no result:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    result: dict[str, object] = json.loads(out.read_text())
    return result


def _check(result: dict[str, object], sandboxes: int, execs: int) -> None:
    examples = [
        result[phase].get("error_examples")  # type: ignore[union-attr]
        for phase in ("create", "exec", "delete")
        if isinstance(result.get(phase), dict)
    ]
    summary = json.dumps(
        {
            "errors": result["errors"],
            "examples": examples,
            "leaks": result.get("leaks"),
            "create": result.get("create"),
            "log": str(result.get("service_log_tail", ""))[-1500:],
        }
    )
    assert result["errors"] == 0, summary
    assert result["create"]["created"] == sandboxes, summary  # type: ignore[index]
    assert result["exec"]["n"] == execs, summary  # type: ignore[index]
    assert result["running_after_execs"] == sandboxes, summary
    assert result["records_after_delete"] == 0, summary
    during = result["during"]  # the counters do see live sandboxes
    assert during["processes"] >= 2 * sandboxes, summary  # type: ignore[index]
    assert during["runtime_dirs"] == sandboxes, summary  # type: ignore[index]
    assert result["leaks"] == {}, summary
    after = result["after"]
    assert after["processes"] == 0 and after["cgroups"] == 0, summary  # type: ignore[index]
    assert after["runtime_dirs"] == 0 and after["tmp_entries"] == 0, summary  # type: ignore[index]
    assert result["ok"] is True, summary


@pytest.mark.slow
def test_100_sandboxes_1000_execs_no_errors_no_leaks(tmp_path: Path) -> None:
    _check(run_load(tmp_path, 100, 1000), 100, 1000)


@pytest.mark.slow
def test_full_size_500_sandboxes_10000_execs(tmp_path: Path) -> None:
    if not slow_enabled():
        pytest.skip("full size: set AVIATO_SLOW_TESTS=1 (or run benchmarks/reliability_load.py)")
    _check(run_load(tmp_path, 500, 10_000), 500, 10_000)
