"""The gRPC servicer of aviato.v1.ImageService: pull, list, remove and prune images.

Images belong to the nodes' runtimes, through the optional part of the runtime interface
(`Runtime.images`, an `ImageService`; None for a runtime without a store). An image call applies
to every node of the service that keeps a store (`EveryNode`): a pull pulls on each (so that a
sandbox finds its image wherever it is placed), a list gives the union (each image naming its
node), a removal or prune removes everywhere. With the local placement that is the one node.

Images are shared by every owner of the service (as a Docker daemon's are): any authenticated
caller may pull, list, remove and prune, and removal never touches an image a sandbox uses.
Credentials given to PullImage are used for that pull only and never stored.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from aviato.images.reference import InvalidReference, parse_reference
from aviato.runtime.base import (
    ImageInfo,
    ImagePullProgress,
    ImageService,
    PullProgressFn,
    RegistryCredentials,
    SandboxRuntimeError,
)
from aviato.runtime.image_service import pull_with_progress
from aviato.server import errors
from aviato.server.auth import Authenticator
from aviato.server.errors import FailedPrecondition, InvalidArgument, ServiceError
from aviato.server.placement import Placement
from aviato.server.validation import validate_registry_auth
from aviato.v1 import images_pb2 as ipb

__all__ = ["EveryNode", "ImageServicer"]

log = logging.getLogger("aviato.server.images")

if TYPE_CHECKING:
    Ctx = grpc.aio.ServicerContext[Any, Any]


def image_message(image: ImageInfo) -> ipb.Image:
    pulled = Timestamp()
    pulled.FromNanoseconds(image.pulled_ns)
    return ipb.Image(
        names=list(image.names),
        digest=image.digest,
        size=image.size,
        pulled_at=pulled,
        node=image.node,
        in_use=image.in_use,
    )


class EveryNode(ImageService):
    """The image services of several nodes as one: each call goes to all of them."""

    def __init__(self, nodes: dict[str, ImageService]) -> None:
        self._nodes = nodes

    async def _each_node(self, call: Any) -> list[tuple[str, Any]]:
        """(node, result or the error it raised) of `call(node, service)` for every node, all
        run together."""
        nodes = list(self._nodes.items())
        results = await asyncio.gather(
            *(call(node, service) for node, service in nodes), return_exceptions=True
        )
        for result in results:
            if isinstance(result, BaseException) and not isinstance(result, Exception):
                raise result  # cancellation and the like
        return [(node, result) for (node, _), result in zip(nodes, results, strict=True)]

    @staticmethod
    def _raise_first(results: list[tuple[str, Any]]) -> None:
        for node, result in results:
            if isinstance(result, SandboxRuntimeError) and len(results) > 1:
                error = SandboxRuntimeError(f"node {node[:12]}: {result}")
                error.code = result.code
                raise error from result
            if isinstance(result, Exception):
                raise result

    def _named(self, node: str, image: ImageInfo) -> ImageInfo:
        return image if image.node else dataclasses.replace(image, node=node)

    async def pull(
        self,
        image: str,
        credentials: RegistryCredentials | None = None,
        progress: PullProgressFn | None = None,
    ) -> ImageInfo:
        several = len(self._nodes) > 1

        def reporter(node: str) -> PullProgressFn | None:
            if progress is None or not several:
                return progress
            report = progress

            def labelled(event: ImagePullProgress) -> None:
                message = f"{node[:12]}: {event.message}" if event.message else event.message
                report(dataclasses.replace(event, message=message))

            return labelled

        results = await self._each_node(
            lambda node, service: service.pull(image, credentials, reporter(node))
        )
        self._raise_first(results)
        node, pulled = results[0]
        return self._named(node, pulled)

    async def list_images(self) -> list[ImageInfo]:
        results = await self._each_node(lambda node, service: service.list_images())
        self._raise_first(results)
        return [self._named(node, i) for node, images in results for i in images]

    async def remove(self, image: str) -> ImageInfo:
        """Removes the image from every node that has it; NOT_FOUND when none has."""
        results = await self._each_node(lambda node, service: service.remove(image))
        found = [
            (node, r)
            for node, r in results
            if not (isinstance(r, SandboxRuntimeError) and r.code == "NOT_FOUND")
        ]
        self._raise_first(found or results[:1])
        node, removed = found[0]
        return self._named(node, removed)

    async def prune(self) -> list[ImageInfo]:
        results = await self._each_node(lambda node, service: service.prune())
        self._raise_first(results)
        return [self._named(node, i) for node, images in results for i in images]


class ImageServicer:
    """Implements aviato.v1.ImageService over the image stores of the placement's nodes."""

    def __init__(self, auth: Authenticator, placement: Placement) -> None:
        self._auth = auth
        self._placement = placement

    def _images(self) -> EveryNode:
        """The image services of every node that has one; a clear error when none has."""
        nodes = {
            node: runtime.images
            for node, runtime in self._placement.nodes().items()
            if runtime.images is not None
        }
        if not nodes:
            raise FailedPrecondition("no node of this service keeps an image store")
        return EveryNode(nodes)

    async def _guard(self, context: Ctx) -> None:
        try:
            self._auth.owner_of(context.peer(), context.invocation_metadata())
        except ServiceError as e:
            await errors.abort(context, e)

    async def _fail(self, context: Ctx, exc: BaseException) -> None:
        if isinstance(exc, ServiceError | SandboxRuntimeError):
            await errors.abort(context, exc)
        log.error("image call failed", exc_info=exc)
        await context.abort(grpc.StatusCode.INTERNAL, "internal error (see the server log)")

    async def PullImage(self, request: ipb.PullImageRequest, context: Ctx) -> Any:
        await self._guard(context)
        try:
            if not request.image:
                raise InvalidArgument("image", "is required")
            try:
                parse_reference(request.image)
            except InvalidReference as exc:
                raise InvalidArgument("image", str(exc)) from None
            credentials = validate_registry_auth(request.registry_auth, "registry_auth")
            pulling = pull_with_progress(self._images(), request.image, credentials)
            async for item in pulling:
                if isinstance(item, ImagePullProgress):
                    if item.phase != "done":
                        yield ipb.PullImageProgress(
                            phase=item.phase, digest=item.digest, current=item.current,
                            total=item.total, message=item.message,
                        )  # fmt: skip
                    continue
                yield ipb.PullImageProgress(
                    phase="done", digest=item.digest, message=f"pulled {request.image}",
                    image=image_message(item),
                )  # fmt: skip
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            await self._fail(context, exc)

    async def ListImages(self, request: ipb.ListImagesRequest, context: Ctx) -> Any:
        await self._guard(context)
        try:
            images = await self._images().list_images()
            return ipb.ListImagesResponse(images=[image_message(i) for i in images])
        except Exception as exc:
            await self._fail(context, exc)

    async def RemoveImage(self, request: ipb.RemoveImageRequest, context: Ctx) -> Any:
        await self._guard(context)
        try:
            if not request.image:
                raise InvalidArgument("image", "is required")
            removed = await self._images().remove(request.image)
            return ipb.RemoveImageResponse(image=image_message(removed))
        except Exception as exc:
            await self._fail(context, exc)

    async def PruneImages(self, request: ipb.PruneImagesRequest, context: Ctx) -> Any:
        await self._guard(context)
        try:
            removed = await self._images().prune()
            return ipb.PruneImagesResponse(removed=[image_message(i) for i in removed])
        except Exception as exc:
            await self._fail(context, exc)
