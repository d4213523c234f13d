"""Reading a sandbox's files in bounded memory: whole (up to a cap), as chunks, or to a local file.

A file's size is the sandbox's to choose (a sparse file of a terabyte costs it nothing), and the
size the service announces is only what the file measured when the read began: it may grow
meanwhile. So:

- `read_whole` (``Sandbox.read_file``) refuses a file whose announced size is over its cap
  before any data moves, and stops as soon as more than the cap arrives: at most the cap is
  held (twice, for a moment, while the chunks are joined into one ``bytes``);
- `FileStream` (``Sandbox.read_file_streaming``) asks the service for the next chunk only when
  the caller asks for it: gRPC's flow control holds the rest back, so one chunk (256 KiB) and
  the call's window are all it holds;
- `download` (``Sandbox.download_file``) writes each chunk to a temporary file beside the
  destination and renames it into place once complete: an interrupted download never leaves a
  partial file under the real name.

Retries: a whole read or write is retried from its start while the service cannot be reached
(it is idempotent); a stream or a download only until its first frame arrived, never once chunks
were handed out. The wire is the transport's (`aviato._transport.base.FileReader`,
`Transport.write_file`); this module holds what does not depend on it: caps, counting, local
files.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import BinaryIO

from aviato._bridged_stream import BridgedStream
from aviato._client import Client
from aviato._transport.base import FileReader, FileWriter
from aviato.exceptions import SandboxFileError
from aviato.v1 import sandbox_pb2 as pb

__all__ = ["FileStream", "download", "local_target", "open_read", "read_whole", "write_whole"]


def _size_text(n: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n} bytes"


def too_large(path: str, sandbox_id: str, size: int | None, cap: int) -> SandboxFileError:
    """The error of a whole read over its cap: names the file, its size and the cap, and the
    bounded ways to read it."""
    what = (
        f"the file is {_size_text(size)} ({size} bytes)"
        if size is not None
        else "more arrived (the file's size was not known in advance, or it changed while read)"
    )
    return SandboxFileError(
        f"read_file {path!r}: {what}, more than read_file keeps in memory "
        f"(max_bytes={_size_text(cap)}). Read it in chunks with "
        f"sandbox.read_file_streaming({path!r}), or into a local file with "
        f"sandbox.download_file({path!r}, local_path), or pass a larger max_bytes",
        filepath=path,
        sandbox_id=sandbox_id,
    )


class _Reading:
    """One file read whose header has arrived, counting what arrives (loop-side only)."""

    def __init__(self, reader: FileReader, sandbox_id: str, path: str) -> None:
        self.reader = reader
        self.size: int = reader.size
        self.mode: int = reader.mode
        self.sandbox_id = sandbox_id
        self.path = path
        self.received = 0
        self.ended = False

    async def next(self) -> bytes | None:
        """The next chunk, or None at the end; a file shorter than announced raises."""
        if self.ended:
            return None
        try:
            data = await self.reader.next()
        except BaseException:
            self.ended = True
            raise
        if data is None:
            self.ended = True
            # 0 is announced for files whose size is not known in advance (/proc, /sys): the
            # service then sends what it can read, up to its own bound
            if self.size > 0 and self.received != self.size:
                raise SandboxFileError(
                    f"read of {self.path!r} was truncated: {self.received} of {self.size} bytes",
                    filepath=self.path,
                    sandbox_id=self.sandbox_id,
                )
            return None
        self.received += len(data)
        return data

    async def copy_into(self, fd: int, progress: Callable[[int], None] | None) -> bool:
        """Copies the whole file into `fd` in the kernel, when the reader can (a local
        service's file by descriptor: `lean_descriptors`); False when it cannot (then read it
        chunk by chunk). A file shorter than announced raises, as in `next`."""
        if self.received or self.ended:
            return False
        copied = await self.reader.copy_into(fd, progress)
        if copied is None:
            return False
        self.received, self.ended = copied, True
        if self.received != self.size:
            raise SandboxFileError(
                f"read of {self.path!r} was truncated: {self.received} of {self.size} bytes",
                filepath=self.path,
                sandbox_id=self.sandbox_id,
            )
        return True

    def cancel(self) -> None:
        if not self.ended:
            self.ended = True
        self.reader.cancel()


async def _open_once(
    client: Client, sandbox_id: str, path: str, rpc_timeout: float | None
) -> _Reading:
    reader = await client.transport.open_read(sandbox_id, path, call_timeout=rpc_timeout)
    return _Reading(reader, sandbox_id, path)


async def open_read(
    client: Client, sandbox_id: str, path: str, rpc_timeout: float | None
) -> _Reading:
    """A file read whose header arrived (retried while the service cannot be reached)."""
    return await client.with_retry(
        lambda: _open_once(client, sandbox_id, path, rpc_timeout), op="read file"
    )


async def read_whole(
    client: Client, sandbox_id: str, path: str, rpc_timeout: float | None, cap: int
) -> bytes:
    """The whole file, if it is at most `cap` bytes; else `too_large` (see the module)."""

    async def attempt() -> bytes:
        reading = await _open_once(client, sandbox_id, path, rpc_timeout)
        try:
            if reading.size > cap:
                raise too_large(path, sandbox_id, reading.size, cap)
            chunks: list[bytes] = []
            while (chunk := await reading.next()) is not None:
                if reading.received > cap:
                    raise too_large(path, sandbox_id, None, cap)
                chunks.append(chunk)
            return b"".join(chunks)
        finally:
            reading.cancel()

    return await client.with_retry(attempt, op="read file")


async def write_whole(
    client: Client,
    sandbox_id: str,
    path: str,
    data: memoryview,
    *,
    mode: int,
    make_parents: bool,
    rpc_timeout: float,
) -> None:
    """Writes a whole file (retried from the start while the service cannot be reached); a
    short write raises SandboxFileError."""
    header = pb.WriteFileHeader(
        sandbox_id=sandbox_id, path=path, mode=mode, make_parents=make_parents, size=len(data)
    )
    writer = None
    if len(data) >= DESCRIPTOR_WRITE_BYTES:
        writer = await client.transport.open_write(header, call_timeout=rpc_timeout)
    if writer is not None:
        size = await _write_through(writer, path, sandbox_id, lambda: writer.write(data))
    else:
        size = await client.with_retry(
            lambda: client.transport.write_file(header, data, call_timeout=rpc_timeout),
            op="write file",
        )
    _check_written(path, sandbox_id, size, len(data))


def _check_written(path: str, sandbox_id: str, size: int, sent: int) -> None:
    """SandboxFileError when the service kept `size` bytes of the `sent`."""
    if size != sent:
        raise SandboxFileError(
            f"write of {path!r} was incomplete: {size} of {sent} bytes",
            filepath=path,
            sandbox_id=sandbox_id,
        )


# From this size on a write asks for a descriptor first (`Transport.open_write`): below it, the
# question (a round trip to the sandbox's supervisor) costs more than the stream it may save. A
# file kept in memory is then written through a pipe the supervisor drains, which needs the
# size in the header.
DESCRIPTOR_WRITE_BYTES = 1 << 20


async def _write_through(
    writer: FileWriter, path: str, sandbox_id: str, put: Callable[[], Awaitable[object]]
) -> int:
    """`put` the bytes through `writer` and finish it: the file's size. A failure leaves no
    file; the local write's errors (a full disk) say so in the user's words."""
    try:
        await put()
        return await writer.finish()
    except OSError as e:
        writer.cancel()
        raise SandboxFileError(
            f"write of {path!r} failed: {e.strerror or e}", filepath=path, sandbox_id=sandbox_id
        ) from None
    except BaseException:
        writer.cancel()
        raise


#: ``progress(done, total)``: bytes moved so far, and the file's size when known (else None).
Progress = Callable[[int, int | None], object]

UPLOAD_CHUNK_BYTES = 256 * 1024


async def upload(
    client: Client,
    sandbox_id: str,
    path: str,
    source: BinaryIO,
    *,
    mode: int,
    make_parents: bool,
    total: int | None,
    progress: Progress | None,
    rpc_timeout: float | None,
    whole_file: bool = False,
) -> int:
    """Streams `source` into the sandbox's `path`; returns the size written. Chunks are read in
    a worker thread (a slow disk or a pipe must not stall the SDK's loop), one at a time: memory
    stays at a chunk and the connection's window. Never retried (a stream cannot be rewound).
    With `whole_file` (a file the SDK opened and read nothing of), a local service may take the
    bytes in the kernel instead (`Transport.open_write`)."""
    loop = asyncio.get_running_loop()
    sent = 0
    header = pb.WriteFileHeader(
        sandbox_id=sandbox_id, path=path, mode=mode, make_parents=make_parents
    )
    writer = None
    if whole_file and total is not None and total >= DESCRIPTOR_WRITE_BYTES:
        declared = pb.WriteFileHeader()
        declared.CopyFrom(header)
        declared.size = total  # a file kept in memory needs it (its pipe's bytes are counted)
        writer = await client.transport.open_write(declared, call_timeout=rpc_timeout)

    def told(done: int) -> None:
        if progress is not None:
            progress(done, total)

    told(0)
    if writer is not None:

        async def copy() -> None:
            nonlocal sent
            sent = await writer.copy_from(source.fileno(), told)
            if total is not None and os.fstat(source.fileno()).st_size != total:
                raise SandboxFileError(
                    f"upload of {path!r}: the local file changed size while it was read "
                    f"({total} bytes when the upload began); nothing was written",
                    filepath=path,
                    sandbox_id=sandbox_id,
                )

        size = await _write_through(writer, path, sandbox_id, copy)
    else:

        async def chunks() -> AsyncIterator[bytes]:
            nonlocal sent
            while chunk := await loop.run_in_executor(None, source.read, UPLOAD_CHUNK_BYTES):
                yield chunk
                sent += len(chunk)
                told(sent)

        size = await client.transport.write_file_chunks(header, chunks(), call_timeout=rpc_timeout)
    _check_written(path, sandbox_id, size, sent)
    return size


def local_target(local_path: str | os.PathLike[str]) -> Path:
    """`local_path` as the file a download may create: not a directory, in one that exists."""
    if isinstance(local_path, bytes) or not isinstance(local_path, str | os.PathLike):
        kind = type(local_path).__name__
        raise TypeError(f"download_file: local_path must be a path (str or Path), not {kind}")
    target = Path(local_path)
    if target.is_dir():
        raise IsADirectoryError(
            f"download_file: local_path {str(target)!r} is a directory; name the file to write"
        )
    if not target.parent.is_dir():
        raise FileNotFoundError(
            f"download_file: local_path {str(target)!r}: no such directory {str(target.parent)!r}"
        )
    return target


class _PartFile:
    """A download's temporary file beside its target (blocking; used from a worker thread)."""

    def __init__(self, target: Path) -> None:
        self.target = target
        fd, self.name = tempfile.mkstemp(
            prefix=f".{target.name}.", suffix=".part", dir=target.parent
        )
        self.file = os.fdopen(fd, "wb")

    def write(self, data: bytes) -> None:
        self.file.write(data)

    def commit(self, mode: int) -> None:
        self.file.close()
        os.chmod(self.name, mode)
        os.replace(self.name, self.target)

    def discard(self) -> None:
        with contextlib.suppress(OSError):
            self.file.close()
        with contextlib.suppress(OSError):
            os.unlink(self.name)


async def download(
    open_: Callable[[], Awaitable[_Reading]],
    path: str,
    target: Path,
    progress: Progress | None = None,
) -> int:
    """Streams the file into `target` (see the module); returns its size. The local file gets
    the sandbox file's permission bits, less set-id bits and write for group and others. File
    I/O runs in worker threads: a slow disk must not stall the SDK's loop."""
    loop = asyncio.get_running_loop()
    part = await loop.run_in_executor(None, _PartFile, target)
    reading: _Reading | None = None
    try:
        reading = await open_()
        total = reading.size if reading.size > 0 else None
        if progress is not None:
            progress(0, total)

        def told(done: int) -> None:
            if progress is not None:
                progress(done, total)

        if not await reading.copy_into(part.file.fileno(), told):
            while (chunk := await reading.next()) is not None:
                await loop.run_in_executor(None, part.write, chunk)
                if progress is not None:
                    progress(reading.received, total)
        await loop.run_in_executor(None, part.commit, (reading.mode & 0o755) | 0o600)
        return reading.received
    except BaseException:
        part.discard()
        raise
    finally:
        if reading is not None:
            reading.cancel()


class FileStream(BridgedStream[_Reading, bytes]):
    """The contents of a file in a sandbox, chunk by chunk (`Sandbox.read_file_streaming`).

    Iterate with ``for chunk in stream`` or ``async for chunk in stream`` (from any thread or
    event loop); each chunk is ``bytes`` (up to 256 KiB), in order. The read starts at once, but
    each chunk is fetched only when asked for: memory stays at one chunk and the connection's
    window whatever the file's size, and a slow consumer holds the transfer back. Raises
    `SandboxFileError` (with ``filepath``) when the file cannot be read, or when it ended
    shorter than announced. `size` is the size the service announced (see its docstring).
    ``close()`` (or leaving ``with``/``async with``) ends the transfer early. Iterate it once.
    """

    def __init__(self, path: str, open_: Callable[[], Awaitable[_Reading]]) -> None:
        super().__init__(open_)
        self.path = path

    @property
    def size(self) -> int | None:
        """The file's size as announced by the service; None until the first chunk was asked
        for, and for files whose size is not known in advance (as in /proc)."""
        reading = self._source
        return reading.size if reading is not None and reading.size > 0 else None

    def _item(self, raw: bytes) -> bytes:
        return raw

    def __repr__(self) -> str:
        return f"<FileStream {self.path!r}>"
