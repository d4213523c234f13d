"""Fixtures of the command-line tests: a real service, real sandboxes, the real `aviato` command.

Each test session gets its own state directory (so its own service) under a short path: a unix
socket path is limited to 107 bytes, and pytest's tmp_path can be longer than that. The service
is started with `aviato server start` and, at the end, every sandbox is deleted and the service
stopped with the command line itself.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import pytest
from clitools import TAG, Cli, short_tempdir


@pytest.fixture(scope="session")
def cli() -> Iterator[Cli]:
    """A running service in a private state directory, and a way to call the command line."""
    state = short_tempdir("avt-cli-")
    runner = Cli(state)
    runner.ok("server", "start")
    yield runner
    runner("rm", "--all", "-y")
    runner("server", "stop")
    shutil.rmtree(state, ignore_errors=True)


@pytest.fixture
def idle_cli() -> Iterator[Cli]:
    """An empty state directory where no service runs (and none should be started)."""
    state = short_tempdir("avt-idle-")
    runner = Cli(state)
    yield runner
    if (state / "registry.db").exists():  # a service ran here: leave no sandbox behind
        runner("rm", "--all", "-y")
    runner("server", "stop")
    shutil.rmtree(state, ignore_errors=True)


@pytest.fixture
def sandbox(cli: Cli) -> Iterator[str]:
    """A running sandbox made with `aviato run`, deleted afterwards."""
    sandbox_id = cli.ok("run", "--wait", "--tag", TAG).stdout.strip()
    yield sandbox_id
    cli("rm", "-y", sandbox_id)
