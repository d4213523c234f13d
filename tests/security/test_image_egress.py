"""The registry client must not become a proxy into the operator's network, nor a port scanner.

A "front" HTTP server on 127.0.0.1 plays a hostile registry (the operator named it with
--insecure-registry, exactly by HOST:PORT); what it answers depends on the repository asked
for. A second server on another local port counts every request: the token realms and
redirects that point there must never reach it. The real docker-registry, not named, must not
be contacted at all. Error messages must name the step and the status, never what an endpoint
answered (a canary string is planted in bodies, headers and manifest fields).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest

from .image_support import Counter, Lab, busybox_layer, counting_http, lab, token

CANARY = token()


@dataclass
class Net:
    env: Lab
    front: Counter
    outside: Counter  # must never be contacted

    def ref(self, repo: str) -> str:
        return f"{self.front.host}/{repo}:v1"


def _send(h: BaseHTTPRequestHandler, status: int, body: bytes = b"",
          headers: dict[str, str] | None = None) -> None:  # fmt: skip
    h.send_response(status)
    for k, v in (headers or {}).items():
        h.send_header(k, v)
    h.send_header("Content-Length", str(len(body)))
    h.end_headers()
    if h.command != "HEAD":
        h.wfile.write(body)


def _front(outside: str, front: list[str]) -> object:
    """The hostile registry's behaviour, by repository (the first path component after /v2/)."""

    def reply(h: BaseHTTPRequestHandler) -> None:
        me = front[0]
        repo = h.path.split("/")[2] if h.path.startswith("/v2/") and h.path.count("/") > 2 else ""
        bearer = {"WWW-Authenticate": ""}
        if h.path.startswith("/token-huge"):
            h.send_response(200)
            h.send_header("Content-Type", "application/json")
            h.send_header("Content-Length", str(256 << 20))
            h.end_headers()
            chunk = b" " * (1 << 20)
            with contextlib.suppress(OSError):
                for _ in range(256):
                    h.wfile.write(chunk)
            return
        if h.path.startswith("/token"):
            _send(h, 500, CANARY.encode(), {"X-Leak": CANARY})
            return
        if repo == "realm-port":
            bearer["WWW-Authenticate"] = f'Bearer realm="http://{outside}/token",service="s"'
        elif repo == "realm-https":
            bearer["WWW-Authenticate"] = f'Bearer realm="https://{outside}/token",service="s"'
        elif repo == "realm-host":
            port = me.rsplit(":", 1)[1]
            bearer["WWW-Authenticate"] = f'Bearer realm="http://localhost:{port}/token"'
        elif repo == "realm-same":
            bearer["WWW-Authenticate"] = f'Bearer realm="http://{me}/token",service="s"'
        elif repo == "realm-huge":
            bearer["WWW-Authenticate"] = f'Bearer realm="http://{me}/token-huge",service="s"'
        elif repo.startswith("redirect-"):
            port = outside.split(":")[1]
            target = {
                "redirect-port": f"http://{outside}/x",
                "redirect-https": f"https://{outside}/x",
                "redirect-v6": f"http://[::1]:{port}/x",
                "redirect-name": f"http://localhost:{port}/x",
            }[repo]
            _send(h, 307, b"", {"Location": target})
            return
        elif repo == "echo-401":
            bearer["WWW-Authenticate"] = f"Negotiate {CANARY}"
        elif repo == "echo-500":
            _send(h, 500, CANARY.encode(), {"X-Leak": CANARY, "Content-Type": "text/plain"})
            return
        elif repo == "echo-manifest":
            body = json.dumps({"schemaVersion": 2, "mediaType": CANARY + " " * 10,
                               "config": {}, "layers": []}).encode()  # fmt: skip
            _send(h, 200, body, {"Content-Type": "application/json"})
            return
        elif repo == "echo-type":
            body = json.dumps({"schemaVersion": 2, "mediaType": CANARY, "layers": []}).encode()
            _send(h, 200, body, {"Content-Type": "application/json"})
            return
        elif repo == "echo-index":
            index = {
                "schemaVersion": 2,
                "mediaType": "application/vnd.oci.image.index.v1+json",
                "manifests": [{"platform": {"os": CANARY + "!", "architecture": CANARY}}],
            }
            _send(h, 200, json.dumps(index).encode(), {"Content-Type": index["mediaType"]})
            return
        elif repo == "echo-digest":
            body = json.dumps({"schemaVersion": 2, "mediaType":
                               "application/vnd.oci.image.manifest.v1+json",
                               "config": {"digest": CANARY + "/..", "size": 1},
                               "layers": []}).encode()  # fmt: skip
            _send(h, 200, body, {"Content-Type": "application/json"})
            return
        _send(h, 401, b"{}", bearer)

    return reply


@pytest.fixture(scope="module")
def net() -> Iterator[Net]:
    me: list[str] = []
    with counting_http() as outside, counting_http(_front(outside.host, me)) as front:  # type: ignore[arg-type]
        me.append(front.host)
        with lab("--insecure-registry", front.host) as env:
            yield Net(env, front, outside)


def _pull(net: Net, repo: str) -> str:
    ok, detail = net.env.pull(net.ref(repo))
    assert not ok, detail
    assert CANARY not in detail, detail
    return detail


@pytest.mark.slow
@pytest.mark.parametrize("repo", ["realm-port", "realm-https", "realm-host"])
def test_a_token_realm_elsewhere_is_never_contacted(net: Net, repo: str) -> None:
    detail = _pull(net, repo)
    assert "realm" in detail, detail
    assert net.outside.hits == []


@pytest.mark.parametrize("repo", ["redirect-port", "redirect-https", "redirect-v6",
                                  "redirect-name"])  # fmt: skip
def test_a_redirect_elsewhere_is_never_followed(net: Net, repo: str) -> None:
    detail = _pull(net, repo)
    assert "redirect" in detail or "non-public" in detail, detail
    assert net.outside.hits == []


@pytest.mark.parametrize("repo", ["echo-401", "echo-500", "echo-manifest", "echo-type",
                                  "echo-index", "echo-digest", "realm-same"])  # fmt: skip
def test_errors_never_repeat_what_an_endpoint_answered(net: Net, repo: str) -> None:
    detail = _pull(net, repo)
    assert "X-Leak" not in detail and len(detail) < 600, detail


def test_a_huge_token_answer_is_not_read_into_memory(net: Net) -> None:
    """The token server (here the registry's own origin) answers 256 MiB: the client reads at
    most a few MiB of it."""
    peak_before = _peak_rss_kib(net.env.svc.pid)
    detail = _pull(net, "realm-huge")
    assert "no token" in detail, detail
    assert _peak_rss_kib(net.env.svc.pid) - peak_before < 64 << 10


def _peak_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


@pytest.mark.slow
def test_a_loopback_registry_not_named_is_refused_without_contact() -> None:
    with lab(name_registry=False) as env:
        ref = env.push("t/bb", [busybox_layer()])
        before = _v2_requests(env.registry.log)
        ok, detail = env.pull(ref)
        assert not ok and "--insecure-registry" in detail, detail
        # The same registry through a name that resolves to loopback, and as a decimal IPv4.
        port = env.registry.host.rsplit(":", 1)[1]
        for alias in (f"localhost:{port}", f"2130706433:{port}", f"127.1:{port}"):
            ok, detail = env.pull(f"{alias}/t/bb:v1")
            assert not ok and "--insecure-registry" in detail, (alias, detail)
        assert _v2_requests(env.registry.log) == before


@pytest.mark.slow
def test_a_named_registry_is_pulled_and_naming_is_exact() -> None:
    with lab() as env:  # names 127.0.0.1:PORT exactly
        ref = env.push("t/bb", [busybox_layer()])
        ok, detail = env.pull(ref)
        assert ok, detail
        port = env.registry.host.rsplit(":", 1)[1]
        ok, detail = env.pull(f"localhost:{port}/t/bb:v1")  # another name: not named
        assert not ok and "--insecure-registry" in detail, detail


@pytest.mark.slow
def test_no_port_of_an_internal_address_is_probed() -> None:
    """Error messages used to differ between an open and a closed internal port (a scanner).
    Without a name, nothing connects: a listener on that port sees no connection."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.settimeout(0.2)
    accepted: list[object] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
                accepted.append(conn)
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    port = listener.getsockname()[1]
    try:
        with lab() as env:
            details = set()
            for host in (f"127.0.0.1:{port}", f"2130706433:{port}", "127.0.0.1:1"):
                ok, detail = env.pull(f"{host}/probe/x:v1")
                assert not ok
                details.add(detail.replace(host, "HOST").replace(host.split(":")[0], "H"))
            assert accepted == []
            assert len({d.split(":", 1)[0] for d in details}) == 1, details
    finally:
        stop.set()
        thread.join()
        listener.close()


def _v2_requests(log: Path) -> int:
    text = log.read_text(errors="replace")
    return sum(1 for line in text.splitlines() if '"GET /v2/' in line or '"HEAD /v2/' in line)


@pytest.mark.slow
def test_ray_node_hosts_get_the_operators_names_and_limits(tmp_path: Path) -> None:
    """The Ray placement builds each node host from the service's configuration: a node's
    pulls obey the same insecure registries and pull limits as a local service's."""
    from aviato.cluster.nodehost import NodeHost
    from aviato.images.egress import RegistryRefused
    from aviato.images.limits import ImageTooLarge
    from aviato.server.config import ServerConfig
    from aviato.server.ray_placement import node_host_args

    with lab() as env:
        ref = env.push("t/bb", [busybox_layer()])

        async def pull_on_node(**settings: object) -> None:
            config = ServerConfig(state_dir=tmp_path / "cp", ray_node_state_dir=str(tmp_path),
                                  **settings)  # type: ignore[arg-type]  # fmt: skip
            host = NodeHost(*node_host_args(config, f"node{len(settings)}" + "0" * 16))
            runtime = host._new_runtime()
            try:
                await runtime.image_store.pull(ref)
            finally:
                await runtime.close()

        with pytest.raises(RegistryRefused):
            asyncio.run(pull_on_node())
        with pytest.raises(ImageTooLarge):
            asyncio.run(pull_on_node(insecure_registries=(env.registry.host,),
                                     max_image_bytes=64 << 10))  # fmt: skip
        asyncio.run(pull_on_node(insecure_registries=(env.registry.host,), max_sandboxes=7))


@pytest.mark.slow
def test_the_command_line_takes_the_registry_names(tmp_path: Path) -> None:
    """`aviato server --insecure-registry` reaches the service's parser (a bad name is refused
    there, naming the flag); AVIATO_INSECURE_REGISTRIES is checked the same way."""
    import os
    import subprocess
    import sys

    aviato = [str(Path(sys.executable).with_name("aviato"))]
    env = {k: v for k, v in os.environ.items() if not k.startswith("AVIATO_")}
    state = str(tmp_path / "s")
    r = subprocess.run([*aviato, "server", "--state-dir", state, "--insecure-registry", "a b"],
                       capture_output=True, text=True, env=env, timeout=60)  # fmt: skip
    assert r.returncode == 2 and "--insecure-registry" in r.stderr, r.stderr
    r = subprocess.run([*aviato, "server", "--state-dir", state],
                       capture_output=True, text=True, timeout=60,
                       env={**env, "AVIATO_INSECURE_REGISTRIES": "ok:5000,bad:port"})  # fmt: skip
    assert r.returncode == 2 and "AVIATO_INSECURE_REGISTRIES" in r.stderr, r.stderr
