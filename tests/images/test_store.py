"""The image store against a real registry: pulls, verification, auth, platforms, sharing, GC."""

from __future__ import annotations

import asyncio
import base64
import json
import os
from pathlib import Path

import pytest
from oci_helpers import (
    LOCAL,
    Entry,
    Pusher,
    Registry,
    busybox_layer,
    layer,
    require_image_tools,
    run_registry,
)

from aviato.images.errors import DigestMismatch, ImageNotPresent, RegistryDenied
from aviato.images.registry_client import host_platform
from aviato.images.store import ImageInUse, ImageStore, PullProgress
from aviato.runtime.base import RegistryCredentials


@pytest.mark.slow
def test_pull_unpacks_and_records(registry: Registry, pusher: Pusher, workdir: Path) -> None:
    pushed = pusher.image("t/bb", "v1", [busybox_layer(), layer([Entry("app", kind="dir"),
                          Entry("app/hello", data=b"hi")])], working_dir="/srv/w")  # fmt: skip
    store = ImageStore(workdir / "images", insecure_registries=LOCAL)
    events: list[PullProgress] = []
    image = asyncio.run(store.pull(f"{registry.host}/t/bb:v1", progress=events.append))
    assert image.digest == pushed.digest
    assert image.names == (f"{registry.host}/t/bb:v1",)
    assert (image.rootfs / "app/hello").read_bytes() == b"hi"
    assert (image.rootfs / "bin/busybox").stat().st_size > 100_000
    assert (image.rootfs / "srv/w").is_dir()  # WorkingDir exists even if no layer made it
    assert {e.phase for e in events} >= {"resolving", "downloading", "unpacking", "done"}
    for digest in pushed.layers:
        assert (workdir / "images/blobs/sha256" / digest.split(":")[1]).exists()
    # A second store object sees it (refs.json), and a re-pull downloads no blob again.
    again = ImageStore(workdir / "images", insecure_registries=LOCAL)
    assert again.find(f"{registry.host}/t/bb:v1") == image
    gets = registry.blob_gets()
    asyncio.run(again.pull(f"{registry.host}/t/bb:v1"))
    assert registry.blob_gets() == gets and again.blob_downloads == 0 and again.unpacks == 0
    # By digest too.
    assert again.find(f"{registry.host}/t/bb@{pushed.digest}") is not None


@pytest.mark.slow
def test_docker_v2_manifest(registry: Registry, pusher: Pusher, workdir: Path) -> None:
    pushed = pusher.image("t/docker", "v1", [busybox_layer()], docker=True)
    image = asyncio.run(
        ImageStore(workdir / "images", insecure_registries=LOCAL).pull(
            f"{registry.host}/t/docker:v1"
        )
    )
    assert image.digest == pushed.digest and (image.rootfs / "bin/sh").is_symlink()


@pytest.mark.slow
def test_ten_concurrent_first_uses_pull_once(
    registry: Registry, pusher: Pusher, workdir: Path
) -> None:
    pushed = pusher.image("t/bb", "v1", [busybox_layer()])
    store = ImageStore(workdir / "images", insecure_registries=LOCAL)
    ref = f"{registry.host}/t/bb:v1"

    async def main() -> list[str]:
        got = await asyncio.gather(*(store.ensure(ref) for _ in range(10)))
        return [i.digest for i in got]

    assert asyncio.run(main()) == [pushed.digest] * 10
    assert store.blob_downloads == 1 and store.unpacks == 1
    assert registry.blob_gets(pushed.layers[0]) == 1


def test_corrupted_blob_refused_and_not_kept(
    registry: Registry, pusher: Pusher, workdir: Path
) -> None:
    pushed = pusher.image("t/bad", "v1", [busybox_layer()])
    data = registry.blob_path(pushed.layers[0])
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # same size, different content
    data.write_bytes(bytes(raw))
    store = ImageStore(workdir / "images", insecure_registries=LOCAL)
    with pytest.raises(DigestMismatch, match=pushed.layers[0]):
        asyncio.run(store.pull(f"{registry.host}/t/bad:v1"))
    hexd = pushed.layers[0].split(":")[1]
    assert not (workdir / "images/blobs/sha256" / hexd).exists()
    assert list((workdir / "images/tmp").iterdir()) == []
    assert store.list_images() == []


@pytest.mark.slow
def test_multi_arch_index_picks_this_machine(
    registry: Registry, pusher: Pusher, workdir: Path
) -> None:
    _, arch, _ = host_platform()
    other = "arm64" if arch != "arm64" else "amd64"
    mine = pusher.image("t/multi", "mine", [busybox_layer()], env=[f"ARCH={arch}"], arch=arch)
    theirs = pusher.image("t/multi", "theirs", [busybox_layer([Entry("other", data=b"o")])],
                          env=[f"ARCH={other}"], arch=other)  # fmt: skip
    index = pusher.index("t/multi", "v1", [(theirs, "linux", other), (mine, "linux", arch)])
    store = ImageStore(workdir / "images", insecure_registries=LOCAL)
    image = asyncio.run(store.pull(f"{registry.host}/t/multi:v1"))
    assert image.digest == mine.digest
    assert ("ARCH", arch) in image.config.env
    assert not (image.rootfs / "other").exists()
    # An index without this platform is refused naming what it offers.
    pusher.index("t/multi", "none", [(theirs, "linux", other)])
    with pytest.raises(ImageNotPresent, match=f"linux/{other}"):
        asyncio.run(store.pull(f"{registry.host}/t/multi:none"))
    assert index.startswith("sha256:")


def test_missing_image_and_tag(registry: Registry, pusher: Pusher, workdir: Path) -> None:
    pusher.image("t/bb", "v1", [busybox_layer()])
    store = ImageStore(workdir / "images", insecure_registries=LOCAL)
    with pytest.raises(ImageNotPresent):
        asyncio.run(store.pull(f"{registry.host}/t/bb:nope"))
    with pytest.raises(ImageNotPresent):
        asyncio.run(store.pull(f"{registry.host}/t/none:v1"))


@pytest.mark.slow
def test_basic_auth(workdir: Path) -> None:
    require_image_tools()
    with run_registry(workdir / "reg", htpasswd=("alice", "s3cret")) as reg:
        pusher = Pusher(reg)
        pushed = pusher.image("t/private", "v1", [busybox_layer()])
        ref = f"{reg.host}/t/private:v1"
        store = ImageStore(
            workdir / "images", insecure_registries=LOCAL, docker_config=workdir / "none.json"
        )
        with pytest.raises(RegistryDenied, match="requires a login"):
            asyncio.run(store.pull(ref))
        with pytest.raises(RegistryDenied):
            asyncio.run(store.pull(ref, RegistryCredentials("alice", "wrong")))
        image = asyncio.run(store.pull(ref, RegistryCredentials("alice", "s3cret")))
        assert image.digest == pushed.digest
        # From a Docker config file's `auths`.
        config = workdir / "docker.json"
        token = base64.b64encode(b"alice:s3cret").decode()
        config.write_text(json.dumps({"auths": {reg.host: {"auth": token}}}))
        other = ImageStore(workdir / "images2", insecure_registries=LOCAL, docker_config=config)
        assert asyncio.run(other.pull(ref)).digest == pushed.digest


@pytest.mark.slow
def test_remove_and_prune_keep_images_in_use(
    registry: Registry, pusher: Pusher, workdir: Path
) -> None:
    a = pusher.image("t/a", "v1", [busybox_layer()])
    b = pusher.image("t/b", "v1", [busybox_layer([Entry("b", data=b"b")])])
    store = ImageStore(workdir / "images", insecure_registries=LOCAL)
    asyncio.run(store.pull(f"{registry.host}/t/a:v1"))
    asyncio.run(store.pull(f"{registry.host}/t/b:v1"))
    used = {a.digest}
    store.in_use = lambda: used
    with pytest.raises(ImageInUse):
        store.remove(f"{registry.host}/t/a:v1")
    removed = store.prune()
    assert [i.digest for i in removed] == [b.digest]
    assert [i.digest for i in store.list_images()] == [a.digest]
    blobs = {p.name for p in (workdir / "images/blobs/sha256").iterdir()}
    assert a.layers[0].split(":")[1] in blobs and b.layers[0].split(":")[1] not in blobs
    used = set()
    assert store.remove(a.digest).digest == a.digest
    assert store.list_images() == [] and os.listdir(workdir / "images/roots") == []
    assert os.listdir(workdir / "images/blobs/sha256") == []


@pytest.mark.slow
def test_bearer_token_auth(registry: Registry, pusher: Pusher, workdir: Path) -> None:
    from oci_helpers import bearer_front

    pushed = pusher.image("t/tok", "v1", [busybox_layer()])
    with bearer_front(registry, "carol", "pw") as front:
        ref = f"{front}/t/tok:v1"
        store = ImageStore(
            workdir / "images", insecure_registries=LOCAL, docker_config=workdir / "none.json"
        )
        with pytest.raises(RegistryDenied, match="refused"):
            asyncio.run(store.pull(ref, RegistryCredentials("carol", "wrong")))
        image = asyncio.run(store.pull(ref, RegistryCredentials("carol", "pw")))
        assert image.digest == pushed.digest
        assert (image.rootfs / "bin/busybox").exists()


@pytest.mark.slow
def test_a_private_image_in_the_store_needs_access_on_every_use(workdir: Path) -> None:
    with run_registry(workdir / "private", htpasswd=("u", "pw")) as reg:
        pusher = Pusher(reg)
        pusher.image("t/priv", "v1", [busybox_layer()])
        ref = f"{reg.host}/t/priv:v1"
        good = RegistryCredentials(username="u", password="pw")
        store = ImageStore(workdir / "images", insecure_registries=LOCAL)
        image = asyncio.run(store.ensure(ref, good))
        assert store.is_private(image)
        store = ImageStore(
            workdir / "images", insecure_registries=LOCAL
        )  # the flag survives a restart
        assert store.is_private(image)
        gets = reg.blob_gets()
        for wrong in (None, RegistryCredentials(username="u", password="no")):
            with pytest.raises(RegistryDenied, match="image_pull_credentials"):
                asyncio.run(store.ensure(ref, wrong))
        assert asyncio.run(store.ensure(ref, good)) == image
        assert reg.blob_gets() == gets and store.blob_downloads == 0
    # A public image is used from the store offline.
    with run_registry(workdir / "open") as reg:
        Pusher(reg).image("t/pub", "v1", [busybox_layer()], env=["WHO=pub"])
        public = f"{reg.host}/t/pub:v1"
        public_image = asyncio.run(store.ensure(public))
        digest = public_image.digest
    assert not store.is_private(public_image) and digest != image.digest
    assert asyncio.run(store.ensure(public)).digest == digest
