"""The servers of the small internet (small_internet.py), one process per network namespace.

`python internet_servers.py internet CONFIG_DIR` runs in the "internet" namespace: DNS on UDP
and TCP port 53 (dnspython's message API) answering from the table in CONFIG_DIR/dns.json;
on every address of the namespace, HTTP on 80 and HTTPS on 443 (certificate from
CONFIG_DIR/server.pem) that answer, as JSON, which server was reached (by the address the
connection arrived at), the Host header and the TLS server name they saw; a flood on 9001
(sends without end) and a sink on 9000 (accepts and never reads).

`python internet_servers.py host CONFIG_DIR` runs in the "host" namespace: the host's own
services, which no sandbox may ever reach: HTTP on 127.0.0.1:80 ("host-loopback") and on the
host's own address ("host-self").

Each prints "ready" once everything listens, and runs until killed. Standard library and
dnspython only; threads, since it serves a handful of test clients.
"""

from __future__ import annotations

import json
import socket
import socketserver
import ssl
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset

FLOOD_CHUNK = b"x" * 65536


def server_names(config: dict[str, Any]) -> dict[str, str]:
    return dict(config["servers"])  # address -> server name


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    names: dict[str, str] = {}
    # A package index (PEP 503) under /simple/ and its files under /packages/, from
    # CONFIG_DIR/index (small_internet.py writes one wheel there), on every server.
    index: Path | None = None

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _index_file(self) -> bool:
        """Serves the request from the package index when its path is there."""
        path = self.path.split("?", 1)[0]
        if self.index is None or not path.startswith(("/simple/", "/packages/")):
            return False
        target = (self.index / path.lstrip("/")).resolve()
        if target.is_dir():
            target = target / "index.html"
        if not target.is_file() or self.index.resolve() not in target.parents:
            self.send_error(404)
            return True
        data = target.read_bytes()
        self.send_response(200)
        kind = "text/html" if target.suffix == ".html" else "application/octet-stream"
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)
        return True

    def _answer(self) -> None:
        if self.command in ("GET", "HEAD") and self._index_file():
            return
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        local = self.connection.getsockname()[0]
        answer = {
            "server": self.names.get(local, local),
            "method": self.command,
            "path": self.path,
            "host": self.headers.get("Host"),
            "sni": getattr(self.connection, "aviato_sni", None),
            "body_length": len(body),
            "proxy_headers": sorted(k for k in self.headers if k.lower().startswith("proxy-")),
            "connection": self.headers.get("Connection"),
        }
        data = json.dumps(answer).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_POST = do_HEAD = do_PUT = _answer


class HTTPServer(ThreadingHTTPServer):
    """Binds without HTTPServer's reverse lookup of its own address (socket.getfqdn), which
    waits for a nameserver the host namespace cannot reach."""

    daemon_threads = True

    def server_bind(self) -> None:
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]


class HTTPSServer(HTTPServer):
    """TLS in the connection's own thread, so a client that stalls blocks nobody else."""

    context: ssl.SSLContext

    def finish_request(self, request: Any, client_address: Any) -> None:
        try:
            request.settimeout(10)
            wrapped = self.context.wrap_socket(request, server_side=True)
        except (OSError, ssl.SSLError):
            return
        super().finish_request(wrapped, client_address)


def tls_context(config_dir: Path) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(config_dir / "server.pem")

    def remember(sock: Any, name: str | None, _: ssl.SSLContext) -> None:
        sock.aviato_sni = name

    context.sni_callback = remember
    return context


def serve_http(
    address: str, port: int, names: dict[str, str], context: ssl.SSLContext | None
) -> None:
    handler = type("BoundHandler", (Handler,), {"names": names})
    if context is None:
        server = HTTPServer((address, port), handler)
    else:
        server = HTTPSServer((address, port), handler)
        server.context = context
    threading.Thread(target=server.serve_forever, daemon=True).start()


def serve_flood(address: str, port: int) -> None:
    listener = socket.create_server((address, port))

    def flood(conn: socket.socket) -> None:
        with conn:
            try:
                while True:
                    conn.sendall(FLOOD_CHUNK)
            except OSError:
                pass

    def accept() -> None:
        while True:
            conn, _ = listener.accept()
            threading.Thread(target=flood, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()


def serve_sink(address: str, port: int) -> None:
    listener = socket.create_server((address, port))
    held: list[socket.socket] = []

    def accept() -> None:
        while True:
            conn, _ = listener.accept()
            held.append(conn)  # never read

    threading.Thread(target=accept, daemon=True).start()


def dns_answer(wire: bytes, table: dict[str, list[str]], silent: set[str]) -> bytes | None:
    try:
        query = dns.message.from_wire(wire)
    except Exception:
        return None
    response = dns.message.make_response(query)
    for question in query.question:
        name = question.name.to_text().lower().rstrip(".")
        if name in silent:
            return None
        if name not in table:
            response.set_rcode(dns.rcode.NXDOMAIN)
            continue
        if question.rdtype not in (dns.rdatatype.A, dns.rdatatype.AAAA):
            continue
        want_v6 = question.rdtype == dns.rdatatype.AAAA
        addresses = [a for a in table[name] if (":" in a) == want_v6]
        if addresses:
            response.answer.append(
                dns.rrset.from_text_list(question.name, 60, "IN", question.rdtype, addresses)
            )
    return response.to_wire()


def serve_dns(table: dict[str, list[str]], silent: set[str]) -> None:
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("0.0.0.0", 53))
    tcp = socket.create_server(("0.0.0.0", 53))

    def over_udp() -> None:
        while True:
            wire, peer = udp.recvfrom(65535)
            answer = dns_answer(wire, table, silent)
            if answer is not None:
                udp.sendto(answer, peer)

    def one_tcp(conn: socket.socket) -> None:
        with conn:
            conn.settimeout(10)
            try:
                size = int.from_bytes(conn.recv(2), "big")
                wire = b""
                while len(wire) < size:
                    part = conn.recv(size - len(wire))
                    if not part:
                        return
                    wire += part
                answer = dns_answer(wire, table, silent)
                if answer is not None:
                    conn.sendall(len(answer).to_bytes(2, "big") + answer)
            except OSError:
                pass

    def over_tcp() -> None:
        while True:
            conn, _ = tcp.accept()
            threading.Thread(target=one_tcp, args=(conn,), daemon=True).start()

    threading.Thread(target=over_udp, daemon=True).start()
    threading.Thread(target=over_tcp, daemon=True).start()


def main() -> int:
    role, config_dir = sys.argv[1], Path(sys.argv[2])
    config = json.loads((config_dir / "config.json").read_text())
    if role == "internet":
        Handler.index = config_dir / "index"
        names = server_names(config)
        context = tls_context(config_dir)
        serve_dns({k: list(v) for k, v in config["dns"].items()}, set(config["silent_names"]))
        for address in names:
            serve_http(address, 80, names, None)
            serve_http(address, 443, names, context)
            serve_flood(address, 9001)
            serve_sink(address, 9000)
    else:
        host_names = dict(config["host_services"])
        for address in host_names:
            serve_http(address, 80, host_names, None)
    print("ready", flush=True)
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    sys.exit(main())
