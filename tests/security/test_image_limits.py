"""Decompression bombs and disk: what one pull may unpack is bounded, and so is the disk it uses.

A real service with small bounds (`--max-image-size`, `--max-image-files`, `--min-free-disk`)
pulls bombs from a real registry on 127.0.0.1: a few KiB of gzip that expand to more than the
bound, a layer of many empty files, and images too large for the free disk above the floor. For
the disk, the state directory is on a tmpfs of 64 MiB made by the test, so that what is free is
exact whatever else the machine does.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from .image_support import Entry, Lab, lab, layer, zeros_layer

BOUND = "4Mi"


def _file_header(name: str, size: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mode = 0o644
    return info.tobuf(tarfile.USTAR_FORMAT)


def _leftovers(env: Lab) -> list[str]:
    """What a refused pull left in the store: tmp entries and unpacked roots."""
    return env.tmp_entries() + sorted(os.listdir(env.store / "roots"))


@pytest.fixture(scope="module")
def bounded() -> Iterator[Lab]:
    with lab("--max-image-size", BOUND, "--max-image-files", "1000") as env:
        yield env


@pytest.mark.slow
def test_a_gzip_bomb_is_refused_with_the_image_and_the_bound(bounded: Lab) -> None:
    blob, diff_id = zeros_layer(_file_header("bomb", 64 << 20), 64 << 20)
    assert len(blob) < 80 << 10  # a few KiB to 64 KiB of gzip, 64 MiB unpacked
    ref = bounded.push("bomb/zeros", [(blob, diff_id)])
    ok, detail = bounded.pull(ref)
    assert not ok
    assert ref in detail and "4.0 MiB" in detail and "--max-image-size" in detail, detail
    assert detail.startswith("RESOURCE_EXHAUSTED"), detail
    assert _leftovers(bounded) == []
    layer_blob = bounded.store / "blobs/sha256" / diff_id.split(":")[1]
    assert not layer_blob.exists()


def test_bytes_after_the_end_of_the_archive_count_too(bounded: Lab) -> None:
    """The diff id hashes the whole stream: zeros after the tar's end are read, and charged."""
    blob, diff_id = zeros_layer(b"", 64 << 20)  # an empty archive followed by 64 MiB of zeros
    ref = bounded.push("bomb/trailing", [(blob, diff_id)])
    ok, detail = bounded.pull(ref)
    assert not ok and "--max-image-size" in detail, detail
    assert _leftovers(bounded) == []


def test_too_many_entries_are_refused(bounded: Lab) -> None:
    ref = bounded.push("bomb/inodes", [layer([Entry(f"f{i}") for i in range(1500)])])
    ok, detail = bounded.pull(ref)
    assert not ok and ref in detail and "1000" in detail and "--max-image-files" in detail, detail
    assert _leftovers(bounded) == []


def test_a_compressed_size_over_the_bound_is_refused_before_downloading(bounded: Lab) -> None:
    big = layer([Entry("noise", data=os.urandom(6 << 20))])
    ref = bounded.push("bomb/declared", [big])
    gets = bounded.registry.blob_gets()
    ok, detail = bounded.pull(ref)
    assert not ok and "compressed" in detail and "--max-image-size" in detail, detail
    assert bounded.registry.blob_gets() == gets  # no layer was downloaded


def test_an_image_within_the_bounds_is_pulled(bounded: Lab) -> None:
    ref = bounded.push("bomb/fine", [layer([Entry(f"f{i}", data=b"x") for i in range(100)])])
    ok, detail = bounded.pull(ref)
    assert ok, detail


# --- the free-disk floor ---------------------------------------------------------------------


@contextlib.contextmanager
def _tmpfs(path: Path, size: str) -> Iterator[None]:
    path.mkdir(mode=0o700, parents=True)
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs",
                        str(path)], check=True, capture_output=True)  # fmt: skip
    except (OSError, subprocess.CalledProcessError) as e:
        pytest.skip(f"cannot mount a tmpfs here: {e}")
    try:
        yield
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)
        with contextlib.suppress(OSError):
            path.rmdir()
            path.parent.rmdir()


@pytest.fixture(scope="module")
def small_disk() -> Iterator[Lab]:
    """A service whose state directory is on a 64 MiB tmpfs, with a floor of 32 MiB."""
    with contextlib.ExitStack() as stack:

        def on_tmpfs(state_dir: Path) -> None:
            stack.enter_context(_tmpfs(state_dir, "64m"))

        with lab("--min-free-disk", "32Mi", state=on_tmpfs) as env:
            yield env


@pytest.mark.slow
def test_a_pull_that_would_cross_the_floor_fails_before_downloading(small_disk: Lab) -> None:
    ref = small_disk.push("disk/big", [layer([Entry("noise", data=os.urandom(40 << 20))])])
    gets = small_disk.registry.blob_gets()
    ok, detail = small_disk.pull(ref)
    assert not ok and ref in detail and "--min-free-disk" in detail, detail
    assert detail.startswith("RESOURCE_EXHAUSTED"), detail
    assert small_disk.registry.blob_gets() == gets


def test_a_pull_that_crosses_the_floor_while_unpacking_fails_and_cleans_up(
    small_disk: Lab,
) -> None:
    blob, diff_id = zeros_layer(_file_header("fill", 48 << 20), 48 << 20)  # 48 KiB of gzip
    ref = small_disk.push("disk/expands", [(blob, diff_id)])
    free_before = os.statvfs(small_disk.store).f_bavail
    ok, detail = small_disk.pull(ref)
    assert not ok and "--min-free-disk" in detail, detail
    assert _leftovers(small_disk) == []
    st = os.statvfs(small_disk.store)
    assert st.f_bavail >= free_before - (1 << 20) // st.f_frsize  # what it wrote is gone


def test_a_pull_within_the_floor_succeeds(small_disk: Lab) -> None:
    ref = small_disk.push("disk/fine", [layer([Entry("f", data=os.urandom(4 << 20))])])
    ok, detail = small_disk.pull(ref)
    assert ok, detail
