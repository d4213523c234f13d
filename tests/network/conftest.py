"""The small internet (small_internet.py) for the whole session, and an egress gateway driven
inside its host namespace (gateway_driver.py). Root only: the tests skip, saying why, otherwise.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from _system_tools import require_tools

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1] / "server"))  # server_helpers.ServerProcess

from gateway_driver import GatewayDriver
from small_internet import SmallInternet, unsupported_reason


@pytest.fixture(scope="session")
def small_internet() -> Iterator[SmallInternet]:
    if os.geteuid() == 0:
        require_tools("ip", "nsenter")
    reason = unsupported_reason()
    if reason:
        pytest.skip(f"small internet: {reason}")
    internet = SmallInternet()
    internet.start()
    try:
        yield internet
    finally:
        internet.stop()


@pytest.fixture(scope="session")
def gateway(small_internet: SmallInternet) -> Iterator[GatewayDriver]:
    directory = Path(tempfile.mkdtemp(prefix="aviato-egress-driver-"))
    driver = GatewayDriver(
        small_internet, directory, "--dns-timeout", "1", "--max-connections", "32"
    )
    try:
        yield driver
    finally:
        driver.stop()
        errors = driver.log.read_text()
        shutil.rmtree(directory, ignore_errors=True)
    # The gateway logs nothing above INFO while it ends connections on purpose (update, close,
    # refusals); asyncio's "Exception in callback" or a traceback here is a bug.
    assert "Traceback" not in errors and "Exception" not in errors, errors
