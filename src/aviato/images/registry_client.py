"""A client of the OCI distribution API (`/v2/`): manifests and blobs, with the usual auth.

Auth follows the registry's `WWW-Authenticate` answer to a first anonymous request:

- `Basic`: the credentials are sent with every request;
- `Bearer realm=… service=… scope=…`: a token is fetched from the realm (with the credentials
  as basic auth when there are any, anonymously otherwise) and sent as `Authorization: Bearer`;
  it is fetched again when it expires (a 401 later on).

A credential that is itself a bearer token (`RegistryCredentials.token`) is sent as is.

Where requests may go is `egress.Egress`'s decision: HTTPS with certificate verification on
public addresses, plain HTTP and inner addresses only for registries the operator names. A token
realm and every redirect are checked before they are followed (redirects are followed here, at
most `MAX_REDIRECTS`, never by httpx), and credentials go only to the registry's own origin and
to a realm that passed the check. Error messages say which step failed and the HTTP status; they
never repeat a body, a header or a field an endpoint answered (`shown` lets through only what
has the shape of a media type).

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

from aviato.images.credentials import RegistryCredentials
from aviato.images.egress import Egress, RegistryRefused
from aviato.images.errors import (
    DigestMismatch,
    ImageNotPresent,
    PullFailed,
    RegistryDenied,
)
from aviato.images.reference import ImageRef

__all__ = [
    "INDEX_TYPES",
    "MANIFEST_TYPES",
    "Descriptor",
    "RegistryClient",
    "describe_failure",
    "host_platform",
    "shown",
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
MAX_REDIRECTS = 5
_REDIRECTS = (301, 302, 303, 307, 308)
_MEDIA_TYPE = re.compile(r"application/[a-z0-9][a-z0-9.+-]{0,100}")

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
            raise PullFailed(f"{what} has an invalid digest: only sha256 digests are supported")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise PullFailed(f"{what} has an invalid size")
        return cls(str(data.get("mediaType", "")), digest, size)


def shown(media_type: object) -> str:
    """A media type a registry sent, quoted when it has the shape of one (application/...),
    else a placeholder: what an endpoint answered is never repeated verbatim."""
    ok = isinstance(media_type, str) and _MEDIA_TYPE.fullmatch(media_type)
    return repr(media_type) if ok else "(not a media type)"


def describe_failure(exc: BaseException) -> str:
    """A transport failure in a few words, without the endpoint's words."""
    if isinstance(exc, httpx.ConnectTimeout):
        return "timed out connecting"
    if isinstance(exc, httpx.ConnectError):
        text = str(exc)
        if "CERTIFICATE" in text or "SSL" in text or "TLS" in text:
            return "the TLS handshake failed (certificate not trusted, or the server does not "\
                   "speak HTTPS)"  # fmt: skip
        if "resolve" in text:
            return "its name does not resolve"
        return "could not connect"
    if isinstance(exc, httpx.TimeoutException):
        return "timed out waiting for its answer"
    if isinstance(exc, httpx.RemoteProtocolError | httpx.DecodingError):
        return "its answer is not valid HTTP"
    return f"the connection failed ({type(exc).__name__})"


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
        egress: Egress,
    ) -> None:
        """`http` must use `egress.transport()`: it checks every address connected to."""
        self._ref = ref
        self._egress = egress
        base = egress.registry_url(ref.registry, ref.api_host)
        self._origin = httpx.URL(base)
        self._base = f"{base}/v2/{ref.repository}"
        self._credentials = credentials
        self._http = http
        self._auth: str | None = None
        # Whether the given credentials were sent (the registry asked for a login).
        self.used_credentials = False
        if credentials is not None and credentials.token:
            self._auth = f"Bearer {credentials.token}"
            self.used_credentials = True

    def _same_origin(self, url: httpx.URL) -> bool:
        o = self._origin
        return (url.scheme, url.host, url.port) == (o.scheme, o.host, o.port)

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
            raise RegistryDenied(
                f"registry {where} asks for an authentication scheme other than Basic or Bearer"
            )
        params = dict(_CHALLENGE.findall(challenge))
        realm = params.pop("realm", "")
        try:
            realm_url = httpx.URL(realm)
        except (httpx.InvalidURL, ValueError):
            realm_url = None
        if realm_url is None or not realm.startswith(("https://", "http://")):
            raise RegistryDenied(f"registry {where}: bearer challenge without a usable realm")
        self._egress.check_url(realm_url, self._origin, f"the token realm of registry {where}")
        if "scope" not in params:
            params["scope"] = f"repository:{self._ref.repository}:pull"
        auth = ""
        if creds is not None and creds.username:
            pair = f"{creds.username}:{creds.password}".encode()
            auth = "Basic " + base64.b64encode(pair).decode()
            self.used_credentials = True
        request = self._http.build_request(
            "GET", realm_url, params=params, timeout=TIMEOUT,
            headers={"Authorization": auth} if auth else None,
        )  # fmt: skip
        status, data = 0, b""
        try:
            answer = await self._http.send(request, stream=True, follow_redirects=False)
            try:
                status = answer.status_code
                if status == 200:  # read at most MAX_MANIFEST_BYTES + 1: a token is small
                    async for chunk in answer.aiter_bytes():
                        data += chunk
                        if len(data) > MAX_MANIFEST_BYTES:
                            break
            finally:
                await answer.aclose()
        except RegistryRefused as exc:
            raise RegistryRefused(f"the token realm of registry {where}: {exc}") from None
        except httpx.HTTPError as exc:
            raise PullFailed(
                f"the token server of registry {where} ({realm_url.host}): {describe_failure(exc)}"
            ) from exc
        if status in (401, 403):
            raise RegistryDenied(f"token server of {where} refused the credentials")
        if status != 200:
            raise PullFailed(f"token server of {where} answered HTTP {status}")
        try:
            if len(data) > MAX_MANIFEST_BYTES:
                raise ValueError("too large")
            body = json.loads(data)
            token = body.get("token") or body.get("access_token")
        except (ValueError, AttributeError):
            token = None
        if not isinstance(token, str) or not token:
            raise PullFailed(f"token server of {where} sent no token")
        self._auth = f"Bearer {token}"

    async def _send(self, method: str, url: str, accept: str = "") -> httpx.Response:
        """Sends with auth (negotiating it on a 401 once); the caller closes the response."""
        for attempt in (1, 2):
            response = await self._follow(method, httpx.URL(url), accept)
            if response.status_code != 401 or not self._same_origin(response.url):
                return response
            await response.aclose()
            if attempt == 2:
                raise RegistryDenied(
                    f"registry {self._ref.registry} refused access to {self._ref.repository}"
                )
            await self._authenticate(response)
        raise AssertionError("unreachable")

    async def _follow(self, method: str, url: httpx.URL, accept: str) -> httpx.Response:
        """One request and its redirects, each target checked before it is contacted; the
        registry's credentials go to the registry's origin only."""
        step = ("manifest" if "/manifests/" in url.path else "blob") + f" of {self._ref.name}"
        for _ in range(MAX_REDIRECTS + 1):
            headers = {"Accept": accept} if accept else {}
            if self._auth and self._same_origin(url):
                headers["Authorization"] = self._auth
            request = self._http.build_request(method, url, headers=headers, timeout=TIMEOUT)
            where = "registry " + self._ref.registry if self._same_origin(url) else (
                f"a redirect of registry {self._ref.registry}")  # fmt: skip
            try:
                response = await self._http.send(request, stream=True, follow_redirects=False)
            except RegistryRefused as exc:
                raise RegistryRefused(f"{step}: {where}: {exc}") from None
            except httpx.HTTPError as exc:
                raise PullFailed(f"{step}: {where}: {describe_failure(exc)}") from exc
            location = response.headers.get("location", "")
            if response.status_code not in _REDIRECTS or not location:
                return response
            await response.aclose()
            try:
                url = url.join(location)
            except (httpx.InvalidURL, ValueError):
                raise PullFailed(f"{step}: the registry sent an invalid redirect") from None
            self._egress.check_url(url, self._origin, f"{step}: a redirect")
        raise PullFailed(f"{step}: more than {MAX_REDIRECTS} redirects")

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
            where = f"registry {self._ref.registry}"
            raise PullFailed(f"{what}: {where}: {describe_failure(exc)}") from exc
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
            raise PullFailed(
                f"blob {desc.digest}: registry {self._ref.registry}: {describe_failure(exc)}"
            ) from exc
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
        charge: Callable[[int], None] | None = None,
    ) -> None:
        """Downloads `desc` to `dest` via a temporary file in `tmp_dir`, verified, then renamed.

        `progress` receives the number of bytes received so far, at most every 0.1 s; `charge`
        each chunk's size before it is written (it raises to stop the download: the pull's
        budget).
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
                    if charge is not None:
                        charge(len(chunk))
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
            raise PullFailed(
                f"blob {desc.digest}: registry {self._ref.registry}: {describe_failure(exc)}"
            ) from exc
        finally:
            await response.aclose()
            if not kept:
                with contextlib.suppress(OSError):
                    os.unlink(tmp_name)


def _mkstemp(directory: Path, digest: str) -> tuple[int, str]:
    return tempfile.mkstemp(prefix=digest.replace(":", "-") + ".", dir=directory)
