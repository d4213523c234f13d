"""The wire of a code context: how the SDK starts the in-sandbox driver and parses its frames.

Pure logic, no I/O. The driver (`aviato/_interpreter/driver.py`, whose docstring describes the
channel) is sent as text over the command's stdin and run by `BOOTSTRAP`, so the sandbox needs
``python3`` and nothing else. Requests (SDK → driver) are a 4-byte big-endian length and a JSON
object. Frames (driver → SDK) are ``MAGIC + token + length + ASCII JSON``.

`FrameReader` is where a hostile sandbox meets the client. It holds at most one frame
(`MAX_FRAME_BYTES`) plus a header; bytes that are not a frame with this context's token are
skipped (and counted), never interpreted; a frame must be ASCII and a JSON object, else it is
skipped too. Because the marker holds 0xFF and genuine frames are ASCII, a marker inside a
claimed payload proves the claim false, and reading resumes there: garbage written into the
channel cannot make the reader wait for bytes that will never come.
"""

from __future__ import annotations

import json
import secrets
import struct
from importlib import resources
from typing import Any

__all__ = [
    "BOOTSTRAP",
    "MAGIC",
    "MAX_FRAME_BYTES",
    "FrameReader",
    "driver_command",
    "driver_sources",
    "encode_request",
    "new_token",
]

MAGIC = b"\xffAVZ"
TOKEN_BYTES = 16
FRAME_HEADER = struct.Struct(">4s16sI")
REQUEST_HEADER = struct.Struct(">I")
#: The largest frame the SDK accepts (the driver sends at most 32 MiB of JSON per frame).
MAX_FRAME_BYTES = 32 << 20
#: The largest request the driver accepts.
MAX_REQUEST_BYTES = 64 << 20

#: The driver's modules, in the order they are loaded (each imports only earlier ones).
DRIVER_MODULES = ("rich", "kernels", "driver")

#: Run as ``python3 -c BOOTSTRAP name:length ...``: reads each module's text from stdin, makes
#: it ``_aviato_driver.<name>``, then calls the last one's ``main()``.
BOOTSTRAP = (
    "import os,sys,types\n"
    "def take(n):\n"
    " b=b''\n"
    " while len(b)<n:\n"
    "  c=os.read(0,n-len(b))\n"
    "  if not c:raise SystemExit(3)\n"
    "  b+=c\n"
    " return b\n"
    "p=types.ModuleType('_aviato_driver');p.__path__=[];sys.modules['_aviato_driver']=p\n"
    "for a in sys.argv[1:]:\n"
    " k,n=a.split(':');m=types.ModuleType('_aviato_driver.'+k)\n"
    " m.__package__='_aviato_driver';sys.modules[m.__name__]=m;setattr(p,k,m)\n"
    " exec(compile(take(int(n)),'aviato-driver/'+k+'.py','exec'),m.__dict__)\n"
    "m.main()\n"
)


def driver_sources() -> list[tuple[str, bytes]]:
    """The driver's modules as shipped inside the `aviato` package: (name, text), in order."""
    package = resources.files("aviato._interpreter")
    return [(name, package.joinpath(f"{name}.py").read_bytes()) for name in DRIVER_MODULES]


def driver_command(python: str) -> tuple[list[str], bytes]:
    """The argv that starts the driver with `python`, and what to send first on its stdin."""
    sources = driver_sources()
    argv = [python, "-c", BOOTSTRAP, *(f"{name}:{len(text)}" for name, text in sources)]
    return argv, b"".join(text for _, text in sources)


def new_token() -> bytes:
    return secrets.token_bytes(TOKEN_BYTES)


def encode_request(request: dict[str, Any]) -> bytes:
    """One request for the driver; ValueError when it would be over `MAX_REQUEST_BYTES`."""
    body = json.dumps(request, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    if len(body) > MAX_REQUEST_BYTES:
        raise ValueError(f"the request is {len(body)} bytes, over {MAX_REQUEST_BYTES}")
    return REQUEST_HEADER.pack(len(body)) + body


class FrameReader:
    """Turns the driver's stdout, fed in chunks of any size, into JSON objects (see the module
    docstring). Memory: at most `MAX_FRAME_BYTES` plus a header, whatever is fed."""

    def __init__(self, token: bytes, max_frame_bytes: int = MAX_FRAME_BYTES) -> None:
        self._marker = MAGIC + token
        self._max = max_frame_bytes
        self._buffer = bytearray()
        self.skipped_bytes = 0  # bytes that were not (part of) a frame
        self.bad_frames = 0  # frames with the token whose body was not an ASCII JSON object

    def feed(self, data: bytes) -> list[tuple[dict[str, Any], int]]:
        """The frames completed by `data`, in order, each with its size on the wire."""
        frames: list[tuple[dict[str, Any], int]] = []
        self._buffer += data
        while self._next(frames):
            pass
        return frames

    def _skip(self, n: int) -> None:
        del self._buffer[:n]
        self.skipped_bytes += n

    def _next(self, frames: list[tuple[dict[str, Any], int]]) -> bool:
        """Takes one frame (or skips garbage) from the buffer; False when more data is needed."""
        buffer, marker = self._buffer, self._marker
        start = buffer.find(marker)
        if start < 0:
            # keep only what could be the start of a marker
            self._skip(max(0, len(buffer) - (len(marker) - 1)))
            return False
        if start:
            self._skip(start)
        if len(buffer) < FRAME_HEADER.size:
            return False
        (size,) = struct.unpack_from(">I", buffer, len(marker))
        later = buffer.find(marker, 1, FRAME_HEADER.size + min(size, self._max))
        if size > self._max or later >= 0:
            self.bad_frames += 1
            self._skip(later if later >= 0 else 1)
            return True
        end = FRAME_HEADER.size + size
        if len(buffer) < end:
            return False
        body = bytes(buffer[FRAME_HEADER.size : end])
        del buffer[:end]
        frame = _parse(body)
        if frame is None:
            self.bad_frames += 1
        else:
            frames.append((frame, end))
        return True


def _parse(body: bytes) -> dict[str, Any] | None:
    if not body.isascii():
        return None
    try:
        value = json.loads(body)
    except (ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None
