"""`aviato sh` through a real pseudo-terminal: typing, Ctrl-C, window resizes, exit status."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from _wait import wait_until
from clitools import Cli, Terminal, assert_one_line_error, aviato_argv


@pytest.fixture
def terminal(cli: Cli, sandbox: str) -> Iterator[Terminal]:
    term = Terminal([*aviato_argv(), "sh", sandbox], {**cli.env, "TERM": "xterm"}, 30, 90)
    yield term
    term.close()


def test_shell_runs_commands_and_exits_with_their_status(terminal: Terminal) -> None:
    terminal.send("echo $((6 * 7))-marker\n")
    terminal.expect("42-marker")
    terminal.send("exit 7\n")
    assert terminal.wait() == 7


@pytest.mark.slow
def test_shell_has_a_real_terminal_that_follows_resizes(terminal: Terminal) -> None:
    terminal.send("tty >/dev/null && echo is-a-tty; stty size | sed 's/ /x/'\n")
    terminal.expect("is-a-tty")
    terminal.expect("30x90")
    terminal.resize(40, 100)
    # The new size reaches the remote terminal asynchronously: the shell waits for it (bounded by
    # expect's timeout); the typed line cannot match "resized-2", only its output can.
    terminal.send(
        """while [ "$(stty size)" != '40 100' ]; do sleep 0.05; done; echo resized-$((1+1))\n"""
    )
    terminal.expect("resized-2")
    terminal.send("stty size | sed 's/ /x/'\n")
    terminal.expect("40x100")
    terminal.send("exit\n")
    assert terminal.wait() == 0


@pytest.mark.slow
def test_ctrl_c_interrupts_the_remote_command_not_the_shell(
    terminal: Terminal, cli: Cli, sandbox: str
) -> None:
    terminal.send("sleep 300\n")
    # Ctrl-C must reach `sleep`, not the shell while it is still handing the terminal to it:
    # wait until the sleep runs (it has the terminal's foreground by the time it is exec'd).
    wait_until(
        lambda: cli("exec", sandbox, "--", "pgrep", "-x", "sleep").returncode == 0,
        "the remote sleep to start",
    )
    terminal.send("\x03")  # raw mode: Ctrl-C is a byte for the remote terminal
    terminal.send("echo sleep-ended-$?\n")
    terminal.expect("sleep-ended-130")
    terminal.send("echo still-$((1 + 1))\n")
    terminal.expect("still-2")
    terminal.send("\x04")  # Ctrl-D ends the shell
    assert terminal.wait() == 0


@pytest.mark.slow
def test_sh_runs_a_given_command(cli: Cli, sandbox: str) -> None:
    term = Terminal(
        [
            *aviato_argv(),
            "sh",
            sandbox,
            "--",
            "python3",
            "-c",
            "import sys; print(sys.stdin.isatty()); exit(3)",
        ],
        cli.env,
        24,
        80,
    )
    try:
        term.expect("True")
        assert term.wait() == 3
    finally:
        term.close()


@pytest.mark.slow
def test_sh_without_a_terminal_is_refused(cli: Cli, sandbox: str) -> None:
    result = cli("sh", sandbox)
    assert result.returncode == 125
    assert_one_line_error(result, "terminal")


def test_sh_unknown_sandbox(cli: Cli) -> None:
    term = Terminal([*aviato_argv(), "sh", "sb-nope"], cli.env, 24, 80)
    try:
        assert term.wait() == 125
        assert "sb-nope" in term.seen.decode(errors="replace")
        assert "Traceback" not in term.seen.decode(errors="replace")
    finally:
        term.close()
