"""The content-addressed image store of one node: `<state>/images/`.

```
images/
  blobs/sha256/<hex>        manifests, configs and compressed layers, each verified, kept once
  roots/<hex>/rootfs/       the unpacked root of the image whose manifest digest is sha256:<hex>
  roots/<hex>/image.json    its config (Env, User, ...) and the blobs it is made of
  refs.json                 image names ("docker.io/library/python:3.11") → manifest digests
  private.json              manifest digests that were pulled only with per-sandbox credentials
  tmp/                      downloads and unpacks in progress; renamed into place when complete
```

Everything here is private to the service's user (`aviato._private`: directories 0700, files
0600), except the contents of each `rootfs/`, which keep the image's modes without set-id bits.
Unpacked roots are made and removed through directory descriptors, never following a symlink
a layer planted (`beneath.py`, `unpack.py`).

What one pull may cost is bounded (`limits.PullLimits`: bytes, entries, the free-disk floor);
a pull refused for its size or for the disk leaves nothing behind: no partial root, nothing in
`tmp/`, and none of its layer blobs that nothing else needs.

A layer blob is downloaded once, whatever number of images use it. An image's layers are
applied in order into one directory, once per image (not per sandbox): every sandbox of the
image binds that directory read-only and gets its own writable layer (see
`aviato.runtime.oci_image_root`).

Concurrency: the service's event loop is the only writer. `pull` is single-flight per image name
(and each blob and each unpack per digest), so ten sandboxes created at once from an image not
yet present make one pull; the pull runs as its own task, so a caller that goes away (a client
disconnecting) does not cancel it for the others. Unpacking runs in a worker thread.

Tags are resolved when the image is pulled and then used as stored (Docker's "pull if missing"):
`aviato image pull NAME` fetches a newer image for the same tag. `prune` removes every image no
sandbox of this node uses, with the blobs no remaining image needs; `remove` one image.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from aviato import _private
from aviato.images import beneath
from aviato.images import credentials as creds_mod
from aviato.images.credentials import RegistryCredentials
from aviato.images.egress import Egress
from aviato.images.errors import (
    DigestMismatch,
    ImageError,
    ImageNotPresent,
    PullFailed,
    RegistryDenied,
)
from aviato.images.image_config import ImageConfig
from aviato.images.limits import DiskLow, ImageTooLarge, PullBudget, PullLimits
from aviato.images.manifest import choose_platform, parse_manifest
from aviato.images.reference import ImageRef, InvalidReference, parse_reference
from aviato.images.registry_client import (
    INDEX_TYPES,
    MANIFEST_TYPES,
    Descriptor,
    RegistryClient,
    shown,
)
from aviato.images.unpack import UnsafeLayer, apply_layer

__all__ = ["ImageInUse", "ImageStore", "PullProgress", "StoredImage"]

log = logging.getLogger("aviato.images")

_PARALLEL_DOWNLOADS = 3


class ImageInUse(ImageError):
    code = "FAILED_PRECONDITION"


@dataclass(frozen=True)
class PullProgress:
    """One step of a pull. `phase`: "resolving", "downloading" (current/total bytes of the blob
    `digest`), "cached" (a blob already in the store), "unpacking", "done"."""

    phase: str
    digest: str = ""
    current: int = 0
    total: int = 0
    message: str = ""


ProgressFn = Callable[[PullProgress], None]


@dataclass(frozen=True)
class StoredImage:
    digest: str  # of the platform manifest
    names: tuple[str, ...]
    config: ImageConfig
    rootfs: Path
    size: int  # compressed layers, bytes
    pulled_ns: int
    blobs: tuple[str, ...] = field(default=(), repr=False)


def _hex(digest: str) -> str:
    return digest.split(":", 1)[1]


class ImageStore:
    """The store under `directory`. `in_use` returns the manifest digests sandboxes use."""

    def __init__(
        self,
        directory: Path,
        *,
        docker_config: Path | None = None,
        insecure_registries: tuple[str, ...] = (),
        limits: PullLimits | None = None,
    ) -> None:
        """`insecure_registries`: the registries the operator names (HOST or HOST:PORT, see
        egress.py); `limits`: what one pull may cost (default: limits.PullLimits())."""
        self.directory = Path(directory)
        self._blobs = self.directory / "blobs" / "sha256"
        self._roots = self.directory / "roots"
        self._tmp = self.directory / "tmp"
        for d in (self.directory, self.directory / "blobs", self._blobs, self._roots, self._tmp):
            _private.private_dir(d)
        self._refs_path = self.directory / "refs.json"
        self._docker_config = docker_config
        self._egress = Egress.from_names(insecure_registries)
        self._limits = limits or PullLimits()
        self._pull_layers: dict[str, set[str]] = {}  # pull key → its layer digests
        self._refs: dict[str, str] = self._load_refs()
        self._private_path = self.directory / "private.json"
        self._private: set[str] = self._load_private()
        self._flights: dict[str, asyncio.Task[StoredImage]] = {}
        self._listeners: dict[str, list[ProgressFn]] = {}
        self._blob_flights: dict[str, asyncio.Task[None]] = {}
        self._unpack_locks: dict[str, asyncio.Lock] = {}
        self._images: dict[str, StoredImage] = {}
        self.in_use: Callable[[], set[str]] = set
        # Counters for tests and `aviato server status`.
        self.blob_downloads = 0
        self.unpacks = 0
        self._clean_tmp()

    # --- refs ---

    def _load_refs(self) -> dict[str, str]:
        try:
            data = json.loads(self._refs_path.read_text())
        except (OSError, ValueError):
            return {}
        return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}

    def _save_refs(self) -> None:
        data = json.dumps(self._refs, indent=1, sort_keys=True).encode()
        _private.write_private(self._refs_path, data, self._tmp)

    def _load_private(self) -> set[str]:
        try:
            data = json.loads(self._private_path.read_text())
        except (OSError, ValueError):
            return set()
        return {str(d) for d in data} if isinstance(data, list) else set()

    def _save_private(self) -> None:
        data = json.dumps(sorted(self._private), indent=1).encode()
        _private.write_private(self._private_path, data, self._tmp)

    def _client(self, ref: ImageRef, credentials: RegistryCredentials | None,
                http: httpx.AsyncClient) -> RegistryClient:  # fmt: skip
        return RegistryClient(ref, credentials, http, egress=self._egress)

    def _http(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(transport=self._egress.transport(), trust_env=False)

    def is_private(self, image: StoredImage) -> bool:
        """Whether `image` was fetched only with per-sandbox credentials: every use must then
        prove access to it (`ensure` asks the registry)."""
        return image.digest in self._private

    async def _check_access(
        self, image: str, digest: str, credentials: RegistryCredentials | None
    ) -> None:
        """Raises RegistryDenied unless the registry gives `credentials` (or, without any, the
        service's own access) the manifest `digest` of the repository `image` names."""
        ref = parse_reference(image)
        if credentials is None or not (credentials.username or credentials.token):
            credentials = creds_mod.from_docker_config(ref.registry, self._docker_config)
        async with self._http() as http:
            client = self._client(ref, credentials, http)
            try:
                await client.check_manifest(digest)
            except (RegistryDenied, ImageNotPresent) as exc:
                raise RegistryDenied(
                    f"{ref} is a private image: this node has it, but it is used only with "
                    "credentials its registry accepts (SDK: image_pull_credentials=, CLI: "
                    f"--username/--password-stdin, API: spec.registry_auth): {exc}"
                ) from None

    def _clean_tmp(self) -> None:
        for entry in os.listdir(self._tmp):
            self._remove_tmp(entry)

    def _remove_tmp(self, name: str) -> None:
        """Removes the entry `name` of tmp/ (a whole unpacked tree too), following nothing."""
        with contextlib.suppress(OSError):
            fd = os.open(self._tmp, beneath.DIR_FLAGS)
            try:
                beneath.remove(fd, name)
            finally:
                os.close(fd)

    # --- lookups ---

    def _load(self, digest: str) -> StoredImage | None:
        cached = self._images.get(digest)
        root = self._roots / _hex(digest)
        if cached is not None and root.is_dir():
            names = tuple(sorted(n for n, d in self._refs.items() if d == digest))
            return cached if cached.names == names else _renamed(cached, names)
        try:
            meta = json.loads((root / "image.json").read_text())
        except (OSError, ValueError):
            return None
        image = StoredImage(
            digest=digest,
            names=tuple(sorted(n for n, d in self._refs.items() if d == digest)),
            config=ImageConfig.from_json(meta.get("config", {})),
            rootfs=root / "rootfs",
            size=int(meta.get("size", 0)),
            pulled_ns=int(meta.get("pulled_ns", 0)),
            blobs=tuple(meta.get("blobs", [])),
        )
        self._images[digest] = image
        return image

    def find(self, image: str) -> StoredImage | None:
        """The stored image for a name or reference, or None when it must be pulled."""
        try:
            ref = parse_reference(image)
        except InvalidReference:
            return None
        digest = self._refs.get(str(ref))
        if digest is None and ref.digest:
            digest = ref.digest
        return self._load(digest) if digest else None

    def list_images(self) -> list[StoredImage]:
        found: list[StoredImage] = []
        for entry in sorted(self._roots.iterdir()):
            image = self._load("sha256:" + entry.name)
            if image is not None:
                found.append(image)
        return found

    # --- pulling ---

    async def pull(
        self,
        image: str,
        credentials: RegistryCredentials | None = None,
        progress: ProgressFn | None = None,
    ) -> StoredImage:
        """Pulls `image` (always asks the registry); concurrent pulls of one name share one."""
        try:
            ref = parse_reference(image)
        except InvalidReference as exc:
            raise ImageError(f"invalid image reference: {exc}") from None
        key = str(ref)
        listeners = self._listeners.setdefault(key, [])
        if progress is not None:
            listeners.append(progress)
        task = self._flights.get(key)
        joined = task is not None
        if task is None:
            task = asyncio.create_task(self._pull(ref, credentials, key), name=f"pull {key}")
            self._flights[key] = task

            def done(_: asyncio.Task[StoredImage]) -> None:
                self._flights.pop(key, None)
                self._listeners.pop(key, None)

            task.add_done_callback(done)
        try:
            image_found = await asyncio.shield(task)
        finally:
            if progress is not None and progress in listeners:
                listeners.remove(progress)
        if joined and self.is_private(image_found):
            # Someone else's pull fetched it with their credentials: prove our own access.
            await self._check_access(key, image_found.digest, credentials)
        return image_found

    async def ensure(
        self, image: str, credentials: RegistryCredentials | None = None
    ) -> StoredImage:
        """The stored image, pulled first when it is not present (or joining a pull underway)."""
        try:
            key = str(parse_reference(image))
        except InvalidReference as exc:
            raise ImageError(f"invalid image reference: {exc}") from None
        if key not in self._flights:
            found = self.find(image)
            if found is not None:
                if self.is_private(found):
                    await self._check_access(key, found.digest, credentials)
                return found
        return await self.pull(image, credentials)

    def pulling(self, image: str) -> bool:
        with contextlib.suppress(InvalidReference):
            return str(parse_reference(image)) in self._flights
        return False

    def _emit(self, key: str, event: PullProgress) -> None:
        for listener in list(self._listeners.get(key, ())):
            with contextlib.suppress(Exception):
                listener(event)

    async def _pull(
        self, ref: ImageRef, credentials: RegistryCredentials | None, key: str
    ) -> StoredImage:
        own = credentials is not None and bool(credentials.username or credentials.token)
        if not own:
            credentials = creds_mod.from_docker_config(ref.registry, self._docker_config)
        emit: ProgressFn = lambda event: self._emit(key, event)  # noqa: E731
        emit(PullProgress("resolving", message=f"resolving {key}"))
        budget = PullBudget(key, self._limits, self.directory)
        async with self._http() as http:
            client = self._client(ref, credentials, http)
            body, media_type, digest = await client.get_manifest(ref.reference)
            if media_type in INDEX_TYPES:
                chosen = choose_platform(body, key)
                self._put_blob(digest, body)
                body, media_type, digest = await client.get_manifest(chosen.digest)
            if media_type not in MANIFEST_TYPES:
                raise PullFailed(f"{key}: unsupported manifest type {shown(media_type)}")
            config_desc, layers = parse_manifest(body, key)
            existing = self._load(digest)
            if existing is None:
                self._pull_layers[key] = {d.digest for d in layers}
                try:
                    missing = [d for d in layers if not (self._blobs / _hex(d.digest)).exists()]
                    budget.check_download(sum(d.size for d in layers),
                                          sum(d.size for d in missing))  # fmt: skip
                    config_bytes = await client.get_small_blob(config_desc)
                    config = ImageConfig.parse(config_bytes)
                    self._put_blob(digest, body)
                    self._put_blob(config_desc.digest, config_bytes)
                    try:
                        await self._download_layers(client, layers, emit, budget)
                    except OSError as exc:
                        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                            raise
                        raise budget.disk_full(exc) from exc
                    await self._unpack(digest, config, config_desc, layers, emit, budget)
                except (ImageTooLarge, DiskLow, UnsafeLayer, DigestMismatch):
                    self._drop_blobs(key, [digest, config_desc.digest, *self._pull_layers[key]])
                    raise
                finally:
                    self._pull_layers.pop(key, None)
            # Private: the registry wanted a login and only the caller's credentials gave it.
            private = own and client.used_credentials
        self._refs[key] = digest
        self._save_refs()
        if private != (digest in self._private):
            (self._private.add if private else self._private.discard)(digest)
            self._save_private()
        image = self._load(digest)
        if image is None:
            raise ImageError(f"{key}: the store lost image {digest} while pulling it")
        emit(PullProgress("done", digest=digest, message=f"{key}: {digest}"))
        log.info("image pulled %s digest=%s", key, digest)
        return image

    def _put_blob(self, digest: str, data: bytes) -> None:
        path = self._blobs / _hex(digest)
        if path.exists():
            return
        _private.write_private(path, data, self._tmp)

    def _drop_blobs(self, key: str, digests: list[str]) -> None:
        """Removes blobs of a refused pull that no stored image and no other pull needs."""
        keep: set[str] = set(self._refs.values())
        for image in self.list_images():
            keep.update(image.blobs)
        for other, layers in self._pull_layers.items():
            if other != key:
                keep |= layers
        keep |= set(self._blob_flights)
        for digest in set(digests) - keep:
            with contextlib.suppress(OSError):
                (self._blobs / _hex(digest)).unlink()

    async def _download_layers(
        self,
        client: RegistryClient,
        layers: list[Descriptor],
        emit: ProgressFn,
        budget: PullBudget,
    ) -> None:
        limit = asyncio.Semaphore(_PARALLEL_DOWNLOADS)

        async def one(desc: Descriptor) -> None:
            path = self._blobs / _hex(desc.digest)
            if path.exists():
                emit(PullProgress("cached", desc.digest, desc.size, desc.size))
                return
            flight = self._blob_flights.get(desc.digest)
            if flight is None:

                async def fetch() -> None:
                    async with limit:
                        emit(PullProgress("downloading", desc.digest, 0, desc.size))
                        self.blob_downloads += 1
                        await client.download_blob(
                            desc, path, self._tmp,
                            lambda n: emit(PullProgress("downloading", desc.digest, n, desc.size)),
                            budget.downloaded,
                        )  # fmt: skip

                flight = asyncio.create_task(fetch())
                self._blob_flights[desc.digest] = flight
                flight.add_done_callback(lambda _: self._blob_flights.pop(desc.digest, None))
            await asyncio.shield(flight)

        results = await asyncio.gather(*(one(d) for d in layers), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result

    async def _unpack(
        self,
        digest: str,
        config: ImageConfig,
        config_desc: Descriptor,
        layers: list[Descriptor],
        emit: ProgressFn,
        budget: PullBudget,
    ) -> None:
        lock = self._unpack_locks.setdefault(digest, asyncio.Lock())
        async with lock:
            if (self._roots / _hex(digest) / "image.json").exists():
                return
            emit(PullProgress("unpacking", digest, 0, len(layers)))
            self.unpacks += 1
            work = self._tmp / f"unpack-{_hex(digest)[:16]}-{secrets.token_hex(4)}"
            try:
                await asyncio.to_thread(self._unpack_sync, work, digest, config, config_desc,
                                        layers, budget)  # fmt: skip
                os.rename(work, self._roots / _hex(digest))
            finally:  # after the rename there is nothing left to remove
                await asyncio.to_thread(self._remove_tmp, work.name)
        self._unpack_locks.pop(digest, None)

    def _unpack_sync(
        self,
        work: Path,
        digest: str,
        config: ImageConfig,
        config_desc: Descriptor,
        layers: list[Descriptor],
        budget: PullBudget,
    ) -> None:
        rootfs = work / "rootfs"
        _private.private_dir(work)
        _private.private_dir(rootfs)
        check_ids = len(config.diff_ids) == len(layers)
        for index, desc in enumerate(layers):
            try:
                diff_id = apply_layer(self._blobs / _hex(desc.digest), rootfs, budget=budget)
            except UnsafeLayer as exc:
                raise UnsafeLayer(f"image {budget.image}: layer {desc.digest}: {exc}") from None
            if check_ids and diff_id != config.diff_ids[index]:
                raise DigestMismatch(
                    f"layer {desc.digest}: its uncompressed content has digest {diff_id}, but "
                    f"the image config says {config.diff_ids[index]}"
                )
        if config.working_dir:  # made inside the root, through its symlinks, never outside
            root_fd = beneath.open_root(rootfs)
            try:
                beneath.walk(root_fd, config.working_dir, create=True).close()
            finally:
                os.close(root_fd)
        meta: dict[str, Any] = {
            "digest": digest,
            "config": config.to_json(),
            "size": sum(d.size for d in layers),
            "pulled_ns": time.time_ns(),
            "blobs": [digest, config_desc.digest, *(d.digest for d in layers)],
        }
        _private.write_private(work / "image.json", json.dumps(meta, indent=1).encode())

    # --- removal ---

    def _users(self) -> set[str]:
        try:
            return set(self.in_use())
        except Exception:
            log.exception("cannot tell which images are in use; removing none")
            raise ImageError("cannot tell which images are in use") from None

    def remove(self, image: str) -> StoredImage:
        """Removes one image (by name, reference or manifest digest) unless a sandbox uses it."""
        stored = self._load(image) if image.startswith("sha256:") else self.find(image)
        if stored is None:
            raise ImageNotPresent(f"image {image!r} is not in this node's store")
        if self.pulling(image) or any(self.pulling(n) for n in stored.names):
            raise ImageInUse(f"image {image!r} is being pulled")
        if stored.digest in self._users():
            raise ImageInUse(f"image {image!r} is used by a sandbox of this node; stop it first")
        self._delete(stored)
        self._collect_blobs()
        return stored

    def prune(self) -> list[StoredImage]:
        """Removes every image that no sandbox uses, and blobs no remaining image needs."""
        if self._flights:
            busy = ", ".join(sorted(self._flights))
            raise ImageInUse(f"pulls are underway ({busy}); prune when they are done")
        users = self._users()
        removed = [image for image in self.list_images() if image.digest not in users]
        for image in removed:
            self._delete(image)
        self._collect_blobs()
        self._clean_tmp()
        return removed

    def _delete(self, image: StoredImage) -> None:
        for name in [n for n, d in self._refs.items() if d == image.digest]:
            del self._refs[name]
        self._save_refs()
        self._images.pop(image.digest, None)
        root = self._roots / _hex(image.digest)
        trash = f"rm-{_hex(image.digest)[:16]}-{secrets.token_hex(4)}"
        with contextlib.suppress(FileNotFoundError):
            os.rename(root, self._tmp / trash)
            self._remove_tmp(trash)

    def _collect_blobs(self) -> None:
        images = self.list_images()
        needed: set[str] = set(self._refs.values())
        stored = {image.digest for image in images} | needed
        if self._private - stored:
            self._private &= stored
            self._save_private()
        for image in images:
            needed.update(image.blobs)
        busy = set(self._blob_flights)
        for entry in self._blobs.iterdir():
            digest = "sha256:" + entry.name
            if digest not in needed and digest not in busy:
                with contextlib.suppress(OSError):
                    entry.unlink()

    def describe(self) -> dict[str, str]:
        images = self.list_images()
        return {
            "image_store": str(self.directory),
            "images": str(len(images)),
        }


def _renamed(image: StoredImage, names: tuple[str, ...]) -> StoredImage:
    return StoredImage(image.digest, names, image.config, image.rootfs, image.size,
                       image.pulled_ns, image.blobs)  # fmt: skip
