"""The pure rules of server/volumes.py: names, mount paths, host paths, placement, measuring."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from _mounts import unmount_beneath

from aviato.runtime.base import PathRefused
from aviato.runtime.host_mounts import HostMounts
from aviato.runtime.model import DirectoryMount, SandboxConfig
from aviato.runtime.volume_store import VolumeStore, disk_usage
from aviato.server.errors import CapacityExceeded, FailedPrecondition, InvalidArgument, NotFound
from aviato.server.registry import Registry
from aviato.server.volumes import Volumes, validate_mounts


@pytest.fixture(autouse=True)
def _unmount_below(tmp_path: Path) -> Iterator[None]:
    """Sized volumes are mounted filesystems: none stays behind a test, failed or not."""
    yield
    unmount_beneath(tmp_path)


def volumes(tmp_path: Path, placement: str = "local", shared: str = "", **kw: int) -> Volumes:
    registry = Registry(tmp_path / "registry.db")
    return Volumes(
        tmp_path,
        registry.volumes,
        max_bytes=kw.get("max_bytes", 1 << 20),
        owner_max_volumes=kw.get("owner_max_volumes", 2),
        host_mounts=HostMounts([str(tmp_path / "allowed")]),
        placement=placement,
        shared_dir=shared,
    )


def config(*mounts: DirectoryMount) -> SandboxConfig:
    return SandboxConfig(sandbox_id="sbx-1", image="host", command=(), env={}, working_dir="",
                         mounts=mounts)  # fmt: skip


def test_under_ray_a_volume_pins_its_sandboxes_to_its_home_node(tmp_path: Path) -> None:
    vols = volumes(tmp_path, "ray", owner_max_volumes=8)
    plain = config()
    assert vols.resolve("alice", plain) is plain
    first = vols.resolve("alice", config(DirectoryMount("/v", volume="v")))
    assert first.node_selector == () and first.mounts[0].source == ""  # the node makes it
    assert first.mounts[0].volume_key and first.mounts[0].size_bytes == 1 << 20
    vols.settle_homes("alice", first, "node-a")
    again = vols.resolve("alice", config(DirectoryMount("/v", volume="v")))
    assert again.node_selector == (("aviato.node", "node-a"),)
    # bob's volume of the same name is another one, without a home yet
    assert vols.resolve("bob", config(DirectoryMount("/v", volume="v"))).node_selector == ()
    # a first use placed elsewhere at the same time does not make a second copy
    with pytest.raises(FailedPrecondition, match="was made on node node-a by another sandbox"):
        vols.settle_homes("alice", first, "node-b")
    w = vols.resolve("alice", config(DirectoryMount("/w", volume="w")))
    vols.settle_homes("alice", w, "node-b")
    with pytest.raises(FailedPrecondition, match="volume 'v' lives on node node-a and volume"):
        vols.resolve(
            "alice", config(DirectoryMount("/v", volume="v"), DirectoryMount("/w", volume="w"))
        )
    pinned = replace(
        config(DirectoryMount("/v", volume="v")), node_selector=(("aviato.node", "x"),)
    )
    with pytest.raises(FailedPrecondition, match="asks for another node"):
        vols.resolve("alice", pinned)
    # host directories are checked by their text here (on the disk by the node host)
    with pytest.raises(InvalidArgument, match="not under a directory the operator allows"):
        vols.resolve("alice", config(DirectoryMount("/d", host_path="/etc")))
    ok = vols.resolve("alice", config(DirectoryMount("/d", host_path=str(tmp_path / "allowed/x"))))
    assert ok.mounts[0].source == ""


def test_owners_get_distinct_directories_and_a_bounded_count(tmp_path: Path) -> None:
    vols = volumes(tmp_path)
    a = vols.resolve("alice", config(DirectoryMount("/v", volume="v"))).mounts[0].source
    b = vols.resolve("bob", config(DirectoryMount("/v", volume="v"))).mounts[0].source
    assert a != b and Path(a).is_dir() and Path(b).is_dir()
    assert "alice" not in a and "bob" not in b  # the owner's name is never a path
    vols.resolve("alice", config(DirectoryMount("/w", volume="w")))
    with pytest.raises(CapacityExceeded, match="quota of 2 volumes"):
        vols.resolve("alice", config(DirectoryMount("/x", volume="x")))
    with pytest.raises(NotFound):
        asyncio.run(vols.delete("bob", "w", []))
    with pytest.raises(FailedPrecondition, match="in use by sandbox sbx-9"):
        asyncio.run(vols.delete("alice", "v", ["sbx-9"]))
    for owner, name in (("alice", "v"), ("alice", "w"), ("bob", "v")):
        asyncio.run(vols.delete(owner, name, []))
    assert not Path(a).exists()


def test_measuring_follows_no_symlink(tmp_path: Path) -> None:
    big = tmp_path / "big"
    big.write_bytes(os.urandom(1 << 20))
    inside = tmp_path / "vol"
    inside.mkdir()
    os.symlink(big, inside / "link")
    os.symlink(tmp_path, inside / "loop")
    assert disk_usage(inside) < 64 * 1024


def test_mount_paths_and_names() -> None:
    ok = validate_mounts([("/a", "cache", "", False, 5), ("/b", "", "/data", False, 0)], "m")
    assert ok[1].read_only  # host directories are read-only whatever was asked
    assert ok[0].size_bytes == 5  # its bounds are the service's to judge
    for items, words in (
        ([("/a", "c", "", False, 0), ("/a", "d", "", False, 0)], "mounted twice"),
        ([("/a", "c", "", False, 0), ("/a/b", "d", "", False, 0)], "inside another"),
        ([("/a", "c", "/d", False, 0)], "exactly one"),
        ([("/a", "", "rel", False, 0)], "absolute"),
        ([("/sys/x", "c", "", False, 0)], "reserved"),
        ([("/.aviato", "c", "", False, 0)], "reserved"),
        ([("/a", "c", "", False, -1)], "cannot be negative"),
        ([("/a", "", "/d", False, 9)], "a host directory has no size"),
    ):
        with pytest.raises(InvalidArgument, match=words):
            validate_mounts(items, "m")


def test_host_paths(tmp_path: Path) -> None:
    allowed = tmp_path / "allowed"
    (allowed / "ds").mkdir(parents=True)
    (tmp_path / "allowed-not").mkdir()
    os.symlink(tmp_path, allowed / "up")
    os.symlink(allowed / "ds", allowed / "alias")
    hosts = HostMounts([str(allowed)])
    assert hosts.resolve(str(allowed / "alias")) == str(allowed / "ds")
    with pytest.raises(PathRefused, match="leads through a symlink"):
        hosts.resolve(str(allowed / "up"))
    with pytest.raises(PathRefused, match="not under"):  # a prefix is not a parent
        hosts.resolve(str(tmp_path / "allowed-not"))
    with pytest.raises(PathRefused, match="allows no host directories"):
        HostMounts([]).resolve(str(allowed))


def test_what_a_killed_service_left_is_cleared_and_a_made_image_is_mounted_again(
    tmp_path: Path,
) -> None:
    """Killed mid-format: the half-made image (a temporary name) is removed at the next start;
    killed after the image was made but before it was mounted (or after a reboot): the next
    use mounts it, with its files."""
    store = VolumeStore(tmp_path)
    key = "b" * 32
    source = Path(store.ensure(key, "v", 2 << 20))
    (source / "kept").write_text("yes")
    store.unmount_all()  # as a reboot would
    half = tmp_path / "volume-images" / key / ".w.img.123.tmp"
    half.write_bytes(b"x" * 100)
    store.clear_trash()
    assert not half.exists()
    again = Path(store.ensure(key, "v", 2 << 20))
    assert again == source and (again / "kept").read_text() == "yes"
    assert store.kind(key, "v") == "sized" and store.kind(key, "w") == ""
    store.delete(key, "v")
    assert store.kind(key, "v") == "" and not source.exists()


def test_with_a_shared_volume_directory_new_volumes_have_no_home(tmp_path: Path) -> None:
    vols = volumes(tmp_path, "ray", shared=str(tmp_path / "shared"), owner_max_volumes=8)
    homed = volumes(tmp_path, "ray", owner_max_volumes=8)  # as before --ray-volume-dir
    old = homed.resolve("alice", config(DirectoryMount("/o", volume="old")))
    homed.settle_homes("alice", old, "node-a")
    made = vols.resolve("alice", config(DirectoryMount("/v", volume="v")))
    source = Path(made.mounts[0].source)
    assert source.is_dir() and source.is_relative_to(tmp_path / "shared" / "volumes")
    assert made.node_selector == () and made.mounts[0].size_bytes == 0
    vols.settle_homes("alice", made, "node-b")  # placed anywhere: it stays homeless
    again = vols.resolve("alice", config(DirectoryMount("/v", volume="v")))
    assert again.node_selector == () and again.mounts[0].source == str(source)
    # a volume made before keeps its home
    pinned = vols.resolve("alice", config(DirectoryMount("/o", volume="old")))
    assert pinned.node_selector == (("aviato.node", "node-a"),)
    with pytest.raises(InvalidArgument, match="keeps volumes in a shared directory"):
        vols.resolve("alice", config(DirectoryMount("/s", volume="s", size_bytes=1 << 20)))
    [listed] = [v for v in asyncio.run(vols.of_owner("alice", {})) if v.name == "v"]
    assert listed.node == "" and not listed.size_enforced
    with pytest.raises(FailedPrecondition, match="which this service no longer has"):
        homed.resolve("alice", config(DirectoryMount("/v", volume="v")))
    asyncio.run(vols.delete("alice", "v", []))
    assert not source.exists()
