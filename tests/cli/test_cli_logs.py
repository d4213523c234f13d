"""`aviato logs`: the main process's output, whole, tailed, and followed to the end."""

from __future__ import annotations

import subprocess
import time

import pytest
from clitools import TAG, Cli, aviato_argv


def _wait_ended(cli: Cli, sandbox_id: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if sandbox_id not in cli.ok("ls", "-q").stdout:
            return
        time.sleep(0.2)
    raise AssertionError(f"{sandbox_id} did not end")


@pytest.mark.slow
def test_logs_of_an_ended_sandbox(cli: Cli) -> None:
    script = "for i in 1 2 3; do echo line-$i; done; echo oops >&2"
    sandbox_id = cli.ok("run", "--tag", TAG, "--", "sh", "-c", script).stdout.strip()
    try:
        _wait_ended(cli, sandbox_id)
        result = cli.ok("logs", sandbox_id)
        assert result.stdout == "line-1\nline-2\nline-3\n"
        assert result.stderr == "oops\n"
        tail = cli.ok("logs", "--tail", "1", sandbox_id)
        assert tail.stdout + tail.stderr in ("oops\n", "line-3\n")
    finally:
        cli.ok("rm", "-y", sandbox_id)


@pytest.mark.slow
def test_follow_streams_until_the_sandbox_ends(cli: Cli) -> None:
    script = "echo first; sleep 2; echo second"
    sandbox_id = cli.ok("run", "--tag", TAG, "--", "sh", "-c", script).stdout.strip()
    try:
        started = time.monotonic()
        follower = subprocess.Popen(
            [*aviato_argv(), "logs", "-f", sandbox_id],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=cli.env,
            text=True,
        )
        assert follower.stdout is not None
        assert follower.stdout.readline() == "first\n"
        out, err = follower.communicate(timeout=30)
        assert follower.returncode == 0, err
        assert out == "second\n"
        assert time.monotonic() - started >= 1.5  # it waited for the second line
    finally:
        cli.ok("rm", "-y", sandbox_id)
