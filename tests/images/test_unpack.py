"""Applying layers: whiteouts, links through earlier layers, and hostile entries contained."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from oci_helpers import Entry, layer

from aviato.images import beneath
from aviato.images.unpack import UnsafeLayer, apply_layer


def apply(tmp_path: Path, root: Path, entries: list[Entry], name: str = "l") -> str:
    blob, diff_id = layer(entries)
    path = tmp_path / f"{name}.tar.gz"
    path.write_bytes(blob)
    assert apply_layer(path, root) == diff_id  # the diff id is the uncompressed tar's digest
    return diff_id


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "rootfs"
    r.mkdir()
    return r


def test_whiteouts_and_opaque_directories(tmp_path: Path, root: Path) -> None:
    apply(tmp_path, root, [
        Entry("a", kind="dir"), Entry("a/keep", data=b"1"), Entry("a/gone", data=b"2"),
        Entry("b", kind="dir"), Entry("b/old1", data=b"3"), Entry("b/sub", kind="dir"),
        Entry("b/sub/old2", data=b"4"), Entry("c", kind="dir"), Entry("c/x", data=b"5"),
    ], "l1")  # fmt: skip
    apply(tmp_path, root, [
        Entry("a/.wh.gone", data=b""),
        Entry("b/new", data=b"6"),          # before the opaque marker: this layer's, kept
        Entry("b/.wh..wh..opq", data=b""),
        Entry("b/new2", data=b"7"),
        Entry(".wh.c", data=b""),
    ], "l2")  # fmt: skip
    assert (root / "a/keep").read_bytes() == b"1"
    assert not (root / "a/gone").exists()
    assert sorted(os.listdir(root / "b")) == ["new", "new2"]
    assert not (root / "c").exists()
    assert not any(n.startswith(".wh.") for _, _, fs in os.walk(root) for n in fs)


def test_file_replaced_by_directory_and_back(tmp_path: Path, root: Path) -> None:
    apply(tmp_path, root, [Entry("x", data=b"file")], "l1")
    apply(tmp_path, root, [Entry("x", kind="dir"), Entry("x/y", data=b"in")], "l2")
    assert (root / "x/y").read_bytes() == b"in"
    apply(tmp_path, root, [Entry("x", data=b"again")], "l3")
    assert (root / "x").read_bytes() == b"again"


def test_paths_through_symlinks_of_earlier_layers_stay_inside(tmp_path: Path, root: Path) -> None:
    # usr-merged layout: /lib -> usr/lib; a later layer writes lib/foo
    apply(tmp_path, root, [Entry("usr", kind="dir"), Entry("usr/lib", kind="dir"),
                           Entry("lib", kind="symlink", link="usr/lib")], "l1")  # fmt: skip
    apply(tmp_path, root, [Entry("lib/foo", data=b"so")], "l2")
    assert (root / "usr/lib/foo").read_bytes() == b"so"


def test_symlink_escapes_are_contained(tmp_path: Path, root: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    # Absolute and climbing symlinks to host places; then files written "through" them.
    apply(tmp_path, root, [
        Entry("evil", kind="symlink", link=str(outside)),
        Entry("up", kind="symlink", link="../../../../../../" + str(outside).lstrip("/")),
        Entry("etcp", kind="symlink", link="/etc/passwd"),
    ], "l1")  # fmt: skip
    apply(tmp_path, root, [
        Entry("evil/pwned", data=b"x"),
        Entry("up/pwned2", data=b"y"),
        Entry("etcp", data=b"replaced"),  # replaces the link itself, never the host file
    ], "l2")  # fmt: skip
    assert list(outside.iterdir()) == []
    inside = root / str(outside).lstrip("/")
    assert (inside / "pwned").read_bytes() == b"x"
    assert (inside / "pwned2").read_bytes() == b"y"
    assert (root / "etcp").read_bytes() == b"replaced"
    assert Path("/etc/passwd").read_bytes() != b"replaced"


def test_hard_link_to_host_file_is_contained(tmp_path: Path, root: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_bytes(b"host secret")
    with pytest.raises(UnsafeLayer):
        apply(tmp_path, root, [Entry("h", kind="hardlink", hardlink=str(secret).lstrip("/"))])
    apply(tmp_path, root, [Entry("real", data=b"r"), Entry("h2", kind="hardlink",
                                                            hardlink="real")], "l2")  # fmt: skip
    assert os.stat(root / "h2").st_ino == os.stat(root / "real").st_ino


@pytest.mark.parametrize("name", ["../escape", "/abs/file", "a/../../escape"])
def test_absolute_and_climbing_names_refused(tmp_path: Path, root: Path, name: str) -> None:
    with pytest.raises(UnsafeLayer, match=r"absolute|climbs"):
        apply(tmp_path, root, [Entry(name, data=b"x")])
    assert not (tmp_path / "escape").exists()


def test_device_nodes_skipped(tmp_path: Path, root: Path) -> None:
    apply(tmp_path, root, [Entry("dev", kind="dir"), Entry("dev/null", kind="chardev"),
                           Entry("f", data=b"ok")])  # fmt: skip
    assert not (root / "dev/null").exists() and (root / "f").exists()


def test_resolve_in_root_clamps(tmp_path: Path, root: Path) -> None:
    # Was resolve_in_root (a path string); paths are now resolved into directory descriptors.
    os.symlink("/", root / "top")
    os.symlink("loop2", root / "loop1")
    os.symlink("loop1", root / "loop2")
    fd = beneath.open_root(root)
    try:
        at, name = beneath.locate(fd, "top/../../etc")
        with at:
            assert (at.parts, name) == ((), "etc")  # i.e. root / "etc"
        with pytest.raises(UnsafeLayer, match="levels"):
            beneath.locate(fd, "loop1/x")
    finally:
        os.close(fd)
