"""The pure rules of server/volumes.py: names, mount paths, host paths, placement, measuring."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from aviato.runtime.model import DirectoryMount, SandboxConfig
from aviato.server.errors import CapacityExceeded, FailedPrecondition, InvalidArgument, NotFound
from aviato.server.registry import Registry
from aviato.server.volumes import HostMounts, Volumes, disk_usage, validate_mounts


def volumes(tmp_path: Path, placement: str = "local", **kw: int) -> Volumes:
    registry = Registry(tmp_path / "registry.db")
    return Volumes(
        tmp_path,
        registry.volumes,
        max_bytes=kw.get("max_bytes", 1 << 20),
        owner_max_volumes=kw.get("owner_max_volumes", 2),
        host_mounts=HostMounts([str(tmp_path / "allowed")]),
        placement=placement,
    )


def config(*mounts: DirectoryMount) -> SandboxConfig:
    return SandboxConfig(sandbox_id="sbx-1", image="host", command=(), env={}, working_dir="",
                         mounts=mounts)  # fmt: skip


def test_a_ray_placement_refuses_mounts_in_words(tmp_path: Path) -> None:
    with pytest.raises(FailedPrecondition, match="cannot reach a sandbox placed by 'ray'"):
        volumes(tmp_path, "ray").resolve("alice", config(DirectoryMount("/v", volume="v")))
    plain = config()
    assert volumes(tmp_path, "ray").resolve("alice", plain) is plain


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
        vols.delete("bob", "w", [])
    with pytest.raises(FailedPrecondition, match="in use by sandbox sbx-9"):
        vols.delete("alice", "v", ["sbx-9"])


def test_measuring_follows_no_symlink(tmp_path: Path) -> None:
    big = tmp_path / "big"
    big.write_bytes(os.urandom(1 << 20))
    inside = tmp_path / "vol"
    inside.mkdir()
    os.symlink(big, inside / "link")
    os.symlink(tmp_path, inside / "loop")
    assert disk_usage(inside) < 64 * 1024


def test_mount_paths_and_names() -> None:
    ok = validate_mounts([("/a", "cache", "", False), ("/b", "", "/data", False)], "m")
    assert ok[1].read_only  # host directories are read-only whatever was asked
    for items, words in (
        ([("/a", "c", "", False), ("/a", "d", "", False)], "mounted twice"),
        ([("/a", "c", "", False), ("/a/b", "d", "", False)], "inside another"),
        ([("/a", "c", "/d", False)], "exactly one"),
        ([("/a", "", "rel", False)], "absolute"),
        ([("/sys/x", "c", "", False)], "reserved"),
        ([("/.aviato", "c", "", False)], "reserved"),
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
    assert hosts.resolve(str(allowed / "alias"), "f") == str(allowed / "ds")
    with pytest.raises(InvalidArgument, match="leads through a symlink"):
        hosts.resolve(str(allowed / "up"), "f")
    with pytest.raises(InvalidArgument, match="not under"):  # a prefix is not a parent
        hosts.resolve(str(tmp_path / "allowed-not"), "f")
    with pytest.raises(InvalidArgument, match="allows no host directories"):
        HostMounts([]).resolve(str(allowed), "f")
