"""The tar streams of directory transfers (UploadTree, DownloadTree), shared by the SDK and the
service: a writer of PAX headers and a push parser that checks every entry before anyone acts.

Only what a tree is made of passes: regular files, directories and symlinks, under plain
relative names (no absolute name, no `..`, no empty or `.` component once a leading `./` and a
trailing `/` are dropped; at most 4096 bytes, components at most 255). Hard links, devices,
FIFOs and anything else are refused by name, as are bad checksums, header records over 1 MiB,
more than 8 header records in a row and an archive that ends inside an entry. A declared size is
never allocated: data passes through in the pieces it arrived in. The parser says nothing about
where an entry lands: whoever writes it must not follow symlinks on the way (the supervisor's
WRITE_AT, the SDK's descriptor walk), since an earlier entry of the same archive may have
planted one.
"""

from __future__ import annotations

import tarfile
from dataclasses import dataclass

__all__ = ["END", "TarEntry", "TarError", "TarParser", "header", "padding"]

BLOCK = 512
END = bytes(2 * BLOCK)
MAX_NAME_BYTES = 4096
MAX_COMPONENT_BYTES = 255
MAX_META_BYTES = 1 << 20
MAX_META_IN_A_ROW = 8


class TarError(ValueError):
    """The archive is refused; the message names the entry and the rule, in words."""


@dataclass(frozen=True)
class TarEntry:
    name: str  # plain relative name, '/'-separated; "" is the tree's root directory
    kind: str  # "file", "dir", "symlink"
    mode: int  # permission bits, 0o7777
    mtime_ns: int
    size: int = 0  # file bytes that follow
    target: str = ""  # a symlink's target, as written


def header(entry: TarEntry) -> bytes:
    """The PAX header of `entry` (long names and sub-second times in its extended record)."""
    info = tarfile.TarInfo(entry.name + ("/" if entry.kind == "dir" and entry.name else ""))
    if not entry.name:
        info.name = "./"
    info.type = {"file": tarfile.REGTYPE, "dir": tarfile.DIRTYPE, "symlink": tarfile.SYMTYPE}[
        entry.kind
    ]
    info.mode = entry.mode & 0o7777
    seconds, nanos = divmod(max(0, entry.mtime_ns), 10**9)
    info.mtime = seconds
    if nanos:
        info.pax_headers = {"mtime": f"{seconds}.{nanos:09d}"}
    info.size = entry.size if entry.kind == "file" else 0
    info.linkname = entry.target
    return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


def padding(size: int) -> bytes:
    return bytes(-size % BLOCK)


def checked_name(raw: str, what: str = "entry") -> str:
    """`raw` as a plain relative name, or TarError."""
    name = raw
    while name.startswith("./"):
        name = name[2:]
    name = name.rstrip("/") if name not in ("", "/") else name
    if name in (".", ""):
        return ""
    if len(name.encode("utf-8", "surrogateescape")) > MAX_NAME_BYTES:
        raise TarError(f"{what} name of {len(name)} characters: longer than {MAX_NAME_BYTES} bytes")
    if name.startswith("/"):
        raise TarError(f"{what} {name!r}: absolute names are not accepted")
    for part in name.split("/"):
        if part in ("", ".", ".."):
            raise TarError(f"{what} {name!r}: '..', '.' and empty components are not accepted")
        if len(part.encode("utf-8", "surrogateescape")) > MAX_COMPONENT_BYTES:
            raise TarError(f"{what} {name[:80]!r}...: a component longer than 255 bytes")
    return name


def _number(field: bytes, what: str) -> int:
    if field and field[0] & 0x80:  # base-256
        value = int.from_bytes(field[1:], "big")
        if field[0] & 0x40:
            raise TarError(f"{what}: a negative number")
        return value
    text = field.split(b"\0", 1)[0].strip(b" ")
    try:
        return int(text, 8) if text else 0
    except ValueError:
        raise TarError(f"{what}: not a number") from None


def _pax_records(data: bytes) -> dict[str, str]:
    out: dict[str, str] = {}
    pos = 0
    while pos < len(data) and data[pos] != 0:
        space = data.find(b" ", pos)
        if space < 0:
            raise TarError("a malformed PAX record")
        try:
            length = int(data[pos:space])
        except ValueError:
            raise TarError("a malformed PAX record") from None
        if length <= space - pos or pos + length > len(data):
            raise TarError("a malformed PAX record")
        key, _, value = data[space + 1 : pos + length - 1].partition(b"=")
        out[key.decode("utf-8", "replace")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return out


class TarParser:
    """Push parser: `feed(data)` returns what `data` completed, as events:
    ``("entry", TarEntry)``, ``("data", bytes)`` (of the last file entry), ``("end", None)``
    (the archive's end). `close()` raises TarError when the archive stopped inside an entry."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._left = 0  # data bytes of the current file still to come
        self._pad = 0  # padding after them
        self._meta_kind = b""  # a header record being gathered: x, g, L, K
        self._meta_left = 0
        self._meta = bytearray()
        self._pax: dict[str, str] = {}
        self._long_name = self._long_link = ""
        self._in_a_row = 0
        self._last = ""
        self.ended = False

    def feed(self, data: bytes) -> list[tuple[str, object]]:
        events: list[tuple[str, object]] = []
        view = memoryview(data)
        while view and not self.ended:
            if self._left:
                n = min(self._left, len(view))
                events.append(("data", bytes(view[:n])))
                self._left -= n
                view = view[n:]
                continue
            if self._meta_left:
                n = min(self._meta_left, len(view))
                self._meta += view[:n]
                self._meta_left -= n
                view = view[n:]
                if not self._meta_left:
                    self._meta_done()
                continue
            if self._pad:
                n = min(self._pad, len(view))
                self._pad -= n
                view = view[n:]
                continue
            need = BLOCK - len(self._buf)
            self._buf += view[:need]
            view = view[need:]
            if len(self._buf) == BLOCK:
                block, self._buf = bytes(self._buf), bytearray()
                event = self._header(block)
                if event is not None:
                    events.append(event)
        return events

    def close(self) -> None:
        if not self.ended:
            where = f" inside {self._last!r}" if self._left or self._meta_left else ""
            raise TarError(f"the archive ended before its end{where}")

    def _meta_done(self) -> None:
        data = bytes(self._meta)
        self._meta = bytearray()
        if self._meta_kind == b"x":
            self._pax = _pax_records(data)
        elif self._meta_kind == b"L":
            self._long_name = data.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
        elif self._meta_kind == b"K":
            self._long_link = data.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")

    def _header(self, block: bytes) -> tuple[str, object] | None:
        if block == bytes(BLOCK):
            self.ended = True
            return ("end", None)
        stored = _number(block[148:156], "a header's checksum")
        if stored != sum(block[:148]) + 256 + sum(block[156:]):
            raise TarError(
                "a header with a bad checksum: this is not a tar archive, or it is damaged"
            )
        kind = block[156:157]
        size = _number(block[124:136], "a header's size")
        if kind in (b"x", b"g", b"L", b"K"):
            self._in_a_row += 1
            if self._in_a_row > MAX_META_IN_A_ROW:
                raise TarError(f"more than {MAX_META_IN_A_ROW} header records in a row")
            if size > MAX_META_BYTES:
                raise TarError(f"a header record of {size} bytes (at most {MAX_META_BYTES})")
            self._meta_kind = b"" if kind == b"g" else kind
            self._meta_left, self._pad = size, -size % BLOCK
            if not size:
                self._meta_done()
            return None
        self._in_a_row = 0
        pax, self._pax = self._pax, {}
        long_name, self._long_name = self._long_name, ""
        long_link, self._long_link = self._long_link, ""
        raw = pax.get("path") or long_name
        if not raw:
            name = block[0:100].split(b"\0", 1)[0]
            prefix = block[345:500].split(b"\0", 1)[0] if block[257:262] == b"ustar" else b""
            raw = (prefix + b"/" + name if prefix else name).decode("utf-8", "surrogateescape")
        self._last = raw[:200]
        name = checked_name(raw)
        if "size" in pax:
            try:
                size = int(pax["size"])  # PAX numbers are decimal
            except ValueError:
                raise TarError(f"entry {name!r}: a malformed size") from None
            if size < 0:
                raise TarError(f"entry {name!r}: a negative size")
        mode = _number(block[100:108], f"entry {name!r}: its mode") & 0o7777
        mtime_s = pax.get("mtime")
        try:
            if mtime_s:
                whole, _, frac = mtime_s.partition(".")
                mtime_ns = int(whole) * 10**9 + int((frac + "000000000")[:9] or 0)
            else:
                mtime_ns = _number(block[136:148], f"entry {name!r}: its mtime") * 10**9
        except ValueError:
            raise TarError(f"entry {name!r}: a malformed mtime") from None
        mtime_ns = max(0, mtime_ns)
        if kind in (b"0", b"\0", b"7"):
            if not name:
                raise TarError("a file entry without a name")
            self._left, self._pad = size, -size % BLOCK
            return ("entry", TarEntry(name, "file", mode, mtime_ns, size))
        self._pad = -size % BLOCK
        self._left = 0
        if size and kind != b"5":
            self._left, self._pad = 0, size + (-size % BLOCK)  # skip what a link declares
        if kind == b"5":
            self._pad = size + (-size % BLOCK)
            return ("entry", TarEntry(name, "dir", mode, mtime_ns))
        if kind == b"2":
            target = pax.get("linkpath") or long_link
            if not target:
                target = block[157:257].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            if not name:
                raise TarError("a symlink entry without a name")
            if not target or len(target.encode("utf-8", "surrogateescape")) > MAX_NAME_BYTES:
                raise TarError(f"symlink {name!r}: an empty or overlong target")
            return ("entry", TarEntry(name, "symlink", mode, mtime_ns, 0, target))
        what = {b"1": "a hard link", b"3": "a character device", b"4": "a block device",
                b"6": "a FIFO"}.get(kind, f"an entry of type {kind!r}")  # fmt: skip
        raise TarError(
            f"entry {name!r} is {what}: only files, directories and symlinks are accepted"
        )
