"""`aviato run -p PORT`, `aviato port ID [PORT]` and the ports of `aviato get`."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

from clitools import TAG, Cli, assert_one_line_error, ids_of


def _fetch(address: str, timeout: float = 30.0) -> bytes:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"http://{address}/", timeout=10) as answer:
                body: bytes = answer.read()
                return body
        except (urllib.error.URLError, OSError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def test_port_prints_the_address_of_an_exposed_port(cli: Cli) -> None:
    server = ["python3", "-m", "http.server", "8080", "--bind", "127.0.0.1", "--directory", "/etc"]
    run = cli.ok("run", "--tag", TAG, "-p", "8080", "-p", "9000", "--", *server)
    sandbox_id = ids_of(run.stdout)[0]
    try:
        address = cli.ok("port", sandbox_id, "8080").stdout.strip()
        assert address.startswith("127.0.0.1:")
        assert b"hostname" in _fetch(address) or b"passwd" in _fetch(address)

        both = cli.ok("port", sandbox_id).stdout.splitlines()
        assert both[0] == f"8080 -> {address}" and both[1].startswith("9000 -> 127.0.0.1:")

        assert f"8080 -> {address}" in cli.ok("get", sandbox_id).stdout
        record = json.loads(cli.ok("get", "--json", sandbox_id).stdout)
        assert record["exposed_ports"]["8080"] == address

        assert_one_line_error(cli("port", sandbox_id, "8081"), "does not expose port 8081", "8080")
        assert cli("port", sandbox_id, "70000").returncode == 2  # a usage mistake
        cli.ok("stop", "--grace", "0", sandbox_id)
        assert_one_line_error(cli("port", sandbox_id, "8080"), "reachable only while it runs")
    finally:
        cli("rm", "-y", sandbox_id)
