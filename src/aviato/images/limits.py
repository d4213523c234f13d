"""What one pull may cost the host: bytes unpacked, entries made, and the free-disk floor.

A layer of a few KiB of gzip can expand to terabytes, and a layer of empty files can exhaust the
file system's inodes. `PullLimits` are the operator's bounds (server flags `--max-image-size`,
`--max-image-files`, `--min-free-disk`); a `PullBudget` is one pull's account against them,
charged while the blobs download and while the layers are unpacked, and it fails the pull at
once, with an error naming the image and the bound, when a bound would be crossed.

What is counted: the compressed bytes the registry declares (before downloading) and receives,
the uncompressed bytes of every layer's tar stream (what the decompressor emits, including what
follows the end of the archive), and every tar entry. Free disk is checked before the download,
then every `DISK_CHECK_BYTES` of download or unpack. It cannot see what other programs write to
the same file system meanwhile: the floor is checked, not reserved.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from aviato.images.errors import ImageError

__all__ = [
    "DEFAULT_MAX_IMAGE_BYTES",
    "DEFAULT_MAX_IMAGE_ENTRIES",
    "DiskLow",
    "ImageTooLarge",
    "PullBudget",
    "PullLimits",
    "format_size",
]

DEFAULT_MAX_IMAGE_BYTES = 16 << 30
DEFAULT_MAX_IMAGE_ENTRIES = 1_000_000
DISK_CHECK_BYTES = 4 << 20  # a statvfs per 4 MiB: about 4000 per 16 GiB


class ImageTooLarge(ImageError):
    """The image would unpack to more bytes or entries than the service allows."""

    code = "RESOURCE_EXHAUSTED"


class DiskLow(ImageError):
    """The pull would bring the store's file system below the service's free-disk floor."""

    code = "RESOURCE_EXHAUSTED"


def format_size(n: int) -> str:
    """1536 → "1.5 KiB" (binary units, as the server flags take them)."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


@dataclass(frozen=True)
class PullLimits:
    """The operator's bounds on one pull (0 disables a bound)."""

    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    max_image_entries: int = DEFAULT_MAX_IMAGE_ENTRIES
    min_free_disk_bytes: int = 0


class PullBudget:
    """One pull's account. Thread-safe enough for its use: charged by one thread at a time (the
    download on the event loop, then the unpack in a worker)."""

    def __init__(self, image: str, limits: PullLimits, store_dir: str | os.PathLike[str]) -> None:
        self.image = image
        self.limits = limits
        self._store_dir = store_dir
        self.unpacked = 0
        self.entries = 0
        self._since_check = 0

    def _free(self) -> int | None:
        try:
            st = os.statvfs(self._store_dir)
        except OSError:
            return None
        return st.f_bavail * st.f_frsize

    def check_disk(self, coming: int = 0) -> None:
        """Raises DiskLow when free disk, less `coming` bytes still to write, is below the floor."""
        floor = self.limits.min_free_disk_bytes
        if not floor:
            return
        free = self._free()
        if free is not None and free - coming < floor:
            more = f", with {format_size(coming)} still to write," if coming else ""
            raise DiskLow(
                f"pulling {self.image} would bring free disk of the image store below the "
                f"service's floor: {format_size(free)} free{more} and the floor is "
                f"{format_size(floor)} (server --min-free-disk); remove unused images "
                "(aviato image prune) or free disk"
            )

    def disk_full(self, exc: OSError) -> DiskLow:
        """The error for a write that found the file system full (ENOSPC, EDQUOT)."""
        return DiskLow(
            f"pulling {self.image}: the image store's file system is full ({exc.strerror}); "
            "remove unused images (aviato image prune) or free disk"
        )

    def check_download(self, total: int, missing: int) -> None:
        """Before the download: `total` compressed bytes of all layers (as the manifest
        declares them), `missing` of those not in the store yet."""
        cap = self.limits.max_image_bytes
        if cap and total > cap:
            raise self._too_large(f"its layers alone are {format_size(total)} compressed, more")
        self.check_disk(missing)

    def downloaded(self, n: int) -> None:
        """`n` more bytes were written to disk by a download."""
        self._tick(n)

    def unpack(self, n: int) -> None:
        """`n` more uncompressed bytes of a layer were read (and may be written)."""
        self.unpacked += n
        cap = self.limits.max_image_bytes
        if cap and self.unpacked > cap:
            raise self._too_large("it unpacks to more")
        self._tick(n)

    def entry(self) -> None:
        """One more tar entry."""
        self.entries += 1
        cap = self.limits.max_image_entries
        if cap and self.entries > cap:
            raise ImageTooLarge(
                f"image {self.image} has more than {cap} files (entries of its layers), the "
                "service's bound (server --max-image-files); ask the operator to raise it"
            )

    def _tick(self, n: int) -> None:
        self._since_check += n
        if self._since_check >= DISK_CHECK_BYTES:
            self._since_check = 0
            self.check_disk()

    def _too_large(self, why: str) -> ImageTooLarge:
        return ImageTooLarge(
            f"image {self.image} is larger than the service allows: {why} than its bound of "
            f"{format_size(self.limits.max_image_bytes)} (server --max-image-size); ask the "
            "operator to raise it"
        )
