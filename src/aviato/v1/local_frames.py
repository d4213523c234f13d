"""The lean local protocol: aviato.v1's calls as framed protobuf over a unix socket.

The local service listens, beside its gRPC unix socket ``P``, on a second unix socket
``P + LOCAL_SUFFIX`` (`local_socket_path`), mode 0600 like the first. The SDK uses it when it
is there (gRPC otherwise, and always for TCP). Both sides share this module: the frame layout,
the encoding of a call's header, metadata and status, and `FrameConnection`, the asyncio
protocol that reads and writes frames with bounded buffers. See docs/internals/transport.md.

One connection carries one call at a time (a client pools idle connections): the kernel's
socket buffer is a call's flow control, and a call ends cleanly only by an explicit frame.

A frame is a 5-byte header, kind (1 byte) and payload length (4 bytes, big-endian), then the
payload:

- CALL (client): the method's path, the timeout, the metadata (`encode_call`). For a method
  with a single request, one MESSAGE follows and nothing else.
- MESSAGE (both): one serialized protobuf message.
- HALF_CLOSE (client): the request stream has ended. A connection that closes without it is a
  client that went away, never the end of its input.
- HEADERS (service): the initial metadata, before any MESSAGE (only when the handler sends it).
- STATUS (service): the code, the details and the trailing metadata (`encode_status`). The
  last frame of a call; a connection that closes before it is a lost service (UNAVAILABLE).
- DESCRIPTOR (service): empty; a file descriptor rides on it (SCM_RIGHTS). Sent only by the
  local-only methods that hand out a sandbox's file (server/local_files.py), before their
  MESSAGE; their clients read the call with `recvmsg` on a connection of its own
  (_transport/lean_descriptors.py). Any other reader takes it for an unknown kind.

Bounds: a frame larger than the receiver's `max_frame` or of an unknown kind ends the
connection at once (nothing of it is buffered), and a receiver stops reading while more than
`READ_HIGH_WATER` bytes of whole frames wait to be consumed (a partial frame is not counted:
it is bounded by `max_frame`, and only more reading can complete it).
"""

from __future__ import annotations

import array
import asyncio
import collections
import os
import socket
import struct
from collections.abc import Iterable, Sequence

__all__ = [
    "CALL",
    "DESCRIPTOR",
    "HALF_CLOSE",
    "HEADERS",
    "LOCAL_SUFFIX",
    "MESSAGE",
    "STATUS",
    "ConnectionLost",
    "FrameConnection",
    "FrameError",
    "Metadata",
    "decode_call",
    "decode_metadata",
    "decode_status",
    "encode_call",
    "encode_metadata",
    "encode_status",
    "frame",
    "local_socket_path",
    "unpack_header",
]

LOCAL_SUFFIX = ".lean"

CALL = 1
MESSAGE = 2
HALF_CLOSE = 3
HEADERS = 4
STATUS = 5
DESCRIPTOR = 6  # not in _KINDS: only a descriptor call's own reader accepts it
_KINDS = frozenset({CALL, MESSAGE, HALF_CLOSE, HEADERS, STATUS})

_HEADER = struct.Struct(">BI")
HEADER_BYTES = _HEADER.size
# Frames waiting to be consumed before the receiver stops reading (the sender then blocks).
READ_HIGH_WATER = 1 << 20
READ_LOW_WATER = 256 * 1024
# The transport's own write buffer before `drain` waits.
WRITE_HIGH_WATER = 256 * 1024
# Frames sent in one turn of the event loop are written together, up to this much.
CORK_BYTES = 64 * 1024

Metadata = tuple[tuple[str, "str | bytes"], ...]

_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_F64 = struct.Struct(">d")
_MAX_METADATA_ITEMS = 256


def local_socket_path(grpc_socket: str) -> str:
    """The lean socket beside the gRPC unix socket `grpc_socket` (a path, no scheme)."""
    return grpc_socket + LOCAL_SUFFIX


class FrameError(Exception):
    """The peer broke the protocol (a frame too large, of an unknown kind, or out of place)."""


class ConnectionLost(Exception):
    """The connection ended (closed by the peer, reset, or ended for a protocol error)."""


def frame(kind: int, payload: bytes = b"") -> bytes:
    return _HEADER.pack(kind, len(payload)) + payload


def unpack_header(data: bytes | bytearray) -> tuple[int, int]:
    """(kind, payload length) of the frame at the start of `data` (HEADER_BYTES at least)."""
    kind, length = _HEADER.unpack_from(data)
    return kind, length


# --- the encodings ----------------------------------------------------------------------------


def encode_metadata(metadata: Iterable[tuple[str, str | bytes]] | None) -> bytes:
    """Pairs as (count, then key length, key, value length, value); a key ending in ``-bin``
    carries bytes, any other a string."""
    items = list(metadata or ())
    out = [_U16.pack(len(items))]
    for key, value in items:
        k = key.encode()
        v = value if isinstance(value, bytes) else value.encode()
        out += (_U16.pack(len(k)), k, _U32.pack(len(v)), v)
    return b"".join(out)


class _Reader:
    __slots__ = ("at", "data")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.at = 0

    def take(self, n: int) -> bytes:
        end = self.at + n
        if end > len(self.data):
            raise FrameError("a frame's payload is shorter than it says")
        piece = self.data[self.at : end]
        self.at = end
        return piece

    def u16(self) -> int:
        value: int = _U16.unpack(self.take(2))[0]
        return value

    def u32(self) -> int:
        value: int = _U32.unpack(self.take(4))[0]
        return value

    def f64(self) -> float:
        value: float = _F64.unpack(self.take(8))[0]
        return value

    def text(self, n: int) -> str:
        try:
            return self.take(n).decode()
        except UnicodeDecodeError:
            raise FrameError("a frame's text is not UTF-8") from None

    def metadata(self) -> Metadata:
        count = self.u16()
        if count > _MAX_METADATA_ITEMS:
            raise FrameError(f"{count} metadata items is more than {_MAX_METADATA_ITEMS}")
        items: list[tuple[str, str | bytes]] = []
        for _ in range(count):
            key = self.text(self.u16())
            raw = self.take(self.u32())
            if key.endswith("-bin"):
                items.append((key, raw))
            else:
                try:
                    items.append((key, raw.decode()))
                except UnicodeDecodeError:
                    raise FrameError(f"metadata {key!r} is not UTF-8") from None
        return tuple(items)

    def end(self) -> None:
        if self.at != len(self.data):
            raise FrameError("a frame's payload is longer than it says")


def decode_metadata(payload: bytes) -> Metadata:
    reader = _Reader(payload)
    items = reader.metadata()
    reader.end()
    return items


def encode_call(
    method: str, timeout: float | None, metadata: Iterable[tuple[str, str | bytes]] | None
) -> bytes:
    """A CALL frame's payload: the timeout in seconds (negative: none), the method, metadata."""
    m = method.encode()
    head = _F64.pack(-1.0 if timeout is None else max(timeout, 0.0)) + _U16.pack(len(m)) + m
    return head + encode_metadata(metadata)


def decode_call(payload: bytes) -> tuple[str, float | None, Metadata]:
    reader = _Reader(payload)
    timeout = reader.f64()
    method = reader.text(reader.u16())
    metadata = reader.metadata()
    reader.end()
    if timeout != timeout or timeout > 1e9:  # NaN or absurd: no deadline
        return method, None, metadata
    return method, (None if timeout < 0 else timeout), metadata


def encode_status(code: int, details: str, metadata: Iterable[tuple[str, str | bytes]]) -> bytes:
    d = details.encode()
    return _U16.pack(code) + _U32.pack(len(d)) + d + encode_metadata(metadata)


def decode_status(payload: bytes) -> tuple[int, str, Metadata]:
    reader = _Reader(payload)
    code = reader.u16()
    details = reader.text(reader.u32())
    metadata = reader.metadata()
    reader.end()
    return code, details, metadata


# --- the connection ---------------------------------------------------------------------------


class FrameConnection(asyncio.Protocol):
    """A stream of frames in both directions on one socket, with bounded buffers.

    Received frames wait in a queue (`next_frame`, `peek_frame`) that stops the socket's
    reading above `READ_HIGH_WATER` bytes; `send` queues bytes on the transport and `drain`
    waits while its buffer is above `WRITE_HIGH_WATER`. A frame larger than `max_frame`, or of
    an unknown kind, ends the connection (`error` says why). `lost` is called once, when the
    connection ends.
    """

    def __init__(self, max_frame: int) -> None:
        self.max_frame = max_frame
        self.transport: asyncio.Transport | None = None
        self.frames: collections.deque[tuple[int, bytes]] = collections.deque()
        self.closed = False
        self.error: BaseException | None = None
        self._buffer = bytearray()
        self._queued = 0
        self._reading_paused = False
        self._writing_paused = False
        self._waiters: list[asyncio.Future[None]] = []
        self._drainers: list[asyncio.Future[None]] = []
        self._ended_once = False
        self._out: list[bytes] = []
        self._out_bytes = 0
        self._flush_scheduled = False

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        buffer = self._buffer
        if buffer:
            buffer += data
            view: bytes | bytearray = buffer
        else:
            view = data
        at, size = 0, len(view)
        try:
            while size - at >= HEADER_BYTES:
                kind, length = _HEADER.unpack_from(view, at)
                if kind not in _KINDS:
                    raise FrameError(f"unknown frame kind {kind}")
                if length > self.max_frame:
                    raise FrameError(f"a frame of {length} bytes is more than {self.max_frame}")
                end = at + HEADER_BYTES + length
                if end > size:
                    break
                self.frames.append((kind, bytes(view[at + HEADER_BYTES : end])))
                self._queued += length + HEADER_BYTES
                at = end
        except FrameError as e:
            self.fail(e)
            return
        if view is buffer:
            del buffer[:at]
        elif at < size:
            buffer += view[at:]
        if self.frames:
            self._wake()
        if self._queued > READ_HIGH_WATER and not self._reading_paused:
            self._reading_paused = True
            assert self.transport is not None
            self.transport.pause_reading()

    def eof_received(self) -> bool:
        return False  # close the transport: connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        if self._ended_once:
            return
        self._ended_once = True
        self.closed = True
        if self.error is None:
            self.error = ConnectionLost(str(exc) if exc else "the peer closed the connection")
        self._buffer = bytearray()
        self._wake()
        self._release_drainers()
        self.lost()

    def pause_writing(self) -> None:
        self._writing_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        self._release_drainers()

    # for the owner

    def lost(self) -> None:
        """Called once when the connection ends; for subclasses."""

    def fail(self, error: BaseException) -> None:
        """Ends the connection at once for `error` (a protocol error, a cancelled call)."""
        if self.error is None:
            self.error = error
        if self.transport is not None:
            self.transport.abort()  # connection_lost follows, from the loop
        self.closed = True
        self._wake()
        self._release_drainers()

    def send(self, data: bytes) -> None:
        """Queues `data`: the frames sent in one turn of the event loop leave in one write (a
        response and its status, say), unless they pass `CORK_BYTES`."""
        if self.closed or self.transport is None:
            raise ConnectionLost(str(self.error or "the connection is closed"))
        self._out.append(data)
        self._out_bytes += len(data)
        if self._out_bytes >= CORK_BYTES:
            self.flush()
        elif not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        """Writes what `send` queued."""
        self._flush_scheduled = False
        if not self._out:
            return
        out, self._out, self._out_bytes = self._out, [], 0
        if self.closed or self.transport is None:
            return
        self.transport.write(out[0] if len(out) == 1 else b"".join(out))

    async def send_descriptor(self, fd: int) -> None:
        """Sends a DESCRIPTOR frame with `fd` riding on it, after everything sent before it
        (written first: a descriptor cannot join the transport's buffer)."""
        self.flush()
        # The frames before it are written first, for up to a second (the calls that send a
        # descriptor send nothing before it: this does not wait).
        for _ in range(1000):
            if self.transport is None or not self.transport.get_write_buffer_size():
                break
            await asyncio.sleep(0.001)
        if self.closed or self.transport is None or self.transport.get_write_buffer_size():
            raise ConnectionLost(str(self.error or "the connection does not drain"))
        sock = self.transport.get_extra_info("socket")
        with socket.socket(fileno=os.dup(sock.fileno())) as raw:
            rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]).tobytes())]
            try:
                sent = raw.sendmsg([frame(DESCRIPTOR)], rights)
            except BlockingIOError:
                sent = 0
            if sent != HEADER_BYTES:  # the socket's buffer is full: the peer reads nothing
                raise ConnectionLost("the client does not read its descriptor")

    def close(self) -> None:
        """Closes the connection once what was sent is written."""
        self.flush()
        if self.transport is not None and not self.closed:
            self.transport.close()

    async def drain(self) -> None:
        """Waits while the transport's buffer is full; raises `ConnectionLost` once it ended."""
        while self._writing_paused and not self.closed:
            waiter = asyncio.get_running_loop().create_future()
            self._drainers.append(waiter)
            await waiter
        if self.closed:
            raise ConnectionLost(str(self.error or "the connection is closed"))

    async def wait(self) -> None:
        """Returns when a frame is queued or the connection has ended."""
        if self.frames or self.closed:
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        finally:
            if not waiter.done():
                waiter.cancel()
            if waiter in self._waiters:
                self._waiters.remove(waiter)

    def take(self) -> tuple[int, bytes]:
        """The next queued frame (one must be queued)."""
        kind, payload = self.frames.popleft()
        self._queued -= len(payload) + HEADER_BYTES
        if self._reading_paused and self._queued < READ_LOW_WATER:
            self._reading_paused = False
            if not self.closed and self.transport is not None:
                self.transport.resume_reading()
        return kind, payload

    async def next_frame(self) -> tuple[int, bytes]:
        """The next frame; raises `ConnectionLost` (or the protocol error) once none is left."""
        while not self.frames:
            if self.closed:
                raise self._ended()
            await self.wait()
        return self.take()

    def _ended(self) -> BaseException:
        error = self.error
        if isinstance(error, FrameError | ConnectionLost):
            return error
        return ConnectionLost(str(error or "the connection ended"))

    def _wake(self) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def _release_drainers(self) -> None:
        drainers, self._drainers = self._drainers, []
        for waiter in drainers:
            if not waiter.done():
                waiter.set_result(None)


def pairs(metadata: Sequence[tuple[str, str | bytes]] | None) -> Metadata:
    return tuple((str(k), v) for k, v in metadata or ())
