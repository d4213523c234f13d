"""The gRPC servicer of aviato.v1.ImageService: pull, list, remove and prune images.

The store belongs to each node's runtime (`BubblewrapRuntime.images`); with the local placement
there is one node. Images are shared by every owner of the service (as a Docker daemon's are): any
authenticated caller may pull, list, remove and prune, and removal never touches an image a
sandbox uses. Credentials given to PullImage are used for that pull only and never stored.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from aviato.images.reference import InvalidReference, parse_reference
from aviato.images.store import ImageStore, PullProgress, StoredImage
from aviato.runtime.base import SandboxRuntimeError
from aviato.server.auth import Authenticator
from aviato.server.errors import FailedPrecondition, InvalidArgument, ServiceError
from aviato.server.placement import Placement
from aviato.server.validation import validate_registry_auth
from aviato.v1 import images_pb2 as ipb

__all__ = ["ImageServicer"]

log = logging.getLogger("aviato.server.images")

if TYPE_CHECKING:
    Ctx = grpc.aio.ServicerContext[Any, Any]


def _status(code: str) -> grpc.StatusCode:
    status: grpc.StatusCode = getattr(grpc.StatusCode, code, grpc.StatusCode.INTERNAL)
    return status


def image_message(image: StoredImage, node: str, in_use: set[str]) -> ipb.Image:
    pulled = Timestamp()
    pulled.FromNanoseconds(image.pulled_ns)
    return ipb.Image(
        names=list(image.names),
        digest=image.digest,
        size=image.size,
        pulled_at=pulled,
        node=node,
        in_use=image.digest in in_use,
    )


class ImageServicer:
    """Implements aviato.v1.ImageService over the image stores of the placement's nodes."""

    def __init__(self, auth: Authenticator, placement: Placement) -> None:
        self._auth = auth
        self._placement = placement

    def _stores(self) -> list[tuple[str, ImageStore]]:
        stores: list[tuple[str, ImageStore]] = []
        for node, runtime in self._placement.nodes().items():
            store = getattr(runtime, "images", None)
            if isinstance(store, ImageStore):
                stores.append((node, store))
        if not stores:
            raise FailedPrecondition("no node of this service keeps an image store")
        return stores

    async def _guard(self, context: Ctx) -> None:
        try:
            self._auth.owner_of(context.peer(), context.invocation_metadata())
        except ServiceError as e:
            await context.abort(_status(e.code), str(e))

    async def _fail(self, context: Ctx, exc: BaseException) -> None:
        if isinstance(exc, ServiceError | SandboxRuntimeError):
            await context.abort(_status(exc.code), str(exc))
        log.error("image call failed", exc_info=exc)
        await context.abort(grpc.StatusCode.INTERNAL, "internal error (see the server log)")

    async def PullImage(self, request: ipb.PullImageRequest, context: Ctx) -> Any:
        await self._guard(context)
        queue: asyncio.Queue[PullProgress] = asyncio.Queue()
        try:
            if not request.image:
                raise InvalidArgument("image", "is required")
            try:
                parse_reference(request.image)
            except InvalidReference as exc:
                raise InvalidArgument("image", str(exc)) from None
            credentials = validate_registry_auth(request.registry_auth, "registry_auth")
            node, store = self._stores()[0]
            pull = asyncio.ensure_future(store.pull(request.image, credentials, queue.put_nowait))
        except Exception as exc:
            await self._fail(context, exc)
            return
        try:
            while True:
                getter = asyncio.ensure_future(queue.get())
                done, _ = await asyncio.wait({pull, getter}, return_when=asyncio.FIRST_COMPLETED)
                if getter in done:
                    event = getter.result()
                    if event.phase != "done":
                        yield ipb.PullImageProgress(
                            phase=event.phase, digest=event.digest, current=event.current,
                            total=event.total, message=event.message,
                        )  # fmt: skip
                    continue
                getter.cancel()
                break
            image = pull.result()
        except asyncio.CancelledError:
            pull.cancel()
            raise
        except Exception as exc:
            await self._fail(context, exc)
            return
        yield ipb.PullImageProgress(
            phase="done", digest=image.digest, message=f"pulled {request.image}",
            image=image_message(image, node, store.in_use()),
        )  # fmt: skip

    async def ListImages(self, request: ipb.ListImagesRequest, context: Ctx) -> Any:
        await self._guard(context)
        try:
            images: list[ipb.Image] = []
            for node, store in self._stores():
                in_use = store.in_use()
                images += [image_message(i, node, in_use) for i in store.list_images()]
            return ipb.ListImagesResponse(images=images)
        except Exception as exc:
            await self._fail(context, exc)

    async def RemoveImage(self, request: ipb.RemoveImageRequest, context: Ctx) -> Any:
        await self._guard(context)
        try:
            if not request.image:
                raise InvalidArgument("image", "is required")
            node, store = self._stores()[0]
            removed = store.remove(request.image)
            return ipb.RemoveImageResponse(image=image_message(removed, node, set()))
        except Exception as exc:
            await self._fail(context, exc)

    async def PruneImages(self, request: ipb.PruneImagesRequest, context: Ctx) -> Any:
        await self._guard(context)
        try:
            removed: list[ipb.Image] = []
            for node, store in self._stores():
                removed += [image_message(i, node, set()) for i in store.prune()]
            return ipb.PruneImagesResponse(removed=removed)
        except Exception as exc:
            await self._fail(context, exc)
