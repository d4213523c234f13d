"""`aviato run --allow/--internet`, `aviato network ID [--allow|--internet|--deny]` and the
egress lines of `aviato get` and `aviato server status`. (What the egress lets through is
proven in tests/network, in a small internet of its own.)"""

from __future__ import annotations

import json

from clitools import TAG, Cli, assert_one_line_error, ids_of


def test_egress_from_the_command_line(cli: Cli) -> None:
    run = cli.ok("run", "--tag", TAG, "--allow", "PyPI.org", "--allow", "10.8.1.2/16")
    sandbox_id = ids_of(run.stdout)[0]
    try:
        shown = cli.ok("network", sandbox_id).stdout
        assert "allowlist: pypi.org, 10.8.0.0/16" in shown, shown
        assert "0 connections, 0 refused" in shown
        proxy = cli.ok("exec", sandbox_id, "--", "sh", "-c", "echo $HTTPS_PROXY").stdout
        assert proxy.startswith("http://127.0.0.1:"), proxy

        cli.ok("network", sandbox_id, "--deny")
        record = json.loads(cli.ok("network", "--json", sandbox_id).stdout)
        assert record["egress_mode"] == "isolated" and record["egress"] == []
        cli.ok("network", sandbox_id, "--internet")
        assert "egress" in cli.ok("get", sandbox_id).stdout
        got = json.loads(cli.ok("get", "--json", sandbox_id).stdout)
        assert got["egress_mode"] == "internet" and got["network_usage"]["refused"] == 0

        assert_one_line_error(
            cli("network", sandbox_id, "--allow", "bad_name!"), "may hold only letters"
        )
        assert cli("network", sandbox_id, "--deny", "--internet").returncode == 2
    finally:
        cli("rm", "-y", sandbox_id)
    assert "proxy" in cli.ok("server", "status").stdout
