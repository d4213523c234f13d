"""`Images`: the service's store of OCI images, from the client (pull ahead of time, list,
remove, prune), and its records `Image` and `PullProgress`.

Sandboxes pull their image by themselves on first use; `Images.pull` is for doing it ahead of
time (or fetching a newer image for a tag), with progress. Every call goes to `base_url`, else
`AVIATO_BASE_URL`, else the local service, as the sandbox calls do.
"""

from __future__ import annotations

import builtins
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from aviato import _defaults
from aviato._bridge import get_bridge
from aviato._client import get_client
from aviato._credentials import ImagePullCredentials, coerce_pull_credentials
from aviato.exceptions import AviatoError
from aviato.v1 import images_pb2 as ipb
from aviato.v1 import sandbox_pb2 as pb

__all__ = ["Image", "Images", "PullProgress"]


@dataclass(frozen=True, slots=True)
class Image:
    """One image in the service's store."""

    #: names pointing at it, e.g. ``["docker.io/library/python:3.11"]``
    names: list[str]
    #: the platform manifest's digest, ``sha256:...``
    digest: str
    #: compressed size of its layers, in bytes
    size: int
    pulled_at: datetime | None
    #: the node holding it (``"local"``)
    node: str
    #: whether a sandbox uses it now (such an image cannot be removed)
    in_use: bool

    @classmethod
    def _of(cls, image: ipb.Image) -> Image:
        pulled = image.pulled_at.ToDatetime(tzinfo=UTC) if image.HasField("pulled_at") else None
        return cls(
            names=list(image.names),
            digest=image.digest,
            size=image.size,
            pulled_at=pulled,
            node=image.node,
            in_use=image.in_use,
        )


@dataclass(frozen=True, slots=True)
class PullProgress:
    """One step of a pull, as `Images.pull` reports it to its `progress` callback."""

    #: "resolving", "downloading", "cached", "unpacking" or "done"
    phase: str
    #: the layer concerned (downloading, cached) or the image (unpacking, done)
    digest: str
    #: bytes so far and in all (0 when unknown)
    current: int
    total: int
    message: str


class Images:
    """The service's image store (see the module docstring). All methods block; each raises
    the `aviato.exceptions` error of the service's answer (e.g. `SandboxValidationError` for a
    reference that is not one, `AviatoError` for a registry that refused)."""

    @staticmethod
    def pull(
        reference: str,
        *,
        credentials: ImagePullCredentials | None = None,
        progress: Callable[[PullProgress], object] | None = None,
        base_url: str | None = None,
    ) -> Image:
        """Pulls `reference` (``python:3.11``, ``ghcr.io/org/app@sha256:...``) into the store
        and returns it. `credentials` log in to the registry (default: the service's Docker
        config, else anonymous). `progress` is called with each `PullProgress`, on the SDK's
        background thread (keep it quick)."""
        auth = coerce_pull_credentials(credentials)
        request = ipb.PullImageRequest(
            image=reference, registry_auth=auth._to_proto() if auth else pb.RegistryAuth()
        )
        return get_bridge().run(_pull(request, progress, base_url))

    @staticmethod
    def list(*, base_url: str | None = None) -> list[Image]:
        """The images in the store."""
        return get_bridge().run(_list(base_url))

    @staticmethod
    def remove(reference: str, *, base_url: str | None = None) -> Image:
        """Removes an image by name or digest and returns it (refused while a sandbox uses it)."""
        return get_bridge().run(_remove(reference, base_url))

    @staticmethod
    def prune(*, base_url: str | None = None) -> builtins.list[Image]:
        """Removes every image that no sandbox uses; returns them."""
        return get_bridge().run(_prune(base_url))


async def _pull(
    request: ipb.PullImageRequest,
    progress: Callable[[PullProgress], object] | None,
    base_url: str | None,
) -> Image:
    client = await get_client(_defaults.resolve_base_url(base_url, None))
    reader = await client.transport.pull_image(request, call_timeout=None)
    try:
        while (event := await reader.next()) is not None:
            if progress is not None:
                progress(
                    PullProgress(
                        phase=event.phase,
                        digest=event.digest,
                        current=event.current,
                        total=event.total,
                        message=event.message,
                    )
                )
            if event.HasField("image"):
                return Image._of(event.image)
    finally:
        reader.cancel()
    raise AviatoError(f"pulling {request.image}: the service ended the pull without a result")


async def _list(base_url: str | None) -> list[Image]:
    client = await get_client(_defaults.resolve_base_url(base_url, None))
    images = await client.with_retry(
        lambda: client.transport.list_images(
            call_timeout=_defaults.DEFAULT_REQUEST_TIMEOUT_SECONDS
        ),
        op="list images",
    )
    return [Image._of(image) for image in images]


async def _remove(reference: str, base_url: str | None) -> Image:
    client = await get_client(_defaults.resolve_base_url(base_url, None))
    removed = await client.transport.remove_image(
        reference, call_timeout=_defaults.DEFAULT_REQUEST_TIMEOUT_SECONDS
    )
    return Image._of(removed)


async def _prune(base_url: str | None) -> list[Image]:
    client = await get_client(_defaults.resolve_base_url(base_url, None))
    removed = await client.transport.prune_images(
        call_timeout=_defaults.DEFAULT_REQUEST_TIMEOUT_SECONDS
    )
    return [Image._of(image) for image in removed]
