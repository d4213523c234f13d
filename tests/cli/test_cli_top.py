"""`aviato top` on a real terminal (tmux: the table redrawn in place, sorted, another order on a
key, quit with Ctrl-C) and on a pipe (one plain table)."""

from __future__ import annotations

import re
import shlex
import subprocess
import uuid

import pytest
from _system_tools import require_tools
from _wait import wait_until
from clitools import Cli, aviato_argv

BUSY = ["sh", "-c", "while :; do :; done"]


def tmux(*args: str) -> str:
    return subprocess.run(
        ["tmux", *args], capture_output=True, text=True, check=True, timeout=10
    ).stdout


@pytest.mark.slow
def test_top_redraws_in_place_sorted_and_quits(idle_cli: Cli) -> None:
    require_tools("tmux")
    idle_cli.ok("server", "start", "--usage-interval", "0.3", "--http", "127.0.0.1:0")
    status = idle_cli.ok("server", "status").stdout
    assert "usage sampling: every 0.3 s" in status
    assert re.search(r"http: +127\.0\.0\.1:[1-9][0-9]* \(/metrics", status), status  # bound
    idle = idle_cli.ok("run", "--wait", "--tag", "top").stdout.strip()
    busy = idle_cli.ok("run", "--wait", "--tag", "top", "--", *BUSY).stdout.strip()

    # Piped: one plain table, busiest first once two samples exist.
    def piped() -> list[str]:
        out = idle_cli.ok("top", "--tag", "top").stdout.splitlines()
        return out if len(out) == 3 and out[1].startswith(busy) and " - " not in out[1] else []

    lines = wait_until(piped, "the busy sandbox first in the piped table", timeout=20)
    assert lines[0].split()[:3] == ["ID", "STATUS", "CPU"]
    assert float(lines[1].split()[2]) > 5.0  # a busy loop (niced, beside other suites)
    assert lines[2].startswith(idle)

    session = "aviato-top-" + uuid.uuid4().hex[:8]
    # Only what the command needs: the tmux server keeps the environment of whoever started it.
    wanted = {k: v for k, v in idle_cli.env.items() if k.startswith("AVIATO_") or k == "HOME"}
    env = " ".join(f"{k}={shlex.quote(v)}" for k, v in {**wanted, "TERM": "screen"}.items())
    command = f"env -i {env} {shlex.join(aviato_argv())} top -n 0.5 --sort cpu"
    tmux("new-session", "-d", "-s", session, "-x", "150", "-y", "20", command)
    try:

        def screen() -> str:
            return tmux("capture-pane", "-p", "-t", session)

        first = wait_until(
            lambda: busy in screen() and idle in screen() and screen(), "top", timeout=20
        )
        rows = [line for line in first.splitlines() if line.strip().startswith("sbx-")]
        assert rows[0].strip().startswith(busy), first  # sorted by CPU, busiest first
        assert "sorted by cpu" in first and "q quits" in first
        # In place: a sandbox that appears shows up on the same screen, without scrolling.
        third = idle_cli.ok("run", "--wait", "--tag", "top").stdout.strip()
        later = wait_until(lambda: third in screen() and screen(), "the new sandbox on screen")
        assert later.count("ID ") == 1  # one header: redrawn, not appended
        # A key changes the order at once; Ctrl-C (or q) quits.
        tmux("send-keys", "-t", session, "m")
        wait_until(lambda: "sorted by mem" in screen(), "the order to change on 'm'", timeout=5)
        tmux("send-keys", "-t", session, "C-c")
        wait_until(
            lambda: session not in subprocess.run(
                ["tmux", "ls"], capture_output=True, text=True).stdout,
            "top to quit on Ctrl-C",
            timeout=10,
        )  # fmt: skip
    except AssertionError:
        print(subprocess.run(["tmux", "capture-pane", "-p", "-t", session], capture_output=True,
                             text=True).stdout)  # fmt: skip
        raise
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)
