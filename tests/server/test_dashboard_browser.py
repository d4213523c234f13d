"""The dashboard in a real browser: Debian's chromium, driven through its chromedriver.

The pages load; a sandbox's log grows on its page while the sandbox writes (server-sent events
read by the page's script); its CPU and memory charts are drawn; the fleet page shows the
latency and the node; a request under another name than loopback is refused and the login form
with an API key lets that owner in, who sees only its own sandboxes.

Skipped when chromium or chromedriver is missing, except in CI (.ci/run installs both and sets
AVIATO_REQUIRE_ALL_TOOLS). With AVIATO_DASHBOARD_SCREENSHOTS=DIR it saves each page there as
PNG (how docs/dashboard.md's pictures are made).
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from _system_tools import require_tools
from _wait import wait_until
from server_helpers import Client, ServerProcess, free_port

from aviato.server import auth
from aviato.server.registry import Registry
from aviato.v1 import sandbox_pb2 as pb
from aviato.v1 import sandbox_pb2_grpc as pbg

pytestmark = pytest.mark.slow

TALKER = ["/bin/sh", "-c", "i=0; while :; do echo line $i; i=$((i+1)); sleep 0.2; done"]
BUSY = ["/bin/sh", "-c", "while :; do :; done"]
SHOTS = os.environ.get("AVIATO_DASHBOARD_SCREENSHOTS", "")


@pytest.fixture
def browser() -> Iterator[object]:
    require_tools("chromium", "chromedriver")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or "chromium"
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--window-size=1280,1500",
        "--disable-dev-shm-usage",
        "--host-resolver-rules=MAP dashboard.test 127.0.0.1",
    ):
        options.add_argument(flag)  # fmt: skip
    driver = webdriver.Chrome(
        options=options, service=Service(executable_path=shutil.which("chromedriver"))
    )
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def shot(driver: object, name: str) -> None:
    if SHOTS:
        Path(SHOTS).mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(Path(SHOTS) / f"dashboard-{name}.png"))  # type: ignore[attr-defined]


def test_the_dashboard_in_chromium(fresh_server: ServerProcess, browser: object) -> None:
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By

    driver: object = browser
    http, listen = free_port(), free_port()
    fresh_server.state_dir.mkdir(parents=True)
    registry = Registry(fresh_server.state_dir / "registry.db")
    _, alice_key = auth.create_key(registry, "alice", "browser")
    registry.close()
    fresh_server.args += ["--http", f"127.0.0.1:{http}", "--usage-interval", "0.3",
                          "--listen", f"127.0.0.1:{listen}"]  # fmt: skip
    fresh_server.start()
    local = fresh_server.client()
    talker = local.running(command=TALKER, tags=["browser", "talker"])
    busy = local.running(command=BUSY, tags=["browser"])
    alice = Client(pbg.SandboxServiceStub(grpc.insecure_channel(f"127.0.0.1:{listen}")),
                   [("authorization", f"Bearer {alice_key}")])  # fmt: skip
    hers = alice.running(tags=["alice"])
    local.exec(talker.id, ["/bin/echo", "hello"])
    local.exec(talker.id, ["/bin/false"])
    wait_until(lambda: len(fresh_server.stub().SandboxUsage(
        pb.SandboxUsageRequest(sandbox_id=busy.id), timeout=5).sandboxes[0].samples) >= 8,
        "samples of the busy sandbox")  # fmt: skip
    base = f"http://127.0.0.1:{http}"

    def text() -> str:
        try:
            return str(driver.find_element(By.TAG_NAME, "body").text)  # type: ignore[attr-defined]
        except StaleElementReferenceException:  # the page changed under the read: read again
            return ""

    # The list, as the service's own user on loopback (the operator): every owner's sandboxes.
    driver.get(base + "/")  # type: ignore[attr-defined]
    assert talker.id in text() and busy.id in text() and hers.id in text()
    assert "local (operator)" in text()
    shot(driver, "list")
    driver.get(base + "/?tag=talker")  # type: ignore[attr-defined]
    assert talker.id in text() and busy.id not in text()

    # A sandbox's page: its log grows while it writes; its charts are drawn.
    driver.get(base + f"/sandboxes/{busy.id}")  # type: ignore[attr-defined]
    polylines = driver.find_elements(By.CSS_SELECTOR, 'figure.chart[data-kind="cpu"] polyline')  # type: ignore[attr-defined]
    assert polylines, "no CPU chart"
    points = polylines[0].get_attribute("points").split()
    assert len(points) >= 5
    assert driver.find_elements(By.CSS_SELECTOR, 'figure.chart[data-kind="memory"] polyline')  # type: ignore[attr-defined]
    shot(driver, "sandbox-busy")
    driver.get(base + f"/sandboxes/{talker.id}")  # type: ignore[attr-defined]

    def last_line() -> int:
        try:
            log = driver.find_element(By.ID, "log").text  # type: ignore[attr-defined]
        except StaleElementReferenceException:
            return -1
        numbers = re.findall(r"line (\d+)", log)
        return int(numbers[-1]) if numbers else -1

    first = wait_until(lambda: last_line() >= 0 and last_line() + 1, "the log on the page") - 1
    wait_until(lambda: last_line() >= first + 5, "the log to grow on the page", timeout=20)
    assert "(following)" in text()
    commands = driver.find_element(
        By.XPATH, "//h2[text()='Recent commands']/following-sibling::table[1]"
    ).text  # type: ignore[attr-defined]
    assert "/bin/echo hello" in commands and "/bin/false" in commands, commands
    shot(driver, "sandbox")

    # The fleet page: counts, latency, the node.
    driver.get(base + "/fleet")  # type: ignore[attr-defined]
    page = text()
    assert "Latency" in page and "time to RUNNING" in page and "local" in page
    assert driver.find_elements(By.CSS_SELECTOR, 'figure.chart[data-kind="states"] rect')  # type: ignore[attr-defined]
    shot(driver, "fleet")

    # Under another name than loopback: refused, then in with alice's key through the form.
    other = f"http://dashboard.test:{http}"
    driver.get(other + "/")  # type: ignore[attr-defined]
    assert "API key is required" in text() and talker.id not in text()
    driver.get(other + "/login")  # type: ignore[attr-defined]
    shot(driver, "login")
    driver.find_element(By.NAME, "key").send_keys(alice_key)  # type: ignore[attr-defined]
    driver.find_element(By.CSS_SELECTOR, "form.login button").click()  # type: ignore[attr-defined]
    wait_until(lambda: hers.id in text(), "alice's list after logging in")
    assert talker.id not in text() and busy.id not in text() and "Fleet" not in text()
    driver.get(other + f"/sandboxes/{talker.id}")  # type: ignore[attr-defined]
    assert "not found" in text()
    driver.get(other + "/fleet")  # type: ignore[attr-defined]
    assert "operator" in text()
    for sandbox in (talker, busy):
        local.stop(sandbox.id)
    alice.stop(hers.id)
