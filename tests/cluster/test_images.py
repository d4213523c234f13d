"""Images under Ray: the image API reaches every node's store through the node protocol.

What "images under Ray" means (server/images_api.py): a pull pulls on every node host, a list
gives the union (each image naming its node), a removal removes from every node that has it.
The registry listens on the cluster's bridge, the address the control plane was started with
as an insecure registry (raycluster.py), and is reached from each node's own namespace.
"""

from __future__ import annotations

import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from images.oci_helpers import (
    Pusher,
    Registry,
    busybox_layer,
    require_image_tools,
    run_registry,
)
from raycluster import WORKERS, RayCluster

from aviato.v1 import images_pb2 as ipb
from aviato.v1 import images_pb2_grpc
from aviato.v1 import sandbox_pb2 as pb
from aviato.v1.sandbox_pb2_grpc import SandboxServiceStub

from .test_cluster import TAG, _create, _wait


@pytest.fixture(scope="module")
def registry(ray_cluster: RayCluster) -> Iterator[Registry]:
    require_image_tools()
    with (
        tempfile.TemporaryDirectory(prefix="avr-registry") as work,
        run_registry(Path(work), address=ray_cluster.registry_address) as registry,
    ):
        yield registry


@pytest.fixture(scope="module")
def images(ray_cluster: RayCluster) -> Iterator[images_pb2_grpc.ImageServiceStub]:
    with grpc.insecure_channel(ray_cluster.base_url) as channel:
        yield images_pb2_grpc.ImageServiceStub(channel)  # type: ignore[no-untyped-call]


def _named(images: images_pb2_grpc.ImageServiceStub, ref: str) -> list[ipb.Image]:
    listed = images.ListImages(ipb.ListImagesRequest(), timeout=30).images
    return [image for image in listed if ref in image.names]


def test_pull_lands_on_every_node_and_remove_leaves_none(
    registry: Registry,
    images: images_pb2_grpc.ImageServiceStub,
    stub: SandboxServiceStub,
) -> None:
    repo = f"t/cluster-{uuid.uuid4().hex[:6]}"
    pushed = Pusher(registry).image(repo, "v1", [busybox_layer()], env=["PATH=/bin"])
    ref = f"{registry.host}/{repo}:v1"

    progress = list(images.PullImage(ipb.PullImageRequest(image=ref), timeout=120))
    assert progress[-1].phase == "done"
    assert progress[-1].image.digest == pushed.digest
    assert progress[-1].image.node

    # The union of the nodes' stores: the image once on each worker (the head runs none).
    held = _named(images, ref)
    assert len(held) == len(WORKERS), held
    assert len({image.node for image in held}) == len(WORKERS)
    assert {image.digest for image in held} == {pushed.digest}

    # Each node uses its own copy: sandboxes pinned to either worker start without a pull.
    gets = registry.blob_gets()
    for worker in WORKERS:
        sb = _create(stub, "/bin/sh", "-c", "echo from-image", image=ref,
                     node_selector={"aviato-test": worker})  # fmt: skip
        done = _wait(stub, sb.id, terminal=True, timeout=60)
        assert (done.status, done.exit_code) == (pb.SANDBOX_STATUS_COMPLETED, 0), done
        kept = stub.StreamLogs(pb.StreamLogsRequest(sandbox_id=sb.id, tail=-1), timeout=30)
        assert b"".join(entry.data for entry in kept) == b"from-image\n"
        stub.DeleteSandbox(pb.DeleteSandboxRequest(sandbox_id=sb.id), timeout=30)
    assert registry.blob_gets() == gets

    removed = images.RemoveImage(ipb.RemoveImageRequest(image=ref), timeout=30).image
    assert removed.digest == pushed.digest
    assert _named(images, ref) == []
    with pytest.raises(grpc.RpcError) as info:
        images.RemoveImage(ipb.RemoveImageRequest(image=ref), timeout=30)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert TAG  # the sandboxes above carry the package's tag (cleaned by its teardown)
