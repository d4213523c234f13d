"""What the image attack tests share: a real registry on 127.0.0.1 serving crafted images, a real
service pulling from it, canaries on the host, and small HTTP servers that count who calls them.

Layers are tar files built in the tests (`oci_helpers.Entry`, or raw `tarfile` members for what
Entry cannot express); the service is `python -m aviato.server` (reliability/harness.py) with
its own state directory; pulls go through the ImageService (PullImage), as `aviato image pull`
does. The service runs as root, the deployment where a crafted layer would do most harm.
"""

from __future__ import annotations

import contextlib
import http.server
import io
import os
import secrets
import shutil
import stat
import sys
import tarfile
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from reliability.harness import Service

from aviato.v1 import images_pb2 as ipb
from aviato.v1 import images_pb2_grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "images"))

from oci_helpers import (
    Entry,
    Pusher,
    Registry,
    busybox_layer,
    layer,
    require_image_tools,
    run_registry,
    sha,
)

__all__ = [
    "Canary",
    "Counter",
    "Entry",
    "Lab",
    "Pusher",
    "Registry",
    "busybox_layer",
    "counting_http",
    "lab",
    "layer",
    "raw_layer",
    "sha",
    "zeros_layer",
]


def require_root_and_tools() -> None:
    if os.geteuid() != 0:
        pytest.skip("the image attacks run the service as root, where they would do most harm")
    require_image_tools()


@dataclass
class Canary:
    """A host directory of the test (outside every image root) with a file and a subdirectory
    the attacks aim at, and their state before the attack."""

    dir: Path
    file: Path = field(init=False)
    sub: Path = field(init=False)
    victim: Path = field(init=False)

    def __post_init__(self) -> None:
        self.dir.mkdir(mode=0o755)
        self.file = self.dir / "canary"
        self.file.write_bytes(b"canary\n")
        os.chmod(self.file, 0o640)
        os.utime(self.file, (1_000_000_000, 1_000_000_000))
        self.sub = self.dir / "x"
        self.sub.mkdir(mode=0o750)
        os.utime(self.sub, (1_000_000_000, 1_000_000_000))
        self.victim = self.dir / "victim"
        self.victim.write_bytes(b"victim\n")

    def state(self) -> dict[str, Any]:
        """Names, modes, times, link counts and contents of everything in the directory."""
        found: dict[str, Any] = {}
        for path in sorted([self.dir, *self.dir.rglob("*")]):
            st = path.lstat()
            data = path.read_bytes() if stat.S_ISREG(st.st_mode) else b""
            found[str(path)] = (stat.filemode(st.st_mode), st.st_mtime, st.st_nlink, st.st_uid,
                                data)  # fmt: skip
        return found


def raw_layer(members: list[tuple[tarfile.TarInfo, bytes | None]]) -> tuple[bytes, str]:
    """(gzip blob, diff id) of a layer of raw tar members (for what Entry cannot express)."""
    import gzip

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    raw = buf.getvalue()
    return gzip.compress(raw, mtime=0), sha(raw)


def zeros_layer(head: bytes, zeros: int) -> tuple[bytes, str]:
    """(gzip blob, diff id) of `head` then `zeros` zero bytes, compressed as they stream (a
    bomb: 1 GiB of zeros is about 1 MiB of gzip)."""
    import hashlib
    import zlib

    digest = hashlib.sha256(head)
    comp = zlib.compressobj(6, zlib.DEFLATED, 31)
    out = [comp.compress(head)]
    chunk = bytes(1 << 20)
    left = zeros
    while left:
        piece = chunk[: min(left, len(chunk))]
        digest.update(piece)
        out.append(comp.compress(piece))
        left -= len(piece)
    out.append(comp.flush())
    return b"".join(out), "sha256:" + digest.hexdigest()


@dataclass
class Lab:
    registry: Registry
    pusher: Pusher
    svc: Service
    base: Path

    def ref(self, repo: str, tag: str = "v1", host: str | None = None) -> str:
        return f"{host or self.registry.host}/{repo}:{tag}"

    def push(self, repo: str, layers: list[tuple[bytes, str]], **config: Any) -> str:
        self.pusher.image(repo, "v1", layers, **config)
        return self.ref(repo)

    def pull(self, image: str, timeout: float = 120) -> tuple[bool, str]:
        """Pulls through the service's ImageService: (True, digest) or (False, its error)."""
        stub = images_pb2_grpc.ImageServiceStub(self.svc.channel())  # type: ignore[no-untyped-call]
        try:
            events = list(stub.PullImage(ipb.PullImageRequest(image=image), timeout=timeout))
        except grpc.RpcError as e:
            return False, f"{e.code().name}: {e.details()}"  # type: ignore[attr-defined]
        assert events and events[-1].phase == "done", events[-1:]
        return True, events[-1].digest

    @property
    def store(self) -> Path:
        return self.svc.state_dir / "images"

    def rootfs(self, digest: str) -> Path:
        return self.store / "roots" / digest.split(":", 1)[1] / "rootfs"

    def tmp_entries(self) -> list[str]:
        return sorted(os.listdir(self.store / "tmp"))


@contextlib.contextmanager
def lab(*service_args: str, name_registry: bool = True, env: dict[str, str] | None = None,
        state: Callable[[Path], None] | None = None) -> Iterator[Lab]:  # fmt: skip
    """A registry on 127.0.0.1 and a service that names it insecure (unless `name_registry` is
    false), with `service_args`. `state(state_dir)` may prepare the state directory first."""
    require_root_and_tools()
    base = Path(tempfile.mkdtemp(prefix="avimga-", dir="/tmp"))
    try:
        with run_registry(base / "registry") as registry:
            args = list(service_args)
            if name_registry:
                args += ["--insecure-registry", registry.host]
            svc = Service(*args, env=env)
            pusher = Pusher(registry)
            try:
                if state is not None:
                    state(svc.state_dir)
                svc.start()
                yield Lab(registry, pusher, svc, base)
            finally:
                pusher.http.close()
                svc.finish()
    finally:
        shutil.rmtree(base, ignore_errors=True)


@dataclass
class Counter:
    """A tiny HTTP server on 127.0.0.1 that counts requests (and answers `reply`)."""

    host: str
    hits: list[str]


@contextlib.contextmanager
def counting_http(
    reply: Callable[[http.server.BaseHTTPRequestHandler], None] | None = None,
) -> Iterator[Counter]:
    hits: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def _any(self) -> None:
            hits.append(f"{self.command} {self.path}")
            if reply is not None:
                reply(self)
                return
            body = b'{"token": "stolen"}'
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_HEAD = do_POST = _any

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield Counter(f"127.0.0.1:{server.server_address[1]}", hits)
    finally:
        server.shutdown()
        server.server_close()


def token() -> str:
    return "avcanary" + secrets.token_hex(8)
