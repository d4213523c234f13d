"""`aviato snapshot create|ls|rm`, `aviato run --snapshot` and `--disk-layer` (the snapshots
themselves are proven in tests/server/test_snapshots.py and tests/runtime)."""

from __future__ import annotations

import json
import os

import pytest
from clitools import TAG, Cli, assert_one_line_error, ids_of

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="snapshots need a root service")


def test_snapshot_commands(cli: Cli) -> None:
    source = ids_of(cli.ok("run", "--tag", TAG, "--disk-layer").stdout)[0]
    started: list[str] = [source]
    try:
        cli.ok("exec", source, "--", "sh", "-c", "echo prepared > /workspace/state.txt")
        snap = cli.ok("snapshot", "create", source).stdout.strip()
        assert snap and snap in cli.ok("snapshot", "ls").stdout
        listed = json.loads(cli.ok("snapshot", "ls", "--json").stdout)
        assert any(row["id"] == snap for row in listed)

        copy = ids_of(cli.ok("run", "--tag", TAG, "--snapshot", snap).stdout)[0]
        started.append(copy)
        assert cli.ok("exec", copy, "--", "cat", "/workspace/state.txt").stdout == "prepared\n"
        assert_one_line_error(cli("snapshot", "rm", snap), "is in use", copy)
        cli.ok("rm", "-y", copy)
        started.remove(copy)
        cli.ok("snapshot", "rm", snap)
        assert snap not in cli.ok("snapshot", "ls").stdout
        assert_one_line_error(cli("snapshot", "rm", snap), "not found")
    finally:
        for sandbox_id in started:
            cli("rm", "-y", sandbox_id)
