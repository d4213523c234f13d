"""`NodeImages`: the image store of a node host, as the runtime interface's `ImageService`.

Each call is an actor call of the node host (`pull_image` streams its progress), in the node
protocol's messages; the images it returns name their node (the Ray node id). What an image
operation means for the whole cluster (pull on every node, list the union, ...) is decided
above the runtimes, by the image API (server/images_api.py).
"""

from __future__ import annotations

import dataclasses

from aviato.cluster import codec
from aviato.cluster.link import NodeLink
from aviato.node.v1 import node_pb2 as npb
from aviato.runtime.base import (
    ImageInfo,
    ImageService,
    PullProgressFn,
    RegistryCredentials,
    SandboxRuntimeError,
)

__all__ = ["NodeImages"]


class NodeImages(ImageService):
    def __init__(self, link: NodeLink) -> None:
        self._link = link

    def _named(self, message: npb.ImageInfo) -> ImageInfo:
        return dataclasses.replace(codec.decode_image(message), node=self._link.node_id)

    async def pull(
        self,
        image: str,
        credentials: RegistryCredentials | None = None,
        progress: PullProgressFn | None = None,
    ) -> ImageInfo:
        request = npb.PullImageRequest(image=image)
        if credentials is not None:
            request.credentials.CopyFrom(codec.encode_credentials(credentials))
        pulled: ImageInfo | None = None
        async for item in self._link.stream("pull_image", request.SerializeToString()):
            event = npb.PullImageEvent.FromString(item)
            if event.HasField("progress") and progress is not None:
                progress(codec.decode_progress(event.progress))
            elif event.HasField("image"):
                pulled = self._named(event.image)
        if pulled is None:
            raise SandboxRuntimeError(f"pull {image}: the node host sent no image")
        return pulled

    async def list_images(self) -> list[ImageInfo]:
        found = npb.ImageList.FromString(await self._link.call("list_images"))
        return [self._named(image) for image in found.images]

    async def remove(self, image: str) -> ImageInfo:
        return self._named(npb.ImageInfo.FromString(await self._link.call("remove_image", image)))

    async def prune(self) -> list[ImageInfo]:
        removed = npb.ImageList.FromString(await self._link.call("prune_images"))
        return [self._named(image) for image in removed.images]
