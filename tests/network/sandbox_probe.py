"""Runs inside a sandbox (mounted there by test_service_egress.py): one network attempt, the
way a program would make it, reported as one JSON line on stdout.

    probe.py get URL            urllib with the proxy of the environment (HTTP(S)_PROXY)
    probe.py direct HOST PORT   a plain TCP connect, ignoring any proxy
    probe.py sni HOST PORT NAME a CONNECT tunnel to HOST:PORT, then TLS naming NAME
    probe.py hold HOST PORT     a CONNECT tunnel to HOST:PORT held open; says when it closes

The report: {"ok": bool, "status": int | None, "body": parsed JSON or text, "error": str,
"seconds": float}. Standard library only (the sandbox has the host's Python and nothing else).
"""

from __future__ import annotations

import json
import os
import socket
import ssl
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

CA = "/workspace/.aviato-test/ca.pem"


def _context() -> ssl.SSLContext:
    return ssl.create_default_context(cafile=CA)


def _proxy() -> tuple[str, int]:
    url = urllib.parse.urlsplit(os.environ["HTTPS_PROXY"])
    return url.hostname or "", url.port or 80


def _tunnel(host: str, port: int) -> socket.socket:
    sock = socket.create_connection(_proxy(), timeout=10)
    sock.sendall(f"CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError("the proxy closed the connection")
        head += chunk
    status = int(head.split(b" ", 2)[1])
    if status != 200:
        raise ConnectionError(f"CONNECT answered {status}")
    return sock


def get(url: str) -> dict[str, object]:
    handler = urllib.request.HTTPSHandler(context=_context())
    opener = urllib.request.build_opener(handler)
    try:
        with opener.open(url, timeout=15) as answer:
            text = answer.read().decode()
            return {"ok": True, "status": answer.status, "body": _parsed(text)}
    except urllib.error.HTTPError as e:
        return {"ok": False, "status": e.code, "error": e.read().decode(errors="replace")}


def direct(host: str, port: int) -> dict[str, object]:
    socket.create_connection((host, port), timeout=15).close()
    return {"ok": True}


def sni(host: str, port: int, name: str) -> dict[str, object]:
    sock = _tunnel(host, port)
    context = _context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with context.wrap_socket(sock, server_hostname=name) as tls:
        tls.sendall(f"GET / HTTP/1.1\r\nHost: {name}\r\nConnection: close\r\n\r\n".encode())
        data = tls.recv(65536)
    return {"ok": bool(data), "body": data.decode(errors="replace")}


def hold(host: str, port: int) -> dict[str, object]:
    sock = _tunnel(host, port)
    print(json.dumps({"open": True}), flush=True)
    sock.settimeout(120)
    data = sock.recv(1)  # the tunnel's server says nothing first: only a close ends this
    return {"ok": True, "closed": data == b""}


def _parsed(text: str) -> object:
    try:
        return json.loads(text)
    except ValueError:
        return text


def main() -> None:
    start = time.monotonic()
    command, *args = sys.argv[1:]
    try:
        if command == "get":
            report = get(args[0])
        elif command == "direct":
            report = direct(args[0], int(args[1]))
        elif command == "sni":
            report = sni(args[0], int(args[1]), args[2])
        else:
            report = hold(args[0], int(args[1]))
    except (OSError, ValueError, KeyError) as e:
        report = {"ok": False, "error": f"{type(e).__name__}: {e}"}
    report["seconds"] = round(time.monotonic() - start, 3)
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
