"""What every test directory shares: the system tools (`_system_tools.py`), and this directory
on `sys.path` so that `_system_tools` and `_wait` import from any test module.

The header of a run names the tools that are missing (their tests skip, with the install
command). Under AVIATO_REQUIRE_ALL_TOOLS=1, as in CI, a missing tool stops the run before the
first test instead.

Services started by tests serve no HTTP side unless a test asks for one (`AVIATO_HTTP=off`):
the loopback default costs each service start about 0.12 s of CPU for aiohttp, and the suite
starts hundreds; tests/server/test_http_side.py checks the default itself.

A run started in the background by a shell without job control inherits SIGINT ignored, and so
would every process it starts (Python leaves an ignored SIGINT ignored): the tests that stop a
CLI with Ctrl-C would wait for it in vain. The run takes SIGINT back first, so that what it
starts gets the default.

Mounts left behind: every directory the run makes with `tempfile` (state directories of the
services and runtimes it starts) is recorded, and so is pytest's own temporary directory; at
the end of the run, a mount that remains at or beneath one of them fails the run and is undone
(`_mounts.py`). Only directories this run made are looked at, so another process's mounts
elsewhere on the machine cannot fail it.
"""

from __future__ import annotations

import os
import signal
import tempfile
from typing import Any

import pytest
from _mounts import unmount_beneath
from _system_tools import REQUIRE_ALL_ENV, TOOLS, describe, missing_tools, require_all

_RUN_DIRS: list[str] = []  # made by this run with tempfile (see the module's docstring)
_stdlib_mkdtemp = tempfile.mkdtemp


def _recorded_mkdtemp(*args: Any, **kw: Any) -> Any:
    path = _stdlib_mkdtemp(*args, **kw)
    _RUN_DIRS.append(os.path.abspath(os.fsdecode(path)))
    return path


tempfile.mkdtemp = _recorded_mkdtemp  # TemporaryDirectory calls it too

os.environ.setdefault("AVIATO_HTTP", "off")
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_report_header(config: pytest.Config) -> str:
    missing = missing_tools(*TOOLS)
    if not missing:
        return "system tools: all present"
    return f"system tools: missing {describe(missing)} (the tests that need them skip)"


def pytest_sessionstart(session: pytest.Session) -> None:
    missing = missing_tools(*TOOLS)
    if missing and require_all():
        raise pytest.UsageError(
            f"{REQUIRE_ALL_ENV} is set and tools are missing: {describe(missing)}"
        )


@pytest.hookimpl(trylast=True)  # after the session's fixtures are torn down
def pytest_sessionfinish(session: pytest.Session) -> None:
    factory = getattr(session.config, "_tmp_path_factory", None)
    basetemp = getattr(factory, "_basetemp", None)
    left: list[str] = []
    for directory in dict.fromkeys([*_RUN_DIRS, *([str(basetemp)] if basetemp else [])]):
        left += unmount_beneath(directory)
    if not left:
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    message = (
        f"the run left {len(left)} mount(s) in the host's mount table (now undone); a service "
        "stopped gracefully leaves none, and a test that kills one must undo its mounts "
        "(tests/_mounts.py):\n  " + "\n  ".join(sorted(left))
    )
    if reporter is not None:
        reporter.write("\n")
        reporter.write_line(message, red=True)
    session.exitstatus = pytest.ExitCode.TESTS_FAILED
