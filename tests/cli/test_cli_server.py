"""`aviato server` and `aviato keys`: the local service, remote clients with keys, TLS, and a
service that is down."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from _system_tools import require_tools
from clitools import Cli, assert_one_line_error, aviato_argv, ids_of, short_tempdir


def test_status_of_the_running_service(cli: Cli) -> None:
    out = cli.ok("server", "status").stdout
    fields = dict(line.split(":", 1) for line in out.splitlines())
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    assert fields["status"] == "running"
    assert fields["state dir"] == str(cli.state_dir)
    assert fields["socket"] == str(cli.state_dir / "aviato.sock")
    assert int(fields["pid"]) > 0
    assert "bubblewrap" in fields["runtime"] or "bwrap" in fields["runtime"]
    assert fields["cgroups"] in ("v1", "v2", "none")
    assert "running" in fields["sandboxes"]
    assert fields["version"]


@pytest.mark.slow
def test_status_start_stop_logs(idle_cli: Cli) -> None:
    result = idle_cli("server", "status")
    assert result.returncode == 3
    assert "not running" in result.stdout
    assert_one_line_error(idle_cli("server", "logs"), "no log")

    assert "started" in idle_cli.ok("server", "start").stdout
    assert "already running" in idle_cli.ok("server", "start").stdout
    assert idle_cli.ok("server", "status").returncode == 0
    assert idle_cli.ok("server", "logs", "--tail", "5").stdout.strip()

    # Sandboxes outlive a restart of the service.
    sandbox_id = idle_cli.ok("run", "--wait").stdout.strip()
    assert "stopped" in idle_cli.ok("server", "stop").stdout
    assert idle_cli("server", "status").returncode == 3
    assert "not running" in idle_cli.ok("server", "stop").stdout
    # Any command starts the service again, and the sandbox is still there and running.
    assert idle_cli.ok("exec", sandbox_id, "--", "echo", "alive").stdout == "alive\n"
    idle_cli.ok("rm", sandbox_id)


@pytest.mark.slow
def test_keys_start_the_service_and_speak_its_admin_api(idle_cli: Cli) -> None:
    created = idle_cli.ok("keys", "create", "--owner", "alice", "--name", "laptop")
    key = created.stdout.strip()
    assert key.startswith("avt_") and len(key.splitlines()) == 1
    assert "shown" in created.stderr and key not in created.stderr
    listing = idle_cli.ok("keys", "list").stdout
    assert "alice" in listing and "laptop" in listing and "active" in listing
    assert key not in listing
    key_id = next(line.split()[0] for line in listing.splitlines() if "alice" in line)
    assert idle_cli.ok("keys", "revoke", key_id).stdout.strip() == f"revoked {key_id}"
    assert "revoked" in idle_cli.ok("keys", "list", "--owner", "alice").stdout
    assert_one_line_error(idle_cli("keys", "revoke", key_id), key_id)
    # Keys live in the service's registry, reached through its Admin API: like any command,
    # `aviato keys` started the service of the state directory (it used to open the file).
    assert (idle_cli.state_dir / "aviato.sock").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def remote(idle_cli: Cli) -> Iterator[tuple[Cli, str]]:
    """A service listening on loopback TCP, and its address."""
    port = _free_port()
    idle_cli.ok("server", "start", "--listen", f"127.0.0.1:{port}")
    yield idle_cli, f"127.0.0.1:{port}"
    idle_cli("rm", "--all", "-y")


@pytest.mark.slow
def test_remote_clients_need_a_valid_key(remote: tuple[Cli, str]) -> None:
    server, address = remote
    key = server.ok("keys", "create", "--owner", "bob").stdout.strip()
    # A client elsewhere: another state directory, which must never be used.
    client_state = short_tempdir("avt-client-")
    cleanup: list[Callable[[], object]] = []
    try:
        client = Cli(client_state).with_env(AVIATO_BASE_URL=f"http://{address}")
        assert_one_line_error(client("ls"), "AVIATO_API_KEY")
        assert_one_line_error(client.with_env(AVIATO_API_KEY="avt_wrong")("ls"), "invalid")

        bob = client.with_env(AVIATO_API_KEY=key)
        sandbox_id = bob.ok("run", "--tag", "remote").stdout.strip()
        cleanup.append(lambda: bob("rm", "-y", sandbox_id))
        assert bob.ok("exec", sandbox_id, "--", "echo", "over tcp").stdout == "over tcp\n"
        assert ids_of(bob.ok("ls", "-q").stdout) == [sandbox_id]
        # Owners are apart: the local user does not see bob's sandbox, and bob not theirs.
        local_id = server.ok("run").stdout.strip()
        assert sandbox_id not in ids_of(server.ok("ls", "-q").stdout)
        assert_one_line_error(bob("get", local_id), "no sandbox")

        key_id = next(
            line.split()[0]
            for line in server.ok("keys", "list").stdout.splitlines()
            if "bob" in line
        )
        bob.ok("rm", sandbox_id)
        cleanup.clear()
        server.ok("keys", "revoke", key_id)
        assert_one_line_error(bob("ls"), "revoked")
        assert not (client_state / "aviato.sock").exists()
    finally:
        for undo in cleanup:
            undo()
        shutil.rmtree(client_state, ignore_errors=True)


@pytest.mark.slow
def test_tls(idle_cli: Cli, tmp_path: Path) -> None:
    require_tools("openssl")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    port = _free_port()
    idle_cli.ok(
        "server",
        "start",
        "--listen",
        f"127.0.0.1:{port}",
        "--tls-cert",
        str(cert),
        "--tls-key",
        str(key),
    )
    api_key = idle_cli.ok("keys", "create").stdout.strip()
    client = idle_cli.with_env(
        AVIATO_BASE_URL=f"https://localhost:{port}", AVIATO_API_KEY=api_key, AVIATO_TLS_CA=str(cert)
    )
    sandbox_id = client.ok("run").stdout.strip()
    try:
        assert client.ok("exec", sandbox_id, "--", "echo", "tls").stdout == "tls\n"
    finally:
        client("rm", "-y", sandbox_id)
    # Without the CA the certificate is not trusted: a clear failure, quickly.
    untrusted = idle_cli.with_env(
        AVIATO_BASE_URL=f"https://localhost:{port}", AVIATO_API_KEY=api_key
    )
    assert_one_line_error(untrusted("ls", timeout=60))


@pytest.mark.slow
@pytest.mark.parametrize("url", ["unix:///tmp/aviato-nothing-here.sock", "http://127.0.0.1:9"])
def test_service_down_is_a_quick_one_line_error(idle_cli: Cli, url: str) -> None:
    down = idle_cli.with_env(AVIATO_BASE_URL=url)
    for argv, status in ((["ls"], 1), (["exec", "sb-x", "--", "true"], 125), (["logs", "sb-x"], 1)):
        started = time.monotonic()
        result = down(*argv, timeout=60)
        assert result.returncode == status, result
        assert_one_line_error(result)
        assert time.monotonic() - started < 15, f"{argv} took too long to fail"
    assert not (idle_cli.state_dir / "aviato.sock").exists()


def test_version_names_the_running_service(cli: Cli) -> None:
    out = cli.ok("version").stdout
    service_line = next(line for line in out.splitlines() if line.startswith("service:"))
    assert str(cli.state_dir / "aviato.sock") in service_line


@pytest.mark.slow
def test_foreground_server_serves_until_sigterm(idle_cli: Cli) -> None:
    port = _free_port()
    server = subprocess.Popen(
        [*aviato_argv(), "server", "--listen", f"127.0.0.1:{port}"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=idle_cli.env,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while idle_cli("server", "status").returncode != 0:
            assert server.poll() is None, server.communicate()[0]
            assert time.monotonic() < deadline, "the foreground service did not answer"
            time.sleep(0.2)
        key = idle_cli.ok("keys", "create", "--owner", "fg").stdout.strip()
        client = idle_cli.with_env(AVIATO_BASE_URL=f"http://127.0.0.1:{port}", AVIATO_API_KEY=key)
        assert client.ok("ls", "--json").stdout.strip() == "[]"
        # A second service on the same state directory is refused.
        assert_one_line_error(idle_cli("server"), "already")
        server.terminate()
        assert server.wait(timeout=30) == 0
    finally:
        server.kill()
        server.wait()
    assert idle_cli("server", "status").returncode == 3


@pytest.mark.slow
def test_keys_list_json(idle_cli: Cli) -> None:
    idle_cli.ok("keys", "create", "--owner", "carol", "--name", "ci")
    records = json.loads(idle_cli.ok("keys", "list", "--json").stdout)
    assert [(r["owner"], r["name"], r["revoked"]) for r in records] == [("carol", "ci", False)]
    assert records[0]["id"].startswith("key_") and records[0]["created_at"].endswith("Z")
