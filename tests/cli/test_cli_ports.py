"""`aviato run -p PORT`, `aviato port ID [PORT]` (and its `--forward`) and the ports of
`aviato get`."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request

from clitools import TAG, Cli, assert_one_line_error, aviato_argv, ids_of


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


def test_port_forward_relays_through_the_local_service_until_ctrl_c(cli: Cli) -> None:
    server = ["python3", "-m", "http.server", "8080", "--bind", "127.0.0.1", "--directory", "/etc"]
    sandbox_id = ids_of(cli.ok("run", "--tag", TAG, "-p", "8080", "--", *server).stdout)[0]
    try:
        listed = cli.ok("port", sandbox_id, "8080").stdout.strip()  # printed, as before
        wanted = _free_port()
        forward = subprocess.Popen(
            [*aviato_argv(), "port", "--forward", str(wanted), sandbox_id, "8080"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=cli.env,
        )
        assert forward.stdout is not None and forward.stderr is not None
        try:
            line = forward.stdout.readline().strip()
            address = f"127.0.0.1:{wanted}"
            assert line == f"Forwarding {address} -> {sandbox_id}:8080 (Ctrl-C to stop)", (
                line + forward.stderr.read()
            )
            assert address != listed
            assert b"hostname" in _fetch(address) or b"passwd" in _fetch(address)
            forward.send_signal(signal.SIGINT)
            assert forward.wait(30) == 0, forward.stderr.read()
        finally:
            if forward.poll() is None:
                forward.kill()
                forward.wait()
        assert cli("port", "--forward", sandbox_id).returncode == 2  # needs the PORT
        assert_one_line_error(
            cli("port", "--forward", "0", sandbox_id, "8081"), "does not expose port 8081"
        )
    finally:
        cli("rm", "-y", sandbox_id)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
