"""The finish a new user notices (issue 18), on the command line, each message as it is shown:
bad values are bad flags (exit 2) that say what is accepted; no wire paths, status names or
Python reprs; ids in help look like real ones; a missing value points to the command's help;
`aviato get` shows limits, network and mounts."""

from __future__ import annotations

import re

import click
from clitools import TAG, Cli, assert_one_line_error

from aviato.cli.main import cli as aviato_group

INTERNALS = re.compile(r"\[[A-Z_]{5,}\]|spec\.|init\.|Error\(|Traceback")


def test_resource_values_are_bad_flags_that_say_what_is_accepted(idle_cli: Cli) -> None:
    for flag, value, words in (
        ("--memory", "lots", "a size such as 512Mi or 2G"),
        ("--cpu", "lots", "a number of CPUs such as 0.5, 500m or 2"),
        ("-w", "relative/dir", "not an absolute path"),
    ):
        result = idle_cli("run", flag, value)
        assert result.returncode == 2, result
        assert_one_line_error(result, words, "see 'aviato run --help'")
        assert "Kubernetes" not in result.stderr
    assert not (idle_cli.state_dir / "registry.db").exists()  # refused before any service


def test_a_missing_value_points_to_the_commands_own_help(idle_cli: Cli) -> None:
    for argv, help_of in (
        (["run", "--lifetime"], "aviato run"),
        (["secret", "create", "X", "--from-env"], "aviato secret create"),
        (["logs", "--tail"], "aviato logs"),
    ):
        result = idle_cli(*argv)
        assert result.returncode == 2, result
        assert_one_line_error(result, "requires an argument", f"see '{help_of} --help'")


def test_help_examples_use_real_looking_ids() -> None:
    def walk(command: click.Command, path: str) -> list[tuple[str, str]]:
        with click.Context(command, info_name=path) as ctx:
            found = [(path, command.get_help(ctx))]
        if isinstance(command, click.Group):
            for name, sub in command.commands.items():
                found += walk(sub, f"{path} {name}")
        return found

    texts = walk(aviato_group, "aviato")
    assert len(texts) > 30
    for path, text in texts:
        for shown in re.findall(r"\bsbx?-[0-9a-zA-Z]+", text):
            assert re.fullmatch(r"sbx-[0-9a-f]{12}", shown), (path, shown)


def test_errors_in_the_users_words(cli: Cli, sandbox: str) -> None:
    stop = cli("stop", "nonsense")
    assert_one_line_error(stop, "no sandbox 'nonsense'", "sbx-")
    assert "get sandbox failed" not in stop.stderr
    empty = cli("exec", sandbox, "--", "")
    assert_one_line_error(empty, "the command is empty")
    missing = cli("run", "--tag", TAG, "--memory", "1Ki")
    assert_one_line_error(missing, 'resources["memory"]', "is outside")
    too_long = cli("extend", sandbox, "99999d")
    assert_one_line_error(too_long, "8639913600 more seconds would make the lifetime")
    assert "e+" not in too_long.stderr
    workdir = cli("exec", "-w", "relative", sandbox, "--", "true")
    assert_one_line_error(workdir, "cwd must be an absolute path, not 'relative'")
    snapshot = cli("snapshot", "rm", "nonsense")
    assert_one_line_error(snapshot, "'nonsense' is not a snapshot id (snap-")
    for result in (stop, empty, missing, too_long, workdir, snapshot):
        assert not INTERNALS.search(result.stderr), result.stderr
        assert "ValueError" not in result.stderr and "snapshot_id:" not in result.stderr


def test_get_shows_limits_network_and_mounts(cli: Cli) -> None:
    sid = cli.ok(
        "run", "--tag", TAG, "--memory", "256Mi", "--cpu", "500m", "-v", "finish-vol:/cache",
        "--allow", "pypi.org", "-p", "8080",
    ).stdout.strip()  # fmt: skip
    try:
        shown = cli.ok("get", sid).stdout
        assert "limits:  cpu 500m, memory 256Mi, pids 1024, disk 1Gi" in shown, shown
        assert "egress:  allowlist: pypi.org" in shown
        assert re.search(r"ports: +8080 -> 127\.0\.0\.1:\d+", shown)
        assert "mounts:  /cache: volume finish-vol" in shown
        assert "secrets: -" in shown
    finally:
        cli("rm", "-y", sid)
        cli("volume", "rm", "finish-vol")
