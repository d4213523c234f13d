"""What an image call means on a service of several nodes (server/images_api.py's EveryNode).

Pure logic over in-memory image services; the real thing runs in tests/cluster/test_images.py.
"""

from __future__ import annotations

import asyncio

import pytest

from aviato.runtime.base import (
    ImageInfo,
    ImagePullProgress,
    ImageService,
    PullProgressFn,
    RegistryCredentials,
    SandboxRuntimeError,
)
from aviato.server.images_api import EveryNode


class Missing(SandboxRuntimeError):
    code = "NOT_FOUND"


class InUse(SandboxRuntimeError):
    code = "FAILED_PRECONDITION"


class Store(ImageService):
    def __init__(self, names: set[str], in_use: set[str] | None = None) -> None:
        self.names = set(names)
        self.in_use = set(in_use or ())

    def _info(self, name: str) -> ImageInfo:
        return ImageInfo(names=(name,), digest=f"sha256:{name}", size=1, pulled_ns=1)

    async def pull(
        self,
        image: str,
        credentials: RegistryCredentials | None = None,
        progress: PullProgressFn | None = None,
    ) -> ImageInfo:
        if progress is not None:
            progress(ImagePullProgress("resolving", message=f"resolving {image}"))
        self.names.add(image)
        return self._info(image)

    async def list_images(self) -> list[ImageInfo]:
        return [self._info(n) for n in sorted(self.names)]

    async def remove(self, image: str) -> ImageInfo:
        if image not in self.names:
            raise Missing(f"image {image!r} is not in this node's store")
        if image in self.in_use:
            raise InUse(f"image {image!r} is used by a sandbox of this node")
        self.names.discard(image)
        return self._info(image)

    async def prune(self) -> list[ImageInfo]:
        gone = [self._info(n) for n in sorted(self.names - self.in_use)]
        self.names &= self.in_use
        return gone


def test_pull_everywhere_with_progress_naming_the_node() -> None:
    a, b = Store(set()), Store(set())
    seen: list[str] = []
    pulled = asyncio.run(
        EveryNode({"node-a": a, "node-b": b}).pull("x", progress=lambda e: seen.append(e.message))
    )
    assert a.names == b.names == {"x"}
    assert pulled.node == "node-a"
    assert sorted(seen) == ["node-a: resolving x", "node-b: resolving x"]


def test_list_is_the_union_naming_nodes() -> None:
    listed = asyncio.run(EveryNode({"a": Store({"x"}), "b": Store({"x", "y"})}).list_images())
    assert sorted((i.node, i.names[0]) for i in listed) == [("a", "x"), ("b", "x"), ("b", "y")]


def test_remove_where_present_and_not_found_where_nowhere() -> None:
    a, b = Store({"x"}), Store(set())
    removed = asyncio.run(EveryNode({"a": a, "b": b}).remove("x"))
    assert (removed.node, a.names) == ("a", set())
    with pytest.raises(SandboxRuntimeError) as info:
        asyncio.run(EveryNode({"a": a, "b": b}).remove("x"))
    assert info.value.code == "NOT_FOUND"


def test_an_image_in_use_on_one_node_is_refused_naming_it() -> None:
    a, b = Store({"x"}), Store({"x"}, in_use={"x"})
    with pytest.raises(SandboxRuntimeError) as info:
        asyncio.run(EveryNode({"node-a": a, "node-b": b}).remove("x"))
    assert info.value.code == "FAILED_PRECONDITION"
    assert "node-b" in str(info.value) and "used by a sandbox" in str(info.value)
    assert a.names == set()  # removed where it could be


def test_one_node_errors_keep_their_own_words() -> None:
    with pytest.raises(Missing) as info:
        asyncio.run(EveryNode({"only": Store(set())}).remove("x"))
    assert str(info.value) == "image 'x' is not in this node's store"
