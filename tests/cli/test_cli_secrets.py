"""`aviato secret create | ls | rm` and `aviato run --secret` (docs/secrets.md), as a user
types them: values from stdin or a variable, never from an argument; names only on output."""

from __future__ import annotations

import json
import secrets

from clitools import TAG, Cli, Terminal, assert_one_line_error, aviato_argv


def test_a_secret_from_stdin_to_a_sandbox(cli: Cli) -> None:
    value = "cli-" + secrets.token_hex(8)
    made = cli.ok("secret", "create", "CLI_TOKEN", input=value + "\n")
    assert made.stdout.strip() == "CLI_TOKEN" and value not in made.stdout + made.stderr
    try:
        listed = cli.ok("secret", "ls")
        assert "CLI_TOKEN" in listed.stdout and value not in listed.stdout
        as_json = json.loads(cli.ok("secret", "ls", "--json").stdout)
        assert [s["name"] for s in as_json if s["name"] == "CLI_TOKEN"] == ["CLI_TOKEN"]
        assert value not in json.dumps(as_json)
        sid = cli.ok("run", "--tag", TAG, "--secret", "CLI_TOKEN").stdout.strip()
        # the trailing newline of stdin was dropped
        assert cli.ok("exec", sid, "--", "printenv", "CLI_TOKEN").stdout == value + "\n"
        got = cli.ok("get", sid)
        assert "CLI_TOKEN" in got.stdout and value not in got.stdout
        assert value not in cli.ok("get", "--json", sid).stdout
        cli("rm", "-y", sid)
        again = cli("secret", "create", "CLI_TOKEN", input="other")
        assert_one_line_error(again, "already", "--replace")
        cli.ok("secret", "create", "CLI_TOKEN", "--replace", input="other")
    finally:
        cli("secret", "rm", "CLI_TOKEN")
    gone = cli("secret", "rm", "CLI_TOKEN")
    assert_one_line_error(gone, "no secret named CLI_TOKEN")


def test_values_never_come_from_arguments_and_refusals_are_words(cli: Cli) -> None:
    extra = cli("secret", "create", "CLI_ARGV", "the-value")
    assert extra.returncode == 2 and "the-value" not in cli.ok("secret", "ls").stdout
    from_env = cli("secret", "create", "CLI_ENV", "--from-env", "MY_VAR", env={"MY_VAR": "e-v"})
    assert from_env.returncode == 0, from_env.stderr
    unset = cli("secret", "create", "CLI_ENV2", "--from-env", "NOT_SET_ANYWHERE")
    assert unset.returncode == 2 and "NOT_SET_ANYWHERE is not set" in unset.stderr
    empty = cli("secret", "create", "CLI_EMPTY", input="")
    assert_one_line_error(empty, "no value on stdin")
    bad = cli("secret", "create", "not-a-name", input="x")
    assert_one_line_error(bad, "not a secret name")
    missing = cli("run", "--tag", TAG, "--secret", "CLI_NOBODY")
    assert_one_line_error(missing, "secrets: you have no secret named CLI_NOBODY")
    assert "spec." not in missing.stderr
    cli.ok("secret", "rm", "CLI_ENV")


def test_on_a_terminal_the_value_is_asked_for_hidden(cli: Cli) -> None:
    term = Terminal([*aviato_argv(), "secret", "create", "CLI_TTY"], cli.env, 24, 80)
    try:
        term.expect("Value (hidden): ")
        term.send("typed-in-value\r")
        assert term.wait() == 0, term.seen
        assert b"typed-in-value" not in term.seen  # not echoed
        sid = cli.ok("run", "--tag", TAG, "--secret", "CLI_TTY").stdout.strip()
        assert cli.ok("exec", sid, "--", "printenv", "CLI_TTY").stdout == "typed-in-value\n"
        cli("rm", "-y", sid)
    finally:
        term.close()
        cli("secret", "rm", "CLI_TTY")
