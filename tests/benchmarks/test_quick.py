"""Smoke test of the benchmarks: `python -m benchmarks --quick --no-docker --json FILE` runs,
measures every figure for aviato and the two local references, and reports no errors.

No speed is asserted: this machine may be busy, and the figures are for docs/benchmarks.md.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
FIGURES = (
    "create", "burst", "exec", "rl", "files", "density", "warm_pool", "throughput", "memory"
)  # fmt: skip
MEASURED = ("aviato", "floor", "bwrap")
# Figures that a reference cannot have: the service's memory (aviato alone has a service), and
# throughput where a box is a new sandbox per command (raw bwrap): their cells say "n/a".
MEASURED_IN = {"memory": ("aviato",), "throughput": ("aviato", "floor")}


def _run_quick(tmp_path: Path) -> dict[str, Any]:
    out = tmp_path / "results.json"
    env = dict(os.environ)
    parts = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), *parts])
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--no-docker", "--json", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout}\n{done.stderr[-4000:]}"
    assert "| figure |" in done.stdout  # the table was printed
    document: dict[str, Any] = json.loads(out.read_text())
    return document


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


@pytest.mark.slow
def test_quick_run_measures_every_figure_without_errors(tmp_path: Path) -> None:
    doc = _run_quick(tmp_path)
    assert doc["meta"]["quick"] is True
    assert doc["meta"]["command"].startswith("python -m benchmarks --quick")
    for name in MEASURED:
        assert doc["systems"][name]["status"] == "ok", doc["systems"][name]
    assert doc["systems"]["docker"] == {"status": "skipped", "reason": "--no-docker"}

    assert set(doc["figures"]) == set(FIGURES)
    for figure in FIGURES:
        for name in MEASURED:
            result = doc["figures"][figure][name]
            assert "failed" not in result, (figure, name, result)
            assert result["errors"] == 0, (figure, name, result)
            assert result.get("stop_errors", 0) == 0, (figure, name, result)

    rows = doc["rows"]
    assert {row["figure"] for row in rows} == set(FIGURES)
    for row in rows:
        measured = MEASURED_IN.get(row["figure"], MEASURED)
        for name in measured:
            assert _number(row["values"][name]), (row["label"], name, row["values"])
        assert sorted(row["not_measured"]) == sorted(set(MEASURED) - set(measured)), row
        if row["key"] != "burst_errors":
            for ref in ("floor", "bwrap"):
                if row["values"][ref]:  # a ratio to a zero (e.g. no memory measured) is None
                    assert _number(row["ratios"][ref]), row
        assert row["values"]["docker"] is None
