"""`aviato keys quota` and the limit (and warm pool) flags of `aviato server start`.

The service started here uses a cgroup parent of its own (`aviato-test-...`), removed at the
end: its limits must not touch the parent other services on this machine share.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import time
from pathlib import Path

import pytest
from clitools import Cli, assert_one_line_error


@pytest.mark.slow
def test_keys_quota_sets_shows_and_resets(idle_cli: Cli) -> None:
    out = idle_cli.ok("keys", "quota", "--owner", "alice", "--max-sandboxes", "3",
                      "--max-memory", "2Gi").stdout  # fmt: skip
    assert out.split("\n")[1].split() == ["alice", "3", "default", "2Gi", "default"]
    idle_cli.ok("keys", "quota", "--owner", "bob", "--max-cpu", "1500m", "--max-disk", "0")
    rows = json.loads(idle_cli.ok("keys", "quota", "--json").stdout)
    assert rows == [
        {"owner": "alice", "sandboxes": 3, "cpu_millis": None, "memory_bytes": 2 << 30,
         "disk_bytes": None},
        {"owner": "bob", "sandboxes": None, "cpu_millis": 1500, "memory_bytes": None,
         "disk_bytes": 0},
    ]  # fmt: skip
    assert "no bound" in idle_cli.ok("keys", "quota", "--owner", "bob").stdout
    out = idle_cli.ok("keys", "quota", "--owner", "alice", "--max-memory", "default").stdout
    assert out.split("\n")[1].split() == ["alice", "3", "default", "default", "default"]
    idle_cli.ok("keys", "quota", "--owner", "alice", "--reset")
    assert [r["owner"] for r in json.loads(idle_cli.ok("keys", "quota", "--json").stdout)] == [
        "bob"
    ]
    # Mistakes are usage errors that name the option and what it accepts.
    bad = idle_cli("keys", "quota", "--owner", "alice", "--max-memory", "12Q")
    assert bad.returncode == 2 and "--max-memory" in bad.stderr and "default" in bad.stderr
    bad = idle_cli("keys", "quota", "--max-cpu", "1")
    assert bad.returncode == 2 and "--owner" in bad.stderr
    bad = idle_cli("keys", "quota", "--owner", "x" * 200, "--max-cpu", "1")
    assert bad.returncode == 2 and "--owner" in bad.stderr


@pytest.mark.slow
def test_server_start_takes_the_limits(idle_cli: Cli) -> None:
    parent = f"aviato-test-{secrets.token_hex(4)}"
    try:
        idle_cli.ok("server", "start", "--owner-max-sandboxes", "1", "--owner-max-memory", "1Gi",
                    "--cgroup-parent", parent, "--cgroup-memory", "3Gi",
                    "--cgroup-pids", "1234", "--warm-pool", "1")  # fmt: skip

        def status() -> dict[str, str]:
            lines = idle_cli.ok("server", "status").stdout.splitlines()
            return {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in lines)}

        deadline = time.monotonic() + 30
        while not (fields := status())["warm pool"].startswith("1 of 1 ready"):
            assert time.monotonic() < deadline, fields["warm pool"]
            time.sleep(0.1)
        assert fields["quota (local)"].startswith("sandboxes 0 of 1, cpu 0 (no bound), memory 0")
        if fields["cgroups"] != "none":
            assert fields["all sandboxes"] == f"memory 3Gi, pids 1234 (parent cgroup {parent})"
        first = idle_cli.ok("run").stdout.strip()  # the pool's member: it counts once claimed
        assert_one_line_error(idle_cli("run"), "quota reached: you have 1 live sandbox and")
        assert "1 creates served" in status()["warm pool"]
        idle_cli.ok("rm", "-y", first)
        # Flags given before the subcommand are a usage error, as for --listen.
        wrong = idle_cli("server", "--owner-max-sandboxes", "1", "status")
        assert wrong.returncode == 2 and "after the subcommand" in wrong.stderr
    finally:
        idle_cli("rm", "--all", "-y")
        idle_cli("server", "stop")
        for root in Path("/sys/fs/cgroup").iterdir():
            for directory in sorted((root / parent).glob("**/"), key=lambda p: -len(p.parts)):
                with contextlib.suppress(OSError):
                    directory.rmdir()
