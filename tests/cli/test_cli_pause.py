"""`aviato pause | resume | extend` and `aviato run --idle-timeout`."""

from __future__ import annotations

import json
import time

from clitools import TAG, Cli, assert_one_line_error


def test_pause_resume_extend(cli: Cli, sandbox: str) -> None:
    assert cli.ok("pause", sandbox).stdout.strip() == sandbox
    assert json.loads(cli.ok("get", sandbox, "--json").stdout)["status"] == "paused"
    assert sandbox in cli.ok("ls", "-q", "--status", "paused").stdout
    refused = cli("exec", sandbox, "--", "/bin/true")
    assert refused.returncode != 0 and "paused" in refused.stderr
    assert cli.ok("resume", sandbox).stdout.strip() == sandbox
    assert json.loads(cli.ok("get", sandbox, "--json").stdout)["status"] == "running"
    before = json.loads(cli.ok("get", sandbox, "--json").stdout)["expires_at"]
    cli.ok("extend", sandbox, "30m")
    after = json.loads(cli.ok("get", sandbox, "--json").stdout)["expires_at"]
    assert after > before
    assert_one_line_error(cli("extend", sandbox, "soon"), "DURATION", "not a duration")
    assert_one_line_error(cli("extend", sandbox, "30d"), "can still be added")


def test_run_idle_timeout(cli: Cli) -> None:
    sandbox_id = cli.ok("run", "--tag", TAG, "--idle-timeout", "1s").stdout.strip()
    try:
        for _ in range(100):
            record = json.loads(cli.ok("get", sandbox_id, "--json").stdout)
            if record["status"] != "running":
                break
            time.sleep(0.1)
        assert record["status"] == "terminated" and record["status_reason"] == "idle", record
    finally:
        cli.ok("rm", "-y", sandbox_id)
