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
"""

from __future__ import annotations

import os
import signal

import pytest
from _system_tools import REQUIRE_ALL_ENV, TOOLS, describe, missing_tools, require_all

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
