"""The HTTP side against a real service: /metrics read by Prometheus' own text parser after
real calls, and its walls (who may read what; another user of the machine on loopback, a
rebound DNS name, a wrong or revoked key, another owner's sandbox)."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pytest
from _wait import wait_until
from prometheus_client.parser import text_string_to_metric_families
from server_helpers import Client, ServerProcess, free_port

from aviato.server import auth
from aviato.server.registry import Registry
from aviato.v1 import sandbox_pb2 as pb
from aviato.v1 import sandbox_pb2_grpc as pbg


def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, str, dict[str, str]]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return answer.status, answer.read().decode(), dict(answer.headers)
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(), dict(e.headers)


def samples(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Every sample of a scrape, by sample name (Prometheus' own parser)."""
    found: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found.setdefault(sample.name, []).append((dict(sample.labels), sample.value))
    return found


def value(found: dict[str, list[tuple[dict[str, str], float]]], name: str, **labels: str) -> float:
    return sum(
        v for lab, v in found.get(name, []) if all(lab.get(k) == w for k, w in labels.items())
    )


@pytest.fixture
def world(fresh_server: ServerProcess) -> tuple[ServerProcess, str, dict[str, str]]:
    port = free_port()
    fresh_server.state_dir.mkdir(parents=True)
    registry = Registry(fresh_server.state_dir / "registry.db")
    keys = {
        owner: auth.create_key(registry, owner, "t")[1] for owner in ("alice", "local", "carol")
    }
    carol = next(k for k in auth.list_keys(registry, "carol"))
    auth.revoke_key(registry, carol.id)
    registry.close()
    fresh_server.args += ["--http", f"127.0.0.1:{port}", "--usage-interval", "0.2"]
    fresh_server.args += ["--listen", f"127.0.0.1:{free_port()}"]
    fresh_server.start()
    return fresh_server, f"http://127.0.0.1:{port}", keys


@pytest.mark.slow
def test_metrics_count_real_calls(world: tuple[ServerProcess, str, dict[str, str]]) -> None:
    server, base, _ = world
    c = server.client()
    sb = c.running(tags=["m"])
    assert c.exec(sb.id, ["/bin/echo", "hi"]).stdout == b"hi\n"
    assert c.exec("sbx-000000000000", ["/bin/true"]).error.code  # an in-band error frame
    c.write_file(sb.id, "/tmp/f", b"x" * 70_000)
    assert len(c.read_file(sb.id, "/tmp/f")[1]) == 70_000
    with pytest.raises(grpc.RpcError):
        c.get("sbx-000000000000")
    wait_until(lambda: len(server.stub().SandboxUsage(
        pb.SandboxUsageRequest(sandbox_id=sb.id), timeout=5).sandboxes[0].samples) >= 2,
        "two usage samples")  # fmt: skip

    status, text, headers = get(base + "/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    found = samples(text)
    assert value(found, "aviato_rpcs_total", method="CreateSandbox", code="OK") == 1
    assert value(found, "aviato_rpcs_total", method="GetSandbox", code="NOT_FOUND") == 1
    assert (
        value(found, "aviato_rpcs_total", method="RunCommand")
        + value(found, "aviato_rpcs_total", method="Exec")
        >= 2
    )
    assert value(found, "aviato_rpc_duration_seconds_count", method="CreateSandbox") == 1
    buckets = [v for lab, v in found["aviato_rpc_duration_seconds_bucket"]
               if lab["method"] == "CreateSandbox"]  # fmt: skip
    assert buckets == sorted(buckets) and buckets[-1] == 1  # cumulative, +Inf holds all
    assert sum(v for _, v in found["aviato_exec_errors_total"]) >= 1
    assert value(found, "aviato_sandbox_start_seconds_count") == 1
    assert value(found, "aviato_file_bytes_total", direction="in") >= 70_000
    assert value(found, "aviato_file_bytes_total", direction="out") >= 70_000
    assert value(found, "aviato_sandboxes", status="running", image="host") == 1
    assert value(found, "aviato_owner_sandboxes", owner="local") == 1
    assert value(found, "aviato_owner_memory_bytes", owner="local") > 0
    assert value(found, "aviato_owner_pids", owner="local") >= 1
    assert value(found, "aviato_node_up", node="local", state="ready") == 1
    assert value(found, "aviato_usage_samples") >= 2
    assert value(found, "process_resident_memory_bytes") > 0
    # Every series the sample Grafana dashboard asks for is served.
    grafana = (Path(__file__).parents[2] / "docs" / "grafana-dashboard.json").read_text()
    wanted = set(re.findall(r"\b((?:aviato|process)_[a-z_]+)", grafana))
    assert wanted and wanted <= set(found), wanted - set(found)
    c.stop(sb.id)


@pytest.mark.slow
def test_who_may_read_what(world: tuple[ServerProcess, str, dict[str, str]]) -> None:
    server, base, keys = world
    tcp = grpc.insecure_channel(server.args[server.args.index("--listen") + 1])
    alice = Client(pbg.SandboxServiceStub(tcp), [("authorization", f"Bearer {keys['alice']}")])
    mine = alice.running(tags=["alice"])
    local = server.client().running(tags=["operator"])

    def bearer(owner: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {keys[owner]}"}

    # The service's own user on loopback: the operator, everything.
    assert get(base + "/metrics")[0] == 200
    status, page, _ = get(base + "/", {"Accept": "text/html"})
    assert status == 200 and mine.id in page and local.id in page
    # A rebound DNS name on the same loopback port is not the local user.
    assert get(base + "/metrics", {"Host": "evil.example"})[0] == 401
    assert get(base + "/", {"Host": f"evil.example:{base.rsplit(':', 1)[1]}"})[0] == 401
    # Keys: alice sees her own only, never the fleet or the metrics; another's sandbox is 404.
    status, page, _ = get(base + "/", bearer("alice"))
    assert status == 200 and mine.id in page and local.id not in page
    assert get(base + "/metrics", bearer("alice"))[0] == 403
    assert get(base + "/fleet", bearer("alice"))[0] == 403
    assert get(base + f"/sandboxes/{local.id}", bearer("alice"))[0] == 404
    assert get(base + f"/api/sandboxes/{local.id}/usage", bearer("alice"))[0] == 404
    assert get(base + f"/sandboxes/{mine.id}", bearer("alice"))[0] == 200
    # A key of owner "local" is the operator from anywhere.
    assert get(base + "/metrics", {**bearer("local"), "Host": "elsewhere"})[0] == 200
    # Wrong, revoked, malformed keys are refused, also where the local user would pass.
    for headers in (
        bearer("carol"),
        {"Authorization": "Bearer avt_" + "x" * 43},
        {"Authorization": "Basic YWxpY2U6cGFzcw=="},
        {"Cookie": "aviato_key=avt_nope"},
    ):
        for path in ("/metrics", "/", f"/sandboxes/{mine.id}/logs"):
            status, text, _ = get(base + path, headers)
            assert status == 401, (headers, path, status)
            assert "Traceback" not in text
    # The login form sets the cookie that then stands for the key.
    form = f"key={keys['alice']}".encode()
    request = urllib.request.Request(base + "/login", data=form, method="POST",
                                     headers={"Host": "evil.example"})  # fmt: skip
    opener = urllib.request.build_opener(_NoRedirect())
    with pytest.raises(urllib.error.HTTPError) as err:
        opener.open(request, timeout=10)
    assert err.value.code == 303
    cookie = err.value.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
    status, page, _ = get(base + "/", {"Cookie": cookie.split(";")[0], "Host": "evil.example"})
    assert status == 200 and mine.id in page and local.id not in page
    alice.stop(mine.id)
    server.client().stop(local.id)


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to run a client as another user")
def test_another_user_on_loopback_is_not_the_local_user(
    world: tuple[ServerProcess, str, dict[str, str]],
) -> None:
    _, base, _ = world
    script = (
        "import os, urllib.request, urllib.error, encodings.idna, http.client\n"
        "os.setgid(65534); os.setuid(65534)\n"
        "for path in ('/metrics', '/'):\n"
        f"    try: urllib.request.urlopen('{base}' + path, timeout=10); print(200)\n"
        "    except urllib.error.HTTPError as e: print(e.code)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=30, cwd=Path("/"))  # fmt: skip
    assert out.stdout.split() == ["401", "401"], out.stderr
    assert get(base + "/metrics")[0] == 200  # the service's own user, from the same address


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: object, **kw: object) -> None:
        return None


@pytest.mark.slow
def test_a_log_follower_that_leaves_holds_nothing(
    world: tuple[ServerProcess, str, dict[str, str]],
) -> None:
    server, base, _ = world
    quiet = server.client().running(tags=["quiet"])  # writes nothing: no write would notice
    port = int(base.rsplit(":", 1)[1])

    def follow() -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        request = f"GET /sandboxes/{quiet.id}/logs HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
        sock.sendall(request.encode())
        return sock

    def status(sock: socket.socket) -> bytes:
        return sock.recv(200).split(b"\r\n", 1)[0]

    followers = [follow() for _ in range(70)]  # more than the 64 allowed at once
    heads = [status(s) for s in followers]
    assert heads.count(b"HTTP/1.1 200 OK") == 64 and b"503" in heads[-1], heads
    for sock in followers:
        sock.close()

    def a_free_slot() -> bool:
        with follow() as probe:
            return status(probe) == b"HTTP/1.1 200 OK"

    # Their handlers ended with their clients: the slots are free again.
    wait_until(a_free_slot, "a free slot", timeout=10)
    started = time.monotonic()
    server.stop()
    assert time.monotonic() - started < 5, "the service waited for followers that had left"


@pytest.mark.slow
def test_what_sandboxes_and_users_chose_is_never_markup(
    world: tuple[ServerProcess, str, dict[str, str]],
) -> None:
    server, base, _ = world
    c = server.client()
    evil = "<script>alert('x')</script>"
    sb = c.running(command=["/bin/sh", "-c", f'echo "{evil}"; sleep 60'], tags=["x"])
    c.exec(sb.id, ["/bin/echo", evil])
    for path in (f"/sandboxes/{sb.id}", "/", f"/?tag={evil}"):
        status, page, _ = get(base + path.replace("<", "%3C").replace(">", "%3E").replace(
            "'", "%27").replace("(", "%28").replace(")", "%29"))  # fmt: skip
        assert status == 200, (path, status)
        assert "<script>alert" not in page and ("&lt;script&gt;" in page or path == "/")
    # Bad input in words; bodies bounded.
    status, text, _ = get(base + "/?status=bogus")
    assert status == 400 and "status" in text and "bogus" in text
    big = urllib.request.Request(base + "/login", data=b"key=" + b"a" * 10_000, method="POST")
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(big, timeout=10)
    assert err.value.code == 413
    assert get(base + "/sandboxes/..%2F..%2Fetc%2Fpasswd")[0] == 404
    assert get(base + "/static/..%2F__init__.py")[0] == 404
    c.stop(sb.id)


def _http_address(server: ServerProcess) -> str:
    return str(server.stub().GetServerInfo(pb.GetServerInfoRequest(), timeout=10).http)


def as_nobody(url: str) -> str:
    """The HTTP status another user of the machine gets for `url`."""
    script = (
        "import os, urllib.request, urllib.error, encodings.idna, http.client\n"
        "os.setgid(65534); os.setuid(65534)\n"
        f"try: urllib.request.urlopen({url!r}, timeout=10); print(200)\n"
        "except urllib.error.HTTPError as e: print(e.code)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=30, cwd=Path("/"))  # fmt: skip
    return out.stdout.strip() or out.stderr


def test_the_loopback_default(
    fresh_server: ServerProcess, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A service reachable only from this machine serves its HTTP side on 127.0.0.1 without
    being asked, once its API answers, to its own user only; one listening on the network, or
    told `--http off`, serves none."""
    monkeypatch.delenv("AVIATO_HTTP", raising=False)
    fresh_server.start()
    wait_until(lambda: _http_address(fresh_server) != "", "the default HTTP side", timeout=20)
    address = _http_address(fresh_server)
    assert re.fullmatch(r"127\.0\.0\.1:\d+", address), address
    base = f"http://{address}"
    status, text, _ = get(base + "/metrics")
    assert status == 200 and "aviato_rpcs" in text
    if os.geteuid() == 0:
        assert as_nobody(base + "/metrics") == "401"
    fresh_server.stop()
    for args in (["--http", "off"], ["--listen", f"0.0.0.0:{free_port()}"]):
        other = ServerProcess(tmp_path / f"s{len(args[1])}", *args)
        try:
            other.start()
            time.sleep(1.0)  # the default is bound well within this (the first service)
            assert _http_address(other) == ""
        finally:
            other.stop()
