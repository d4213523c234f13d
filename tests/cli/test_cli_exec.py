"""`aviato exec`: output, stdin, exit statuses and signals, as a script would see them."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest
from clitools import Cli, assert_one_line_error, aviato_argv


@pytest.mark.slow
def test_output_streams_stay_apart(cli: Cli, sandbox: str) -> None:
    result = cli("exec", sandbox, "--", "sh", "-c", "echo out; echo err >&2")
    assert result.returncode == 0
    assert result.stdout == "out\n"
    assert result.stderr == "err\n"


@pytest.mark.slow
def test_exit_status_is_the_commands(cli: Cli, sandbox: str) -> None:
    assert cli("exec", sandbox, "--", "sh", "-c", "exit 7").returncode == 7
    assert cli("exec", sandbox, "--", "true").returncode == 0
    # Killed by a signal: 128 + N, as a shell reports it.
    assert cli("exec", sandbox, "--", "sh", "-c", "kill -9 $$").returncode == 137


@pytest.mark.slow
def test_command_not_found_is_the_commands_failure(cli: Cli, sandbox: str) -> None:
    result = cli("exec", sandbox, "--", "no-such-program-here")
    assert result.returncode in (125, 127)
    assert "no-such-program-here" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_stdin_from_a_pipe_passes_through(cli: Cli, sandbox: str) -> None:
    result = cli("exec", sandbox, "--", "sh", "-c", "tr a-z A-Z; echo end", input="hello\n")
    assert result.returncode == 0
    assert result.stdout == "HELLO\nend\n"


@pytest.mark.slow
def test_no_stdin_means_eof_at_once(cli: Cli, sandbox: str) -> None:
    result = cli("exec", sandbox, "--", "cat")  # stdin is /dev/null here
    assert result.returncode == 0 and result.stdout == ""
    result = cli("exec", "--no-stdin", sandbox, "--", "cat", input="ignored")
    assert result.returncode == 0 and result.stdout == ""


def test_binary_output_is_exact(cli: Cli, sandbox: str) -> None:
    script = "import sys; sys.stdout.buffer.write(bytes(range(256)) * 4)"
    result = cli.raw("exec", sandbox, "--", "python3", "-c", script)
    assert result.returncode == 0
    assert result.stdout == bytes(range(256)) * 4


@pytest.mark.slow
def test_large_stdin_round_trip(cli: Cli, sandbox: str) -> None:
    payload = os.urandom(3 * 1024 * 1024)
    result = cli.raw("exec", sandbox, "--", "cat", input=payload, timeout=120)
    assert result.returncode == 0
    assert result.stdout == payload


@pytest.mark.slow
def test_options_cwd_env_and_timeout(cli: Cli, sandbox: str) -> None:
    out = cli.ok(
        "exec",
        "-w",
        "/tmp",
        "-e",
        "A=1",
        "-e",
        "B=x=y",
        sandbox,
        "--",
        "sh",
        "-c",
        'pwd; echo "$A $B"',
    )
    assert out.stdout == "/tmp\n1 x=y\n"
    started = time.monotonic()
    result = cli("exec", "--timeout", "1s", sandbox, "--", "sleep", "30")
    assert result.returncode == 124
    assert_one_line_error(result, "timed out")
    assert time.monotonic() - started < 20


def test_arguments_that_look_like_options_belong_to_the_command(cli: Cli, sandbox: str) -> None:
    argv = ["python3", "-c", "import sys; print(sys.argv[1:])", "-e", "--help", "-w"]
    assert cli.ok("exec", sandbox, *argv).stdout == "['-e', '--help', '-w']\n"


def test_unknown_sandbox_exits_125(cli: Cli) -> None:
    result = cli("exec", "sb-does-not-exist", "--", "true")
    assert result.returncode == 125
    assert_one_line_error(result, "sb-does-not-exist")


@pytest.mark.slow
def test_ended_sandbox_exits_125(cli: Cli) -> None:
    sandbox_id = cli.ok("run", "--tag", "cli-tests").stdout.strip()
    cli.ok("stop", "--grace", "0", sandbox_id)
    try:
        result = cli("exec", sandbox_id, "--", "true")
        assert result.returncode == 125
        assert_one_line_error(result, "ended")
    finally:
        cli("rm", "-y", sandbox_id)


def test_ctrl_c_reaches_the_remote_command(cli: Cli, sandbox: str) -> None:
    # The remote shell traps SIGINT and exits 42: that proves the signal crossed over.
    script = "trap 'echo got-int; exit 42' INT; echo ready; while :; do sleep 0.1; done"
    process = subprocess.Popen(
        [*aviato_argv(), "exec", sandbox, "--", "sh", "-c", script],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=cli.env,
        text=True,
    )
    try:
        assert process.stdout is not None
        assert process.stdout.readline() == "ready\n"
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=30)
    finally:
        process.kill()
    assert process.returncode == 42, err
    assert out == "got-int\n"


@pytest.mark.slow
def test_stdout_closed_early_kills_the_remote_command(cli: Cli, sandbox: str) -> None:
    marker = "/tmp/yes-pipe-test"
    remote = f"sh -c 'echo $$ > {marker}; exec yes'"
    pipeline = f"{' '.join(aviato_argv())} exec {sandbox} -- {remote} | head -n 3"
    result = subprocess.run(
        ["bash", "-c", pipeline],
        capture_output=True,
        text=True,
        env=cli.env,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert result.stdout == "y\ny\ny\n"
    assert "Traceback" not in result.stderr
    pid = cli.ok("exec", sandbox, "--", "cat", marker).stdout.strip()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if cli("exec", sandbox, "--", "kill", "-0", pid).returncode != 0:
            return
        time.sleep(0.2)
    raise AssertionError(f"`yes` (pid {pid}) still runs after its reader went away")


def test_protected_option(cli: Cli, sandbox: str) -> None:
    result = cli("exec", "--protected", sandbox, "--", "id", "-u")
    if os.geteuid() != 0:
        assert result.returncode == 125
        assert_one_line_error(result)
        assert "protected" in result.stderr
        return
    assert result.returncode == 0, result.stderr
    assert result.stdout == "65536\n"
