"""`aviato server start --keep-stopped DURATION`: forwarded to the service, refused in the
user's words when it is not a duration, and shown by `aviato server status`."""

from __future__ import annotations

import time

import pytest
from clitools import Cli, assert_one_line_error


def _status(cli: Cli) -> dict[str, str]:
    lines = cli.ok("server", "status").stdout.splitlines()
    return {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in lines)}


@pytest.mark.parametrize("value", ["-1", "5x", ""])
def test_a_bad_retention_is_refused_naming_the_option(idle_cli: Cli, value: str) -> None:
    result = idle_cli("server", "start", "--keep-stopped", value)
    assert_one_line_error(result, "--keep-stopped", repr(value), "0: keep forever")


def test_the_retention_reaches_the_service_and_its_status(idle_cli: Cli) -> None:
    idle_cli.ok("server", "start", "--keep-stopped", "2s")
    assert _status(idle_cli)["keep stopped"] == "2s (0 removed since the service started)"
    sandbox_id = idle_cli.ok("run", "--wait").stdout.strip()
    idle_cli.ok("stop", sandbox_id)
    assert sandbox_id in idle_cli.ok("ls", "--all").stdout
    deadline = time.monotonic() + 30
    while sandbox_id in idle_cli.ok("ls", "--all").stdout:
        assert time.monotonic() < deadline, "the stopped sandbox was never removed"
        time.sleep(0.25)
    assert _status(idle_cli)["keep stopped"] == "2s (1 removed since the service started)"
    assert_one_line_error(idle_cli("logs", sandbox_id), sandbox_id)
