"""The egress gateway, driven for real in the small internet's host namespace (conftest.py).

Each test serves a sandbox of its own under a policy: a listener bound on 127.0.0.1 of the
sandbox namespace (loopback only) is handed to the gateway, which runs in the host namespace,
as the supervisor hands it to the service. Clients in the sandbox namespace talk to it as a
sandbox's programs would: a CONNECT tunnel
with TLS on top, or an absolute-form HTTP request. The servers answer which server they are and
which Host and TLS server name they saw, so each test proves where a request really went.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import ssl
import statistics
import subprocess
import sys
import time
from typing import Any

import pytest
from gateway_driver import GatewayDriver
from small_internet import SmallInternet

Response = tuple[int, dict[str, str], bytes]


class Client:
    """A program of the sandbox: connects to the gateway at `port` in the host namespace."""

    def __init__(self, internet: SmallInternet, port: int, sandbox: str) -> None:
        self.internet = internet
        self.port = port
        self.sandbox = sandbox

    def connect(self, timeout: float = 10.0) -> socket.socket:
        return self.internet.connect_from("sandbox", ("127.0.0.1", self.port), timeout)

    def exchange(self, data: bytes, timeout: float = 10.0) -> Response:
        with self.connect(timeout) as sock:
            sock.sendall(data)
            return parse(read_all(sock))

    def get(self, url: str, host: str | None = None, extra: str = "") -> Response:
        """An absolute-form request, as http_proxy makes curl or urllib send."""
        authority = url.split("/")[2]
        head = f"GET {url} HTTP/1.1\r\nHost: {host or authority}\r\n{extra}\r\n"
        return self.exchange(head.encode())

    def tunnel(self, target: str) -> tuple[Response, socket.socket]:
        """CONNECT: the response, and the socket (the tunnel when the status is 200)."""
        sock = self.connect()
        sock.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = sock.recv(1)
            if not chunk:
                break
            head += chunk
        status, headers, _ = parse(head)
        body = b"" if status == 200 else read_all(sock)
        return (status, headers, body), sock

    def https(self, target: str, server_name: str | None = None, path: str = "/") -> Any:
        """GET over TLS through a tunnel; the server's JSON answer."""
        (status, _, body), sock = self.tunnel(target)
        assert status == 200, body
        host = target.rpartition(":")[0].strip("[]")
        context = ssl.create_default_context(cafile=str(self.internet.ca_file))
        with context.wrap_socket(sock, server_hostname=server_name or host) as tls:
            tls.sendall(
                f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()
            )
            status, _, answer = parse(read_all(tls))
        assert status == 200
        return json.loads(answer)


def read_all(sock: socket.socket) -> bytes:
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except (ConnectionResetError, ssl.SSLEOFError):
            break
        if not chunk:
            break
        data += chunk
    return data


def parse(raw: bytes) -> Response:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    if not lines[0]:
        return 0, {}, b""
    status = int(lines[0].split()[1])
    headers = {
        k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])
    }
    return status, headers, body


def assert_refused(response: Response, error: str, words: str, status: int = 403) -> None:
    code, headers, body = response
    assert code == status, (code, body)
    assert headers["proxy-status"].startswith(f"aviato; error={error}")
    assert body.decode().startswith("aviato egress: ")
    assert words in body.decode(), body


@pytest.fixture
def serve(
    small_internet: SmallInternet, gateway: GatewayDriver, request: pytest.FixtureRequest
) -> Any:
    served: list[str] = []

    def start(internet: bool = False, **rules: list[str]) -> Client:
        sandbox = f"{request.node.name}-{len(served)}"
        served.append(sandbox)
        return Client(small_internet, gateway.serve(sandbox, internet, **rules), sandbox)

    yield start
    for sandbox in served:
        gateway.call("close", sandbox=sandbox)


def test_the_host_services_are_there_to_be_refused(small_internet: SmallInternet) -> None:
    """Without this, a refusal below could be a server that is simply missing."""
    for address, name in (
        ("127.0.0.1", "host-loopback"),
        (small_internet.host_address, "host-self"),
    ):
        with small_internet.host_connect((address, 80)) as sock:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            assert json.loads(parse(read_all(sock))[2])["server"] == name


def test_a_program_that_ignores_the_proxy_is_unreachable_at_once(
    small_internet: SmallInternet,
) -> None:
    started = time.monotonic()
    with pytest.raises(OSError, match="unreachable"):
        small_internet.connect_from("sandbox", ("198.51.100.10", 80))
    assert time.monotonic() - started < 0.5


def test_an_allowed_name_over_https_and_http(serve: Any) -> None:
    client = serve(dns_name=["pypi.test"])
    answer = client.https("pypi.test:443", path="/project/")
    assert (answer["server"], answer["sni"], answer["host"]) == ("pypi", "pypi.test", "pypi.test")
    status, _, body = client.get(
        "http://PyPI.test/project/?x=1",
        extra="Proxy-Authorization: Basic eA==\r\nKeep-Alive: 5\r\n",
    )
    assert status == 200
    answer = json.loads(body)
    assert (answer["server"], answer["path"], answer["host"]) == (
        "pypi",
        "/project/?x=1",
        "PyPI.test",
    )
    assert answer["proxy_headers"] == [] and answer["connection"] == "close"


def test_a_name_not_listed_is_refused_fast(serve: Any) -> None:
    client = serve(dns_name=["pypi.test"])
    started = time.monotonic()
    response, sock = client.tunnel("evil.test:443")
    sock.close()
    assert time.monotonic() - started < 1.0
    assert_refused(
        response, "destination_ip_prohibited", "evil.test is not in this sandbox's allow-list"
    )
    assert_refused(client.get("http://evil.test/"), "destination_ip_prohibited", "allow-list")
    assert_refused(client.tunnel("nosuch.test:443")[0], "destination_ip_prohibited", "allow-list")


def test_a_wildcard_admits_names_under_it_only(serve: Any) -> None:
    client = serve(dns_name=["*.pypi.test"])
    assert client.https("files.pypi.test:443")["sni"] == "files.pypi.test"
    assert_refused(client.tunnel("pypi.test:443")[0], "destination_ip_prohibited", "allow-list")


def test_a_cidr_rule_admits_connections_by_address(serve: Any) -> None:
    client = serve(cidr=["203.0.113.0/24"])
    answer = client.https("203.0.113.5:443")
    assert answer["server"] == "plain" and answer["sni"] is None
    assert json.loads(client.get("http://203.0.113.5/")[2])["server"] == "plain"
    assert_refused(
        client.tunnel("198.51.100.20:443")[0], "destination_ip_prohibited", "not inside a cidr rule"
    )
    assert_refused(client.tunnel("plain.test:443")[0], "destination_ip_prohibited", "allow-list")


def test_an_ip_literal_is_refused_under_a_name_rule(serve: Any) -> None:
    client = serve(dns_name=["pypi.test"])
    assert_refused(
        client.tunnel("198.51.100.10:443")[0],
        "destination_ip_prohibited",
        "name rule admits connections by name only",
    )
    assert_refused(client.get("http://198.51.100.10/"), "destination_ip_prohibited", "by name only")


@pytest.mark.parametrize(
    ("name", "address", "words"),
    [
        ("loopback.test", "127.0.0.1", "loopback"),
        ("metadata.test", "169.254.169.254", "private or special-purpose"),
        ("hostself.test", "192.0.2.2", "service's own host"),
        ("private.test", "10.8.0.5", "private or special-purpose"),
        ("mixed.test", "127.0.0.1", "loopback"),
        ("mapped.test", "::ffff:127.0.0.1", "loopback"),
    ],
)
def test_a_dns_answer_never_points_a_name_inward(
    serve: Any, name: str, address: str, words: str
) -> None:
    for client in (serve(dns_name=[name]), serve(internet=True)):
        response = client.tunnel(f"{name}:80")[0]
        assert_refused(response, "destination_ip_prohibited", f"{name} resolves to {address}")
        assert words in response[2].decode()
        assert_refused(client.get(f"http://{name}/"), "destination_ip_prohibited", address)


def test_a_private_address_is_reached_inside_a_cidr_rule(serve: Any) -> None:
    client = serve(dns_name=["private.test"], cidr=["10.8.0.0/24"])
    assert client.https("private.test:443")["server"] == "private"
    assert json.loads(client.get("http://10.8.0.5/")[2])["server"] == "private"
    metadata = serve(internet=True, cidr=["10.8.0.0/24"])
    assert_refused(
        metadata.tunnel("169.254.169.254:80")[0], "destination_ip_prohibited", "special-purpose"
    )


def test_internet_reaches_public_addresses_never_the_host(
    serve: Any, small_internet: SmallInternet
) -> None:
    client = serve(internet=True)
    assert client.https("evil.test:443")["server"] == "evil"
    assert client.https("203.0.113.5:443")["server"] == "plain"
    assert json.loads(client.get("http://198.51.100.10/")[2])["server"] == "pypi"
    for target in ("127.0.0.1:80", "[::1]:80", f"{small_internet.host_address}:80", "0.0.0.0:80",
                   "[::ffff:127.0.0.1]:80", "[::ffff:192.0.2.2]:80"):  # fmt: skip
        assert_refused(client.tunnel(target)[0], "destination_ip_prohibited", "may never reach")
    for target in ("10.8.0.5:80", "169.254.169.254:80", "100.64.0.1:80"):
        assert_refused(client.tunnel(target)[0], "destination_ip_prohibited", "special-purpose")
    assert_refused(client.get("http://127.0.0.1/"), "destination_ip_prohibited", "loopback")


def test_a_tls_server_name_that_differs_closes_the_tunnel(
    serve: Any, gateway: GatewayDriver, small_internet: SmallInternet
) -> None:
    client = serve(dns_name=["pypi.test"])
    with pytest.raises((ssl.SSLError, ConnectionResetError, OSError)):
        client.https("pypi.test:443", server_name="evil.test")
    usage = gateway.call("usage", sandbox=client.sandbox)
    assert usage["refused"] == 1 and usage["connections"] == 1


def test_a_host_header_that_differs_is_refused(serve: Any) -> None:
    client = serve(dns_name=["pypi.test", "evil.test"])
    (status, _, _), sock = client.tunnel("pypi.test:80")
    assert status == 200
    with sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: evil.test\r\n\r\n")
        assert read_all(sock) == b""  # closed, nothing relayed
    (status, _, _), sock = client.tunnel("pypi.test:80")
    with sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: PYPI.test:80\r\nConnection: close\r\n\r\n")
        assert json.loads(parse(read_all(sock))[2])["server"] == "pypi"
    assert_refused(
        client.get("http://pypi.test/", host="evil.test"),
        "http_request_error",
        "differs from the URI",
        400,
    )


def test_narrowing_the_policy_closes_an_open_tunnel(serve: Any, gateway: GatewayDriver) -> None:
    client = serve(dns_name=["pypi.test", "evil.test"])
    sandbox = client.sandbox
    (status, _, _), pypi = client.tunnel("pypi.test:9001")
    (status2, _, _), evil = client.tunnel("evil.test:9001")
    assert status == status2 == 200
    with pypi, evil:
        assert pypi.recv(1000) and evil.recv(1000)  # flowing
        gateway.call("update", sandbox=sandbox, policy={"rules": [{"dns_name": "evil.test"}]})
        pypi.settimeout(3)
        started = time.monotonic()
        while pypi.recv(65536):  # drains what was in flight, then end-of-file or reset
            assert time.monotonic() - started < 3
        assert evil.recv(1000)  # still admitted, still open
    assert_refused(client.tunnel("pypi.test:443")[0], "destination_ip_prohibited", "allow-list")


def test_closing_a_sandbox_ends_its_connections_at_once(serve: Any, gateway: GatewayDriver) -> None:
    client = serve(internet=True)
    (status, _, _), tunnel = client.tunnel("pypi.test:9001")
    assert status == 200
    waiting = client.connect()  # no request head yet
    with tunnel, waiting:
        assert tunnel.recv(1000)
        final = gateway.call("close", sandbox=client.sandbox)
        assert final["connections"] == 1 and final["bytes_received"] > 0
        waiting.settimeout(3)
        tunnel.settimeout(3)
        assert read_all(waiting) == b""
        started = time.monotonic()
        while tunnel.recv(65536):
            assert time.monotonic() - started < 3
        with pytest.raises(OSError):
            client.connect(timeout=1)  # the listener is closed


def test_accounting_counts_bytes_connections_and_refusals(
    serve: Any, gateway: GatewayDriver
) -> None:
    client = serve(dns_name=["pypi.test"])
    sandbox = client.sandbox
    assert gateway.call("usage", sandbox=sandbox) == {
        "bytes_sent": 0, "bytes_received": 0, "connections": 0, "refused": 0
    }  # fmt: skip
    request = (
        b"POST http://pypi.test/x HTTP/1.1\r\nHost: pypi.test\r\nContent-Length: 1000\r\n\r\n"
        + b"a" * 1000
    )
    with client.connect() as sock:
        sock.sendall(request)
        raw = read_all(sock)
    assert json.loads(parse(raw)[2])["body_length"] == 1000
    client.tunnel("evil.test:443")[1].close()
    client.get("http://198.51.100.10/")
    usage = gateway.call("usage", sandbox=sandbox)
    assert usage["connections"] == 1 and usage["refused"] == 2
    assert 1000 < usage["bytes_sent"] < 1200  # the body and the origin-form head
    assert usage["bytes_received"] == len(raw)
    final = gateway.call("close", sandbox=sandbox)
    assert final == usage


@pytest.mark.slow
def test_a_flood_to_a_slow_reader_stays_bounded(serve: Any, gateway: GatewayDriver) -> None:
    client = serve(internet=True)
    sandbox = client.sandbox
    before = gateway.rss_kib()
    (status, _, _), flood = client.tunnel("pypi.test:9001")
    (status2, _, _), sink = client.tunnel("pypi.test:9000")
    assert status == status2 == 200
    with flood, sink:
        sink.settimeout(2)
        pushed = 0
        blocked = False
        while pushed < 32 << 20:  # the sink never reads: the gateway must stop reading from us
            try:
                pushed += sink.send(b"y" * 65536)
            except TimeoutError:
                blocked = True
                break
        assert blocked, f"{pushed} bytes went into a tunnel whose server never reads"
        time.sleep(2)  # the flood runs on while nobody reads it
        usage = gateway.call("usage", sandbox=sandbox)
        grown = gateway.rss_kib() - before
        assert usage["bytes_received"] < 16 << 20, usage
        assert grown < 16 << 10, f"the gateway grew by {grown} KiB"
        got = 0
        while got < 4 << 20:  # and the flood still flows once read
            got += len(flood.recv(65536))


def test_a_huge_request_head_is_refused_without_growing(serve: Any, gateway: GatewayDriver) -> None:
    client = serve(internet=True)
    before = gateway.rss_kib()
    for _ in range(3):
        head = (
            b"GET http://pypi.test/ HTTP/1.1\r\nHost: pypi.test\r\nX-Big: "
            + b"a" * (1 << 20)
            + b"\r\n\r\n"
        )
        with client.connect() as sock:
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                sock.sendall(head)
            status, _headers, body = parse(read_all(sock))
        assert status == 431, body
        assert "larger than 16384 bytes" in body.decode()
    assert gateway.rss_kib() - before < 8 << 10


@pytest.mark.slow
def test_dns_and_connection_failures_answer_in_words(serve: Any) -> None:
    client = serve(internet=True)
    assert_refused(
        client.tunnel("nosuch.test:443")[0], "dns_error", "nosuch.test: no such name", 502
    )
    started = time.monotonic()
    assert_refused(client.tunnel("blackhole.test:443")[0], "dns_timeout", "blackhole.test", 504)
    assert time.monotonic() - started < 3
    assert_refused(
        client.tunnel("pypi.test:81")[0], "connection_refused", "refused the connection", 502
    )
    assert_refused(
        client.exchange(b"HELLO\r\n\r\n"), "http_request_error", "not a valid HTTP request", 400
    )
    assert_refused(
        client.exchange(b"GET /local HTTP/1.1\r\nHost: x\r\n\r\n"),
        "http_request_error",
        "absolute URI",
        400,
    )
    assert_refused(
        client.exchange(b"CONNECT 127.1:80 HTTP/1.0\r\n\r\n"),
        "http_request_error",
        "neither a name",
        400,
    )


def test_connections_beyond_the_limit_are_refused(serve: Any, gateway: GatewayDriver) -> None:
    client = serve(internet=True)
    idle = [client.connect() for _ in range(32)]  # the driver's limit: heads not sent yet
    try:
        time.sleep(0.2)
        assert_refused(
            client.exchange(b"GET http://pypi.test/ HTTP/1.1\r\n\r\n"),
            "connection_limit_reached",
            "connections open",
            503,
        )
    finally:
        for sock in idle:
            sock.close()


URLLIB_FETCH = """
import sys, urllib.request, urllib.error
try:
    print(urllib.request.urlopen(sys.argv[1], timeout=10).read().decode())
except urllib.error.URLError as e:
    print("refused:", e)
"""


def test_programs_that_honour_the_proxy_variables(
    serve: Any, small_internet: SmallInternet
) -> None:
    """curl and Python's urllib in the sandbox namespace, with only HTTP(S)_PROXY set, as the
    supervisor will set it for a sandbox's processes."""
    client = serve(dns_name=["pypi.test"])
    proxy = f"http://127.0.0.1:{client.port}"
    env = {
        **os.environ,
        "HTTP_PROXY": proxy, "HTTPS_PROXY": proxy, "http_proxy": proxy, "https_proxy": proxy,
        "SSL_CERT_FILE": str(small_internet.ca_file),
    }  # fmt: skip
    sandbox = small_internet.enter("sandbox")

    def run(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*sandbox, *argv], env=env, capture_output=True, text=True, timeout=30
        )

    for url, server in (("https://pypi.test/project/", "pypi"), ("http://pypi.test/x", "pypi")):
        done = run(sys.executable, "-c", URLLIB_FETCH, url)
        assert json.loads(done.stdout)["server"] == server, done
    done = run(sys.executable, "-c", URLLIB_FETCH, "https://evil.test/")
    assert "Tunnel connection failed: 403 Forbidden" in done.stdout, done
    if shutil.which("curl") is None:
        return
    done = run("curl", "-sS", "--cacert", str(small_internet.ca_file), "https://pypi.test/")
    assert json.loads(done.stdout)["sni"] == "pypi.test", done
    started = time.monotonic()
    done = run("curl", "-sS", "https://evil.test/")
    assert done.returncode != 0 and "403" in done.stderr, done
    assert time.monotonic() - started < 1.0
    done = run("curl", "-sS", "-i", "http://evil.test/")
    assert "aviato egress: evil.test is not in this sandbox's allow-list" in done.stdout, done


@pytest.mark.slow
def test_added_latency(serve: Any, small_internet: SmallInternet) -> None:
    """Median of 200 requests on a new connection each, direct (from the host namespace, by
    address) vs through the gateway (from the sandbox namespace, by name: DNS, policy, connect,
    relay), for HTTP (absolute form) and HTTPS (CONNECT + TLS). Printed; run with -s."""
    client = serve(dns_name=["pypi.test"])
    request = b"GET / HTTP/1.1\r\nHost: pypi.test\r\nConnection: close\r\n\r\n"
    context = ssl.create_default_context(cafile=str(small_internet.ca_file))

    def http_direct() -> None:
        with small_internet.host_connect(("198.51.100.10", 80)) as sock:
            sock.sendall(request)
            assert read_all(sock).startswith(b"HTTP/1.1 200")

    def http_gateway() -> None:
        assert client.get("http://pypi.test/")[0] == 200

    def https_direct() -> None:
        sock = small_internet.host_connect(("198.51.100.10", 443))
        with context.wrap_socket(sock, server_hostname="pypi.test") as tls:
            tls.sendall(request)
            assert read_all(tls).startswith(b"HTTP/1.1 200")

    def https_gateway() -> None:
        assert client.https("pypi.test:443")["server"] == "pypi"

    calls = {
        "http direct": http_direct,
        "http gateway": http_gateway,
        "https direct": https_direct,
        "https gateway": https_gateway,
    }
    timings: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(200):
        for name, call in calls.items():
            started = time.perf_counter()
            call()
            timings[name].append(time.perf_counter() - started)
    medians = {name: statistics.median(values) * 1000 for name, values in timings.items()}
    print()
    for scheme in ("http", "https"):
        direct, gateway = medians[f"{scheme} direct"], medians[f"{scheme} gateway"]
        print(
            f"{scheme}: median of 200: direct {direct:.2f} ms, "
            f"through the gateway {gateway:.2f} ms, added {gateway - direct:.2f} ms"
        )
        assert gateway - direct < 20
