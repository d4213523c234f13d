"""A client of the OCI distribution API (`/v2/`): manifests and blobs, with the usual auth.

Auth follows the registry's `WWW-Authenticate` answer to a first anonymous request:

- `Basic`: the credentials are sent with every request;
- `Bearer realm=… service=… scope=…`: a token is fetched from the realm (with the credentials
  as basic auth when there are any, anonymously otherwise) and sent as `Authorization: Bearer`;
  it is fetched again when it expires (a 401 later on).

A credential that is itself a bearer token (`RegistryCredentials.token`) is sent as is.
Registries on a loopback address are spoken to over plain HTTP, every other one over HTTPS with
certificate verification.

Every byte is verified: manifests are hashed before they are parsed, and blobs are downloaded
into a temporary file, hashed while they stream, and renamed into place only when the digest and
the size match (`download_blob`). A mismatch raises DigestMismatch and leaves nothing behind.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import platform
import re
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from aviato.images.errors import (
    DigestMismatch,
    ImageNotPresent,
    PullFailed,
    RegistryDenied,
)
from aviato.images.reference import ImageRef
from aviato.runtime.base import RegistryCredentials

__all__ = [
    "INDEX_TYPES",
    "MANIFEST_TYPES",
    "Descriptor",
    "RegistryClient",
    "host_platform",
]

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
INDEX_TYPES = (OCI_INDEX, DOCKER_LIST)
MANIFEST_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)
MAX_MANIFEST_BYTES = 4 << 20
CHUNK = 1 << 20
TIMEOUT = httpx.Timeout(30.0, connect=10.0)

_CHALLENGE = re.compile(r'(\w+)="([^"]*)"')
_ARCH = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64",
         "armv7l": "arm", "armv6l": "arm", "i686": "386", "i386": "386", "ppc64le": "ppc64le",
         "s390x": "s390x", "riscv64": "riscv64"}  # fmt: skip


def host_platform() -> tuple[str, str, str]:
    """(os, architecture, variant) of this machine in OCI's words: ("linux", "amd64", "")."""
    machine = platform.machine().lower()
    arch = _ARCH.get(machine, machine)
    variant = {"aarch64": "v8", "arm64": "v8", "armv7l": "v7", "armv6l": "v6"}.get(machine, "")
    return "linux", arch, variant


@dataclass(frozen=True)
class Descriptor:
    """A content descriptor of a manifest: media type, digest and size of one blob."""

    media_type: str
    digest: str
    size: int

    @classmethod
    def parse(cls, data: Any, what: str) -> Descriptor:
        if not isinstance(data, dict):
            raise PullFailed(f"{what} is not a descriptor object")
        digest, size = data.get("digest"), data.get("size")
        if not isinstance(digest, str) or not re.fullmatch(r"sha256:[a-f0-9]{64}", digest):
            raise PullFailed(f"{what} has digest {digest!r}: only sha256 digests are supported")
        if not isinstance(size, int) or size < 0:
            raise PullFailed(f"{what} has an invalid size {size!r}")
        return cls(str(data.get("mediaType", "")), digest, size)


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class RegistryClient:
    """Talks to one repository of one registry. Use one per pull; not shared between tasks."""

    def __init__(
        self,
        ref: ImageRef,
        credentials: RegistryCredentials | None,
        http: httpx.AsyncClient,
        *,
        insecure: bool = False,
    ) -> None:
        scheme = "http" if ref.loopback or insecure else "https"
        self._ref = ref
        self._base = f"{scheme}://{ref.api_host}/v2/{ref.repository}"
        self._credentials = credentials
        self._http = http
        self._auth: str | None = None
        # Whether the given credentials were sent (the registry asked for a login).
        self.used_credentials = False
        if credentials is not None and credentials.token:
            self._auth = f"Bearer {credentials.token}"
            self.used_credentials = True

    # --- auth ---

    async def _authenticate(self, response: httpx.Response) -> None:
        challenge = response.headers.get("www-authenticate", "")
        scheme = challenge.split(" ", 1)[0].lower()
        creds = self._credentials
        where = self._ref.registry
        if scheme == "basic":
            if creds is None or not creds.username:
                raise RegistryDenied(
                    f"registry {where} requires a login: give credentials (SDK: "
                    "image_pull_credentials=, CLI: --username/--password-stdin, API: "
                    "spec.registry_auth) or put them in the service's Docker config"
                )
            pair = f"{creds.username}:{creds.password}".encode()
            self._auth = "Basic " + base64.b64encode(pair).decode()
            self.used_credentials = True
            return
        if scheme != "bearer":
            raise RegistryDenied(f"registry {where} answered 401 with {challenge!r}")
        params = dict(_CHALLENGE.findall(challenge))
        realm = params.pop("realm", "")
        if not realm.startswith(("https://", "http://")):
            raise RegistryDenied(f"registry {where}: bearer challenge without a usable realm")
        if "scope" not in params:
            params["scope"] = f"repository:{self._ref.repository}:pull"
        auth = None
        if creds is not None and creds.username:
            auth = httpx.BasicAuth(creds.username, creds.password)
            self.used_credentials = True
        try:
            answer = await self._http.get(realm, params=params, auth=auth, timeout=TIMEOUT)
        except httpx.HTTPError as exc:
            raise PullFailed(f"token server {realm} of {where}: {exc!r}") from exc
        if answer.status_code in (401, 403):
            raise RegistryDenied(f"token server of {where} refused the credentials")
        if answer.status_code != 200:
            raise PullFailed(f"token server of {where} answered HTTP {answer.status_code}")
        try:
            body = answer.json()
            token = body.get("token") or body.get("access_token")
        except (ValueError, AttributeError):
            token = None
        if not isinstance(token, str) or not token:
            raise PullFailed(f"token server of {where} sent no token")
        self._auth = f"Bearer {token}"

    async def _send(self, method: str, url: str, accept: str = "") -> httpx.Response:
        """Sends with auth (negotiating it on a 401 once); the caller closes the response."""
        for attempt in (1, 2):
            headers = {"Accept": accept} if accept else {}
            if self._auth:
                headers["Authorization"] = self._auth
            request = self._http.build_request(method, url, headers=headers, timeout=TIMEOUT)
            try:
                response = await self._http.send(request, stream=True, follow_redirects=True)
            except httpx.HTTPError as exc:
                raise PullFailed(f"registry {self._ref.registry}: {exc!r}") from exc
            if response.status_code != 401:
                return response
            await response.aclose()
            if attempt == 2:
                raise RegistryDenied(
                    f"registry {self._ref.registry} refused access to {self._ref.repository}"
                )
            await self._authenticate(response)
        raise AssertionError("unreachable")

    async def _fail(self, response: httpx.Response, what: str) -> None:
        status = response.status_code
        await response.aclose()
        if status == 404:
            raise ImageNotPresent(f"{what}: not found in registry {self._ref.registry}")
        if status == 403:
            raise RegistryDenied(f"{what}: registry {self._ref.registry} denied access")
        raise PullFailed(f"{what}: registry {self._ref.registry} answered HTTP {status}")

    # --- manifests ---

    async def get_manifest(self, reference: str) -> tuple[bytes, str, str]:
        """(body, media type, digest) of a manifest or index; verified against a digest ref."""
        accept = ", ".join((*INDEX_TYPES, *MANIFEST_TYPES))
        what = f"manifest {self._ref.name}:{reference}" if ":" not in reference else (
            f"manifest {self._ref.name}@{reference}")  # fmt: skip
        response = await self._send("GET", f"{self._base}/manifests/{reference}", accept)
        if response.status_code != 200:
            await self._fail(response, what)
        try:
            body = b""
            async for chunk in response.aiter_bytes():
                body += chunk
                if len(body) > MAX_MANIFEST_BYTES:
                    raise PullFailed(f"{what} is larger than {MAX_MANIFEST_BYTES} bytes")
        except httpx.HTTPError as exc:
            raise PullFailed(f"{what}: {exc!r}") from exc
        finally:
            await response.aclose()
        digest = sha256_digest(body)
        if reference.startswith("sha256:") and digest != reference:
            raise DigestMismatch(f"{what}: the registry sent content with digest {digest}")
        media_type = response.headers.get("content-type", "").split(";")[0].strip()
        try:
            parsed = json.loads(body)
        except ValueError as exc:
            raise PullFailed(f"{what} is not JSON") from exc
        if isinstance(parsed, dict) and isinstance(parsed.get("mediaType"), str):
            media_type = parsed["mediaType"]
        elif isinstance(parsed, dict) and "manifests" in parsed:
            media_type = OCI_INDEX
        elif isinstance(parsed, dict) and "layers" in parsed:
            media_type = OCI_MANIFEST
        return body, media_type, digest

    async def check_manifest(self, digest: str) -> None:
        """Asks (HEAD) whether the registry gives us the manifest `digest`; raises if not."""
        what = f"manifest {self._ref.name}@{digest}"
        accept = ", ".join((*INDEX_TYPES, *MANIFEST_TYPES))
        response = await self._send("HEAD", f"{self._base}/manifests/{digest}", accept)
        if response.status_code != 200:
            await self._fail(response, what)
        await response.aclose()

    # --- blobs ---

    async def get_small_blob(self, desc: Descriptor, limit: int = MAX_MANIFEST_BYTES) -> bytes:
        """A small blob (an image config) in memory, verified."""
        if desc.size > limit:
            raise PullFailed(f"blob {desc.digest} is {desc.size} bytes, more than {limit}")
        response = await self._send("GET", f"{self._base}/blobs/{desc.digest}")
        if response.status_code != 200:
            await self._fail(response, f"blob {desc.digest}")
        try:
            body = b""
            async for chunk in response.aiter_bytes():
                body += chunk
                if len(body) > desc.size:
                    break
        except httpx.HTTPError as exc:
            raise PullFailed(f"blob {desc.digest}: {exc!r}") from exc
        finally:
            await response.aclose()
        if len(body) != desc.size or sha256_digest(body) != desc.digest:
            raise DigestMismatch(
                f"blob {desc.digest}: the registry sent {len(body)} bytes with digest "
                f"{sha256_digest(body)}"
            )
        return body

    async def download_blob(
        self,
        desc: Descriptor,
        dest: Path,
        tmp_dir: Path,
        progress: Callable[[int], None] | None = None,
    ) -> None:
        """Downloads `desc` to `dest` via a temporary file in `tmp_dir`, verified, then renamed.

        `progress` receives the number of bytes received so far, at most every 0.1 s.
        """
        response = await self._send("GET", f"{self._base}/blobs/{desc.digest}")
        if response.status_code != 200:
            await self._fail(response, f"blob {desc.digest}")
        hasher = hashlib.sha256()
        received = 0
        last = 0.0
        fd, tmp_name = _mkstemp(tmp_dir, desc.digest)
        kept = False
        try:
            with os.fdopen(fd, "wb") as out:
                async for chunk in response.aiter_bytes(CHUNK):
                    received += len(chunk)
                    if received > desc.size:
                        raise DigestMismatch(
                            f"blob {desc.digest}: the registry sent more than its {desc.size} bytes"
                        )
                    hasher.update(chunk)
                    out.write(chunk)
                    now = time.monotonic()
                    if progress is not None and now - last >= 0.1:
                        last = now
                        progress(received)
            got = "sha256:" + hasher.hexdigest()
            if received != desc.size or got != desc.digest:
                raise DigestMismatch(
                    f"blob {desc.digest}: the registry sent {received} bytes with digest {got}; "
                    "refused and not kept"
                )
            os.rename(tmp_name, dest)
            kept = True
            if progress is not None:
                progress(received)
        except httpx.HTTPError as exc:
            raise PullFailed(f"blob {desc.digest}: {exc!r}") from exc
        finally:
            await response.aclose()
            if not kept:
                with contextlib.suppress(OSError):
                    os.unlink(tmp_name)


def _mkstemp(directory: Path, digest: str) -> tuple[int, str]:
    return tempfile.mkstemp(prefix=digest.replace(":", "-") + ".", dir=directory)
