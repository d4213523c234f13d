"""Test helpers: a real `docker-registry` on 127.0.0.1, images built from busybox, a pusher.

No mocks and no internet: images are made here from busybox-static's /bin/busybox (plus
symlinks for the applets the tests use) and pushed with the plain distribution API
(POST + PUT of blobs, PUT of the manifest).
"""

from __future__ import annotations

import base64
import contextlib
import gzip
import hashlib
import io
import json
import shutil
import socket
import subprocess
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from _system_tools import require_tools

REGISTRY_BIN = shutil.which("docker-registry") or "/usr/bin/docker-registry"
BUSYBOX = shutil.which("busybox") or "/bin/busybox"
APPLETS = ("sh", "echo", "cat", "id", "env", "pwd", "ls", "sleep", "touch", "mkdir", "stat",
           "true", "false", "readlink", "test", "printf", "head", "wc", "rm")  # fmt: skip
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
LAYER_GZ = "application/vnd.oci.image.layer.v1.tar+gzip"
CONFIG = "application/vnd.oci.image.config.v1+json"
# Registries of the tests run on 127.0.0.1 and must be named to the service (any port).
LOCAL = ("127.0.0.1",)


def require_image_tools() -> None:
    """Skips (or fails, in CI) a test that needs the registry and the static busybox."""
    require_tools("docker-registry", "busybox")


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Registry:
    host: str  # 127.0.0.1:PORT
    storage: Path
    log: Path
    auth: tuple[str, str] | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    def blob_path(self, digest: str) -> Path:
        hexd = digest.split(":", 1)[1]
        return self.storage / "docker/registry/v2/blobs/sha256" / hexd[:2] / hexd / "data"

    def blob_gets(self, digest: str = "") -> int:
        """GET requests for blobs (of `digest`, or any) seen in the registry's access log."""
        text = self.log.read_text(errors="replace")
        count = 0
        for line in text.splitlines():
            if '"GET /v2/' in line and "/blobs/" in line and (not digest or digest in line):
                count += 1
        return count


@contextlib.contextmanager
def run_registry(
    workdir: Path, *, htpasswd: tuple[str, str] | None = None, address: str = "127.0.0.1:0"
) -> Iterator[Registry]:
    """Starts docker-registry with filesystem storage in `workdir`, on `address` (port 0: a
    free port of 127.0.0.1)."""
    storage = workdir / "storage"
    storage.mkdir(parents=True, exist_ok=True)
    ip, port_text = address.rsplit(":", 1)
    port = int(port_text) or free_port()
    auth = ""
    if htpasswd is not None:
        import bcrypt

        user, password = htpasswd
        hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4)).decode()
        (workdir / "htpasswd").write_text(f"{user}:{hashed}\n")
        auth = f"auth:\n  htpasswd:\n    realm: aviato-test\n    path: {workdir / 'htpasswd'}\n"
    config = workdir / "config.yml"
    config.write_text(
        "version: 0.1\n"
        "log:\n  level: info\n  accesslog:\n    disabled: false\n"
        f"storage:\n  filesystem:\n    rootdirectory: {storage}\n  delete:\n    enabled: true\n"
        f"http:\n  addr: {ip}:{port}\n" + auth
    )
    log = workdir / "registry.log"
    out = open(log, "wb")  # noqa: SIM115
    proc = subprocess.Popen([REGISTRY_BIN, "serve", str(config)], stdout=out, stderr=out)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                r = httpx.get(f"http://{ip}:{port}/v2/", timeout=1)
                if r.status_code in (200, 401):
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("registry did not start: " + log.read_text()[-2000:])
            time.sleep(0.05)
        yield Registry(f"{ip}:{port}", storage, log, htpasswd)
    finally:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(5)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        out.close()


# --- building images ---


@dataclass
class Entry:
    """One tar member: a file (data), dir, symlink (link), hard link (hardlink) or whiteout."""

    path: str
    data: bytes | None = None
    link: str | None = None
    hardlink: str | None = None
    mode: int = 0o644
    kind: str = "file"  # file | dir | symlink | hardlink | chardev


def layer(entries: list[Entry], *, compress: bool = True) -> tuple[bytes, str]:
    """(blob, diff_id) of a layer made of `entries` in order."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for e in entries:
            info = tarfile.TarInfo(e.path)
            info.mode = e.mode
            info.mtime = 1700000000
            if e.kind == "dir":
                info.type = tarfile.DIRTYPE
                info.mode = e.mode if e.mode != 0o644 else 0o755
                tar.addfile(info)
            elif e.kind == "symlink":
                info.type = tarfile.SYMTYPE
                info.linkname = e.link or ""
                tar.addfile(info)
            elif e.kind == "hardlink":
                info.type = tarfile.LNKTYPE
                info.linkname = e.hardlink or ""
                tar.addfile(info)
            elif e.kind == "chardev":
                info.type = tarfile.CHRTYPE
                info.devmajor, info.devminor = 1, 3
                tar.addfile(info)
            else:
                data = e.data or b""
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    raw = buf.getvalue()
    blob = gzip.compress(raw, mtime=0) if compress else raw
    return blob, sha(raw)


def busybox_layer(extra: list[Entry] | None = None) -> tuple[bytes, str]:
    """A layer with /bin/busybox, applet symlinks, /etc/passwd and /etc/group."""
    entries = [
        Entry("bin", kind="dir"),
        Entry("bin/busybox", data=Path(BUSYBOX).read_bytes(), mode=0o755),
        *(Entry(f"bin/{a}", kind="symlink", link="busybox") for a in APPLETS),
        Entry("etc", kind="dir"),
        Entry(
            "etc/passwd",
            data=b"root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/home/app:/bin/sh\n",
        ),
        Entry("etc/group", data=b"root:x:0:\napp:x:1000:\nstaff:x:50:\n"),
        Entry("home", kind="dir"),
        Entry("home/app", kind="dir"),
        Entry("var", kind="dir"),
        Entry("var/tmp", kind="dir", mode=0o1777),
    ]
    return layer(entries + (extra or []))


def image_config(
    diff_ids: list[str],
    *,
    env: list[str] | None = None,
    working_dir: str = "",
    user: str = "",
    cmd: list[str] | None = None,
    entrypoint: list[str] | None = None,
    arch: str = "amd64",
) -> bytes:
    conf: dict[str, Any] = {"Env": env or ["PATH=/bin"]}
    if working_dir:
        conf["WorkingDir"] = working_dir
    if user:
        conf["User"] = user
    if cmd is not None:
        conf["Cmd"] = cmd
    if entrypoint is not None:
        conf["Entrypoint"] = entrypoint
    doc = {
        "architecture": arch,
        "os": "linux",
        "config": conf,
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }
    return json.dumps(doc).encode()


@dataclass
class Pushed:
    digest: str  # of the manifest pushed
    manifest: bytes
    layers: list[str] = field(default_factory=list)


class Pusher:
    """Pushes blobs and manifests to a registry with the plain distribution API."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        headers = {}
        if registry.auth is not None:
            token = base64.b64encode(":".join(registry.auth).encode()).decode()
            headers["Authorization"] = f"Basic {token}"
        self.http = httpx.Client(base_url=registry.url, headers=headers, timeout=30)

    def blob(self, repo: str, data: bytes) -> str:
        digest = sha(data)
        r = self.http.post(f"/v2/{repo}/blobs/uploads/")
        assert r.status_code == 202, r.text
        location = r.headers["location"]
        sep = "&" if "?" in location else "?"
        r = self.http.put(f"{location}{sep}digest={digest}", content=data,
                          headers={"Content-Type": "application/octet-stream"})  # fmt: skip
        assert r.status_code == 201, r.text
        return digest

    def manifest(self, repo: str, ref: str, body: bytes, media_type: str) -> str:
        r = self.http.put(f"/v2/{repo}/manifests/{ref}", content=body,
                          headers={"Content-Type": media_type})  # fmt: skip
        assert r.status_code == 201, r.text
        return sha(body)

    def image(
        self,
        repo: str,
        tag: str,
        layers: list[tuple[bytes, str]],
        *,
        docker: bool = False,
        **config: Any,
    ) -> Pushed:
        """Pushes layers + config + manifest under `tag`; returns the manifest digest."""
        conf = image_config([d for _, d in layers], **config)
        conf_digest = self.blob(repo, conf)
        descs = []
        for blob, _ in layers:
            descs.append({"mediaType": LAYER_GZ if not docker else
                          "application/vnd.docker.image.rootfs.diff.tar.gzip",
                          "digest": self.blob(repo, blob), "size": len(blob)})  # fmt: skip
        media = DOCKER_MANIFEST if docker else OCI_MANIFEST
        manifest = json.dumps({
            "schemaVersion": 2,
            "mediaType": media,
            "config": {"mediaType": "application/vnd.docker.container.image.v1+json" if docker
                       else CONFIG, "digest": conf_digest, "size": len(conf)},
            "layers": descs,
        }).encode()  # fmt: skip
        digest = self.manifest(repo, tag, manifest, media)
        return Pushed(digest, manifest, [d["digest"] for d in descs])

    def index(self, repo: str, tag: str, entries: list[tuple[Pushed, str, str]]) -> str:
        """An OCI index of (pushed manifest, os, arch) entries under `tag`."""
        doc = {
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [
                {"mediaType": OCI_MANIFEST, "digest": p.digest, "size": len(p.manifest),
                 "platform": {"os": os_name, "architecture": arch}}
                for p, os_name, arch in entries
            ],
        }  # fmt: skip
        return self.manifest(repo, tag, json.dumps(doc).encode(), OCI_INDEX)


# --- a bearer-token front for the registry ---


@contextlib.contextmanager
def bearer_front(registry: Registry, user: str, password: str) -> Iterator[str]:
    """A proxy in front of `registry` that speaks the Docker token protocol (as Docker Hub does).

    Requests without `Authorization: Bearer <token>` get 401 with `WWW-Authenticate: Bearer
    realm=".../token",service="test",scope="..."`; `/token` hands out a token for basic auth
    with `user:password`; authorized requests are forwarded to the real registry.
    """
    import http.server
    import secrets as _secrets
    import threading

    token = _secrets.token_hex(16)
    expected = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
    upstream = httpx.Client(base_url=registry.url, timeout=30)
    counts = {"token": 0}

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def _send(self, status: int, body: bytes, headers: dict[str, str]) -> None:
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            host = self.headers.get("Host", "")
            if self.path.startswith("/token"):
                if self.headers.get("Authorization") != expected:
                    self._send(401, b"{}", {"Content-Type": "application/json"})
                    return
                counts["token"] += 1
                self._send(200, json.dumps({"token": token}).encode(),
                           {"Content-Type": "application/json"})  # fmt: skip
                return
            if self.headers.get("Authorization") != f"Bearer {token}":
                challenge = (f'Bearer realm="http://{host}/token",service="test",'
                             'scope="repository:t/tok:pull"')  # fmt: skip
                self._send(401, b"{}", {"WWW-Authenticate": challenge})
                return
            accept = self.headers.get("Accept", "")
            r = upstream.get(self.path, headers={"Accept": accept} if accept else {})
            keep = {k: v for k, v in r.headers.items()
                    if k.lower() in ("content-type", "docker-content-digest")}  # fmt: skip
            self._send(r.status_code, r.content, keep)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        upstream.close()
