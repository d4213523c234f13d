"""Help, version and usage mistakes: what a user sees before any sandbox exists.

None of these may start a service: they run against an empty state directory.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
from clitools import Cli, assert_one_line_error

COMMANDS = [
    "run",
    "ls",
    "get",
    "exec",
    "sh",
    "logs",
    "port",
    "cp",
    "stop",
    "rm",
    "server",
    "keys",
    "version",
]


def test_top_level_help_lists_every_command(idle_cli: Cli) -> None:
    out = idle_cli.ok("--help").stdout
    for command in COMMANDS:
        assert f"  {command} " in out or f"  {command}\n" in out, command
    assert "AVIATO_BASE_URL" in out


@pytest.mark.slow
@pytest.mark.parametrize(
    "argv",
    [[c] for c in COMMANDS]
    + [["server", s] for s in ("start", "stop", "status", "logs")]
    + [["keys", k] for k in ("create", "list", "revoke")],
)
def test_every_command_has_help_with_examples(idle_cli: Cli, argv: list[str]) -> None:
    result = idle_cli.ok(*argv, "--help")
    assert "Usage: aviato " + " ".join(argv) in result.stdout
    assert "Example" in result.stdout


def test_short_help_option(idle_cli: Cli) -> None:
    assert "Usage: aviato ls" in idle_cli.ok("ls", "-h").stdout


def test_python_dash_m_aviato(idle_cli: Cli) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "aviato", "--version"],
        capture_output=True,
        text=True,
        env=idle_cli.env,
        stdin=subprocess.DEVNULL,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("aviato ")


def test_version_without_a_service(idle_cli: Cli) -> None:
    out = idle_cli.ok("version").stdout
    assert out.startswith("aviato:")
    assert "python:" in out
    assert "not running" in out
    assert not (idle_cli.state_dir / "aviato.sock").exists(), "version must not start the service"


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["ls", "--bogus"], "no such option"),
        (["frobnicate"], "no such command"),
        (["run", "--env", "NOEQUALS"], "NAME=VALUE"),
        (["run", "--lifetime", "soon"], "duration"),
        (["ls", "--status", "sleeping"], "sleeping"),
        (["ls", "--json", "-q"], "exclude"),
        (["logs", "x", "--tail", "-3"], "tail"),
        (["exec", "sb-x"], "missing argument"),
        (["cp", "a", "b"], "ID:/path"),
        (["cp", "sb-1:/a", "sb-2:/b"], "both"),
        (["rm"], "give ids"),
        (["rm", "sb-1", "--tag", "x"], "not both"),
        (["server", "--tls-cert", "/etc/hostname"], "together"),
        (["server", "start", "--listen", "7443"], "HOST:PORT"),
    ],
)
def test_usage_mistakes_are_one_line_and_exit_2(
    idle_cli: Cli, argv: list[str], fragment: str
) -> None:
    result = idle_cli(*argv)
    assert result.returncode == 2, result
    assert_one_line_error(result, fragment)
    assert not (idle_cli.state_dir / "aviato.sock").exists()
