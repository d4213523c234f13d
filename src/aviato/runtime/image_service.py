"""`StoreImages`: a node's OCI image store (`aviato.images.store.ImageStore`) as the runtime
interface's `ImageService`, in the interface's own model (`ImageInfo`, `ImagePullProgress`).

The store's blocking calls (list, remove, prune) touch only its directory and are quick; they
run on the event loop as they did before this interface existed.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from aviato.images.store import ImageStore, PullProgress, StoredImage
from aviato.runtime.base import (
    ImageInfo,
    ImagePullProgress,
    ImageService,
    PullProgressFn,
    RegistryCredentials,
)

__all__ = ["StoreImages", "image_info", "pull_with_progress"]


def image_info(image: StoredImage, in_use: set[str]) -> ImageInfo:
    return ImageInfo(
        names=tuple(image.names),
        digest=image.digest,
        size=image.size,
        pulled_ns=image.pulled_ns,
        in_use=image.digest in in_use,
    )


def _progress(event: PullProgress) -> ImagePullProgress:
    return ImagePullProgress(
        phase=event.phase,
        digest=event.digest,
        current=event.current,
        total=event.total,
        message=event.message,
    )


class StoreImages(ImageService):
    """The image service of a local runtime, over its store."""

    def __init__(self, store: ImageStore) -> None:
        self._store = store

    async def pull(
        self,
        image: str,
        credentials: RegistryCredentials | None = None,
        progress: PullProgressFn | None = None,
    ) -> ImageInfo:
        report = None if progress is None else (lambda event: progress(_progress(event)))
        stored = await self._store.pull(image, credentials, report)
        return image_info(stored, self._store.in_use())

    async def list_images(self) -> list[ImageInfo]:
        in_use = self._store.in_use()
        return [image_info(image, in_use) for image in self._store.list_images()]

    async def remove(self, image: str) -> ImageInfo:
        return image_info(self._store.remove(image), set())

    async def prune(self) -> list[ImageInfo]:
        return [image_info(image, set()) for image in self._store.prune()]


async def pull_with_progress(
    service: ImageService, image: str, credentials: RegistryCredentials | None = None
) -> AsyncIterator[ImagePullProgress | ImageInfo]:
    """Pulls `image`, yielding its progress as it comes and then the pulled image; the pull's
    error is raised after the progress before it. Closing the iterator cancels the pull."""
    queue: asyncio.Queue[ImagePullProgress] = asyncio.Queue()
    pull = asyncio.ensure_future(service.pull(image, credentials, queue.put_nowait))
    try:
        while not pull.done() or not queue.empty():
            if queue.empty():
                getter = asyncio.ensure_future(queue.get())
                await asyncio.wait({pull, getter}, return_when=asyncio.FIRST_COMPLETED)
                if not getter.done():
                    getter.cancel()
                    continue
                yield getter.result()
            else:
                yield queue.get_nowait()
        yield pull.result()
    finally:
        if not pull.done():
            pull.cancel()
