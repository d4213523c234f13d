"""A minimal client of the Docker Engine HTTP API over its unix socket (stdlib only).

Plain calls go through `http.client` on a unix-socket connection (one connection per call:
connecting to a unix socket costs microseconds, and nothing is shared between threads). Exec
output, and exec stdin, use the API's hijacked stream (`Upgrade: tcp`), read here from the raw
socket and demultiplexed (8-byte frame headers: stream, 0, 0, 0, big-endian length).
"""

from __future__ import annotations

import http.client
import io
import json
import socket
import struct
import tarfile
import time
import urllib.parse
from typing import Any

API = "/v1.41"


class DockerError(Exception):
    pass


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("docker", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self._path)
        self.sock = sock


class DockerAPI:
    def __init__(self, socket_path: str, timeout: float = 120.0) -> None:
        self.socket_path = socket_path
        self.timeout = timeout

    # -- plumbing ------------------------------------------------------------------------------

    def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        query: dict[str, str] | None = None,
        content_type: str = "application/json",
        ok: tuple[int, ...] = (200, 201, 204),
    ) -> bytes:
        url = API + path + ("?" + urllib.parse.urlencode(query) if query else "")
        data: bytes | None
        if body is None:
            data = None
        elif isinstance(body, bytes | bytearray):
            data = bytes(body)
        else:
            data = json.dumps(body).encode()
        conn = _UnixConnection(self.socket_path, self.timeout)
        try:
            headers = {"Content-Type": content_type} if data is not None else {}
            conn.request(method, url, body=data, headers=headers)
            resp = conn.getresponse()
            payload = resp.read()
            if resp.status not in ok:
                raise DockerError(f"{method} {path}: {resp.status} {payload[:300]!r}")
            return payload
        finally:
            conn.close()

    def json(self, method: str, path: str, body: Any = None, **kw: Any) -> Any:
        payload = self.call(method, path, body, **kw)
        return json.loads(payload) if payload else None

    def _hijack(self, path: str, body: dict[str, Any], stdin: bytes | None) -> bytes:
        """POSTs `body` to `path`, upgrades to the raw stream, sends stdin, returns stdout."""
        data = json.dumps(body).encode()
        head = (
            f"POST {API}{path} HTTP/1.1\r\nHost: docker\r\nContent-Type: application/json\r\n"
            f"Connection: Upgrade\r\nUpgrade: tcp\r\nContent-Length: {len(data)}\r\n\r\n"
        ).encode()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.socket_path)
            sock.sendall(head + data)
            buf = b""
            while b"\r\n\r\n" not in buf:
                chunk = sock.recv(65536)
                if not chunk:
                    raise DockerError(f"POST {path}: connection closed before the response")
                buf += chunk
            header, _, rest = buf.partition(b"\r\n\r\n")
            status = int(header.split(b" ", 2)[1])
            if status not in (101, 200):
                raise DockerError(f"POST {path}: {status} {buf[:300]!r}")
            if stdin:
                sock.sendall(stdin)
            sock.shutdown(socket.SHUT_WR)
            chunks = [rest]
            while chunk := sock.recv(1 << 20):
                chunks.append(chunk)
        finally:
            sock.close()
        return _demux(b"".join(chunks))

    # -- operations ----------------------------------------------------------------------------

    def ping(self) -> bool:
        try:
            return self.call("GET", "/_ping") == b"OK"
        except (OSError, DockerError):
            return False

    def version(self) -> dict[str, Any]:
        got: dict[str, Any] = self.json("GET", "/version")
        return got

    def image_exists(self, ref: str) -> bool:
        try:
            self.call("GET", f"/images/{ref}/json")
            return True
        except DockerError:
            return False

    def import_image(self, tar: bytes, repo: str, tag: str) -> None:
        """`docker import`: a root filesystem tarball becomes image `repo:tag`."""
        self.call(
            "POST",
            "/images/create",
            tar,
            query={"fromSrc": "-", "repo": repo, "tag": tag},
            content_type="application/x-tar",
        )

    def run(self, image: str, cmd: list[str], env: list[str], labels: dict[str, str]) -> str:
        """`docker run -d --network none IMAGE CMD`: create, then start; returns the id."""
        created = self.json(
            "POST",
            "/containers/create",
            {
                "Image": image,
                "Cmd": cmd,
                "Env": env,
                "WorkingDir": "/tmp",
                "Labels": labels,
                "NetworkDisabled": True,
                "HostConfig": {"NetworkMode": "none"},
            },
        )
        cid: str = created["Id"]
        self.call("POST", f"/containers/{cid}/start")
        return cid

    def exec(self, cid: str, argv: list[str], stdin: bytes | None = None) -> tuple[int, bytes]:
        """The API's exec: create, start (attached), then the exit code from its inspect."""
        made = self.json(
            "POST",
            f"/containers/{cid}/exec",
            {
                "Cmd": argv,
                "AttachStdin": stdin is not None,
                "AttachStdout": True,
                "AttachStderr": True,
                "Tty": False,
            },
        )
        eid = made["Id"]
        out = self._hijack(f"/exec/{eid}/start", {"Detach": False, "Tty": False}, stdin)
        for _ in range(200):  # the exit code may lag the end of the stream by a moment
            info = self.json("GET", f"/exec/{eid}/json")
            if not info.get("Running") and info.get("ExitCode") is not None:
                return int(info["ExitCode"]), out
            time.sleep(0.002)
        raise DockerError(f"exec {eid} did not report an exit code")

    def put_file(self, cid: str, path: str, data: bytes) -> None:
        """Writes `data` at `path` through the archive API (a one-file tar)."""
        directory, _, name = path.rpartition("/")
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
        self.call(
            "PUT",
            f"/containers/{cid}/archive",
            buf.getvalue(),
            query={"path": directory or "/"},
            content_type="application/x-tar",
        )

    def get_file(self, cid: str, path: str) -> bytes:
        payload = self.call("GET", f"/containers/{cid}/archive", query={"path": path})
        with tarfile.open(fileobj=io.BytesIO(payload), mode="r") as tar:
            member = tar.next()
            if member is None:
                raise DockerError(f"empty archive for {path}")
            f = tar.extractfile(member)
            if f is None:
                raise DockerError(f"{path} is not a regular file")
            return f.read()

    def remove(self, cid: str) -> None:
        """`docker rm -f`: kill and delete."""
        self.call("DELETE", f"/containers/{cid}", query={"force": "1", "v": "1"}, ok=(204, 404))

    def containers(self, label: str) -> list[str]:
        found = self.json(
            "GET",
            "/containers/json",
            query={"all": "1", "filters": json.dumps({"label": [label]})},
        )
        return [c["Id"] for c in found]


def _demux(stream: bytes) -> bytes:
    """stdout of a multiplexed exec stream (stderr frames are dropped)."""
    out = []
    view = memoryview(stream)
    pos = 0
    while pos + 8 <= len(view):
        kind, size = view[pos], struct.unpack(">I", view[pos + 4 : pos + 8])[0]
        pos += 8
        if kind == 1:
            out.append(bytes(view[pos : pos + size]))
        pos += size
    return b"".join(out)
