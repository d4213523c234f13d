"""`aviato run | ls | get | stop | rm`: a sandbox's life through the command line."""

from __future__ import annotations

import json
import time

import pytest
from clitools import TAG, Cli, assert_one_line_error, ids_of


def test_run_prints_only_the_new_id(cli: Cli) -> None:
    result = cli.ok("run", "--tag", TAG)
    lines = ids_of(result.stdout)
    assert len(lines) == 1
    sandbox_id = lines[0]
    try:
        assert sandbox_id in ids_of(cli.ok("ls", "-q").stdout)
    finally:
        cli.ok("rm", "-y", sandbox_id)


@pytest.mark.slow
def test_ls_table_json_and_quiet(cli: Cli, sandbox: str) -> None:
    table = cli.ok("ls").stdout
    header, *rows = table.splitlines()
    assert header.split()[:3] == ["ID", "STATUS", "AGE"]
    row = next(r for r in rows if r.startswith(sandbox))
    assert "running" in row and TAG in row and "host" in row

    records = json.loads(cli.ok("ls", "--json").stdout)
    mine = next(r for r in records if r["id"] == sandbox)
    assert mine["status"] == "running"
    assert mine["tags"] == [TAG]
    assert mine["image"] == "host"
    assert mine["created_at"].endswith("Z")

    assert sandbox in ids_of(cli.ok("ls", "-q", "--status", "running").stdout)


@pytest.mark.slow
def test_ls_filters_by_tag(cli: Cli) -> None:
    a = cli.ok("run", "--tag", TAG, "--tag", "filter-a").stdout.strip()
    b = cli.ok("run", "--tag", TAG, "--tag", "filter-b").stdout.strip()
    try:
        assert ids_of(cli.ok("ls", "-q", "--tag", "filter-a").stdout) == [a]
        assert ids_of(cli.ok("ls", "-q", "--tag", "filter-b", "--tag", TAG).stdout) == [b]
        assert ids_of(cli.ok("ls", "-q", "--tag", "filter-a", "--tag", "filter-b").stdout) == []
    finally:
        cli.ok("rm", "-y", a, b)


@pytest.mark.slow
def test_run_options_reach_the_sandbox(cli: Cli) -> None:
    sandbox_id = cli.ok(
        "run",
        "--wait",
        "--tag",
        TAG,
        "--env",
        "GREETING=hello there",
        "--memory",
        "256Mi",
        "--cpu",
        "500m",
        "--lifetime",
        "10m",
        "--workdir",
        "/tmp",
    ).stdout.strip()
    try:
        out = cli.ok("exec", sandbox_id, "--", "sh", "-c", 'echo "$GREETING"; pwd').stdout
        assert out == "hello there\n/tmp\n"
        record = json.loads(cli.ok("get", "--json", sandbox_id).stdout)
        assert record["expires_at"] is not None
    finally:
        cli.ok("rm", "-y", sandbox_id)


@pytest.mark.slow
def test_run_node_selector_is_checked(cli: Cli) -> None:
    # The local placement ignores node_selector; the option's parsing and the service's
    # validation are what can be checked here (tests/cluster uses it on a cluster).
    sandbox_id = cli.ok(
        "run", "--no-wait", "--tag", TAG, "--node-selector", "pool=gpu", "--node-selector", "a=b"
    ).stdout.strip()
    cli.ok("rm", "-y", sandbox_id)
    for bad, fragment in (("pool", "is not LABEL=VALUE"), ("=x", "is not LABEL=VALUE")):
        result = cli("run", "--node-selector", bad)
        assert result.returncode == 2 and "--node-selector" in result.stderr, result
        assert fragment in result.stderr
    result = cli("run", "--node-selector", "a=1", "--node-selector", "a=2")
    assert result.returncode == 2 and "label 'a' given twice" in result.stderr
    result = cli("run", "--node-selector", "bad*label=x")
    assert result.returncode != 0 and "node_selector['bad*label']: " in result.stderr, result


@pytest.mark.slow
def test_run_with_a_command_and_get(cli: Cli) -> None:
    sandbox_id = cli.ok("run", "--tag", TAG, "--", "sh", "-c", "echo done; exit 3").stdout.strip()
    try:
        deadline = time.monotonic() + 30
        record = json.loads(cli.ok("get", "--json", sandbox_id).stdout)
        while record["status"] not in ("completed", "failed") and time.monotonic() < deadline:
            time.sleep(0.2)
            record = json.loads(cli.ok("get", "--json", sandbox_id).stdout)
        assert record["status"] == "failed"
        assert record["exit_code"] == 3
        text = cli.ok("get", sandbox_id).stdout
        assert "id:" in text and sandbox_id in text and "exit 3" in text
        # Ended sandboxes are listed only with --all.
        assert sandbox_id not in ids_of(cli.ok("ls", "-q").stdout)
        assert sandbox_id in ids_of(cli.ok("ls", "-q", "--all").stdout)
    finally:
        cli.ok("rm", "-y", sandbox_id)


@pytest.mark.slow
def test_stop_keeps_the_record_and_rm_removes_it(cli: Cli) -> None:
    sandbox_id = cli.ok("run", "--tag", TAG).stdout.strip()
    assert ids_of(cli.ok("stop", "--grace", "0", sandbox_id).stdout) == [sandbox_id]
    record = json.loads(cli.ok("get", "--json", sandbox_id).stdout)
    assert record["status"] == "terminated"
    cli.ok("stop", sandbox_id)  # stopping an ended sandbox is a no-op
    assert ids_of(cli.ok("rm", sandbox_id).stdout) == [sandbox_id]
    assert_one_line_error(cli("get", sandbox_id), "no sandbox")


@pytest.mark.slow
def test_rm_by_tag_asks_before_deleting_many(cli: Cli) -> None:
    tag = "bulk-delete"
    ids = [cli.ok("run", "--tag", TAG, "--tag", tag).stdout.strip() for _ in range(6)]
    try:
        refused = cli("rm", "--tag", tag)  # stdin is not a terminal: no way to ask
        assert_one_line_error(refused, "-y")
        assert sorted(ids_of(cli.ok("ls", "-q", "--tag", tag).stdout)) == sorted(ids)
        deleted = cli.ok("rm", "--tag", tag, "-y").stdout
        assert sorted(ids_of(deleted)) == sorted(ids)
        assert ids_of(cli.ok("ls", "-q", "--all", "--tag", tag).stdout) == []
    finally:
        cli("rm", "-y", "--tag", tag)


@pytest.mark.slow
def test_unknown_ids_are_one_line_errors(cli: Cli, sandbox: str) -> None:
    for argv in (["get", "sb-nope"], ["stop", "sb-nope"], ["rm", "sb-nope"], ["logs", "sb-nope"]):
        assert_one_line_error(cli(*argv), "sb-nope")
    # A bulk operation reports each failure and carries out the rest.
    result = cli("stop", "--grace", "0", sandbox, "sb-nope")
    assert result.returncode == 1
    assert ids_of(result.stdout) == [sandbox]
    assert "sb-nope" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_a_sandbox_that_cannot_start_is_an_error(cli: Cli) -> None:
    result = cli("run", "--tag", TAG, "--image", "no-such-image:1")
    assert_one_line_error(result, "no-such-image:1")
    failed = [r for r in json.loads(cli.ok("ls", "--all", "--json", "--tag", TAG).stdout)
              if r["status"] == "failed" and r["exit_code"] is None]  # fmt: skip
    assert failed, "the failed sandbox's record stays"
    cli.ok("rm", "-y", *(r["id"] for r in failed))
    # With --no-wait the id comes back at once; the failure shows in its record.
    sandbox_id = cli.ok(
        "run", "--no-wait", "--tag", TAG, "--image", "no-such-image:1"
    ).stdout.strip()
    cli.ok("rm", sandbox_id)
