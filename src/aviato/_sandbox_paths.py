"""Directories and metadata of a sandbox's file system, and whole trees in and out.

`SandboxPaths` is a base class of `aviato.Sandbox`, not used alone (`SandboxCore` provides the
state). Paths are the sandbox's: a directory on the way is followed when it is a symlink, the
last component never is (`stat` describes a link itself, `remove` removes a link and not what it
points to). Trees travel as tar streams through the chunked file path (`_local_trees` is the
local side, docs/state.md and docs/security.md the whole story).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, overload

from aviato import _local_trees
from aviato._client import Client
from aviato._files import Progress
from aviato._operation import OperationRef
from aviato.exceptions import SandboxFileError
from aviato.v1 import sandbox_pb2 as pb
from aviato.v1.tar_stream import TarError

__all__ = ["DirListing", "FileEntry", "SandboxPaths"]

LIST_DEFAULT = 10_000


@dataclass(frozen=True)
class FileEntry:
    """One entry of a sandbox's file system, as ``os.lstat`` would describe it."""

    name: str
    """The last component of the path (an entry's name in a listing)."""
    type: str
    """``"file"``, ``"dir"``, ``"symlink"`` or ``"other"`` (a device, FIFO or socket)."""
    size: int
    mode: int
    """Permission bits (``0o755``)."""
    mtime: float
    """Modification time, seconds since the epoch (``mtime_ns`` exactly)."""
    mtime_ns: int
    target: str = ""
    """A symlink's target as written (never followed); empty for anything else."""

    @property
    def is_dir(self) -> bool:
        return self.type == "dir"

    @property
    def is_file(self) -> bool:
        return self.type == "file"

    @property
    def is_symlink(self) -> bool:
        return self.type == "symlink"


class DirListing(Sequence[FileEntry]):
    """The entries of a directory (`Sandbox.list_dir`): a sequence of `FileEntry` in the
    directory's own order (not sorted), and `truncated`: True when the directory had more
    entries than the listing's `limit`."""

    def __init__(self, entries: list[FileEntry], truncated: bool) -> None:
        self._entries = entries
        self.truncated = truncated

    @overload
    def __getitem__(self, i: int) -> FileEntry: ...
    @overload
    def __getitem__(self, i: slice) -> list[FileEntry]: ...
    def __getitem__(self, i: int | slice) -> FileEntry | list[FileEntry]:
        return self._entries[i]

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[FileEntry]:
        return iter(self._entries)

    def names(self) -> list[str]:
        return [e.name for e in self._entries]

    def __repr__(self) -> str:
        more = ", truncated" if self.truncated else ""
        return f"DirListing({len(self._entries)} entries{more})"


def _entry(msg: pb.FileEntry) -> FileEntry:
    ns = msg.mtime.ToNanoseconds()
    return FileEntry(msg.name, msg.type, msg.size, msg.mode, ns / 1e9, ns, msg.target)


class SandboxPaths:
    """Directories, metadata and trees (see the module docstring); `Sandbox` provides the state."""

    _request_timeout: float

    async def _ensure_started(self) -> None:
        raise NotImplementedError

    async def _client(self) -> Client:
        raise NotImplementedError

    def _require_id(self) -> str:
        raise NotImplementedError

    async def _call(self, rpc: str, request: Any, timeout_s: float | None, retry: bool) -> Any:
        await self._ensure_started()
        client = await self._client()
        request.sandbox_id = self._require_id()
        timeout = timeout_s or self._request_timeout

        def call() -> Any:
            return client.transport.path_call(rpc, request, call_timeout=timeout)

        if retry:
            return await client.with_retry(call, op=rpc)
        return await call()

    def stat(self, path: str, *, timeout_seconds: float | None = None) -> OperationRef[FileEntry]:
        """Describes `path` without following it if it is a symlink (as ``os.lstat``). Raises
        `SandboxFileError` (with ``filepath``) if it does not exist."""
        request = pb.PathRequest(path=path)
        return OperationRef._of(self._stat(request, timeout_seconds))

    async def _stat(self, request: pb.PathRequest, timeout_s: float | None) -> FileEntry:
        return _entry(await self._call("StatPath", request, timeout_s, retry=True))

    def list_dir(
        self, path: str, *, limit: int = LIST_DEFAULT, timeout_seconds: float | None = None
    ) -> OperationRef[DirListing]:
        """Lists the directory `path` (a symlink to a directory is followed): at most `limit`
        entries (default 10,000), in the directory's own order, ``.`` and ``..`` left out; the
        `DirListing`'s ``truncated`` says whether there were more. Larger listings are fetched
        10,000 entries a call. Raises `SandboxFileError` if `path` is missing or not a
        directory."""
        if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
            raise ValueError(f"list_dir: limit must be a positive int, not {limit!r}")
        return OperationRef._of(self._list_dir(path, limit, timeout_seconds))

    async def _list_dir(self, path: str, limit: int, timeout_s: float | None) -> DirListing:
        entries: list[FileEntry] = []
        offset = 0
        while True:
            want = min(limit - len(entries), LIST_DEFAULT)
            request = pb.ListDirRequest(path=path, offset=offset, limit=want)
            answer = await self._call("ListDir", request, timeout_s, retry=True)
            entries.extend(_entry(m) for m in answer.entries)
            offset = answer.next_offset
            if not answer.truncated or len(entries) >= limit:
                return DirListing(entries, bool(answer.truncated))

    def remove(
        self, path: str, *, recursive: bool = False, timeout_seconds: float | None = None
    ) -> OperationRef[None]:
        """Removes a file, a symlink (not its target) or an empty directory; with `recursive`, a
        directory and everything in it (following no symlink). ``"/"`` and the sandbox's working
        directory are refused. Raises `SandboxFileError` if missing or not empty."""
        request = pb.RemovePathRequest(path=path, recursive=recursive)
        return OperationRef._of(self._call("RemovePath", request, timeout_seconds, retry=False))

    def make_dir(
        self,
        path: str,
        *,
        parents: bool = False,
        mode: int = 0o755,
        timeout_seconds: float | None = None,
    ) -> OperationRef[None]:
        """Makes the directory `path` with permission bits `mode`. With `parents`, missing
        parents are made too and an existing directory is no error (as ``mkdir -p``; it keeps
        its mode). Raises `SandboxFileError` if it exists (without `parents`) or its parent is
        missing."""
        request = pb.MakeDirRequest(path=path, parents=parents, mode=mode)
        return OperationRef._of(self._call("MakeDir", request, timeout_seconds, retry=False))

    def rename(
        self, source: str, destination: str, *, timeout_seconds: float | None = None
    ) -> OperationRef[None]:
        """Renames `source` to `destination` in the sandbox, replacing a file there (as
        ``os.rename``). Raises `SandboxFileError` if `source` is missing."""
        request = pb.RenamePathRequest(source=source, destination=destination)
        return OperationRef._of(self._call("RenamePath", request, timeout_seconds, retry=False))

    def upload_dir(
        self,
        local_dir: str | os.PathLike[str],
        remote_dir: str,
        *,
        timeout_seconds: float | None = None,
        progress: Progress | None = None,
    ) -> OperationRef[int]:
        """Copies the local directory `local_dir` into the sandbox at `remote_dir` (made if
        missing; what it holds of the same names is replaced), in bounded memory; resolves to
        the file bytes written. Modes (less set-id bits) and modification times are kept;
        symlinks are copied as symlinks, never followed; devices, FIFOs and sockets are left
        out. Nothing below `remote_dir` is followed if it is a symlink. `progress(done, None)`
        is called with the bytes sent so far. Raises `NotADirectoryError` here if `local_dir`
        is not a directory, `SandboxFileError` if the sandbox refuses an entry."""
        local = os.fspath(local_dir)
        if not os.path.isdir(local):
            raise NotADirectoryError(f"upload_dir: {local!r} is not a directory")
        return OperationRef._of(
            self._upload_dir(local, remote_dir, timeout_seconds, progress), finish_at_exit=True
        )

    async def _upload_dir(
        self, local: str, remote: str, timeout_s: float | None, progress: Progress | None
    ) -> int:
        await self._ensure_started()
        client = await self._client()
        header = pb.WriteFileHeader(sandbox_id=self._require_id(), path=remote)
        pieces = _local_trees.local_tree_chunks(local)

        async def chunks() -> Any:
            done = 0
            if progress is not None:
                progress(0, None)
            while (piece := await asyncio.to_thread(next, pieces, None)) is not None:
                yield piece
                done += len(piece)
                if progress is not None:
                    progress(done, None)

        try:
            size: int = await client.transport.write_tree(header, chunks(), call_timeout=timeout_s)
        finally:
            pieces.close()
        return size

    def download_dir(
        self,
        remote_dir: str,
        local_dir: str | os.PathLike[str],
        *,
        timeout_seconds: float | None = None,
        progress: Progress | None = None,
    ) -> OperationRef[int]:
        """Copies the sandbox's directory `remote_dir` to `local_dir` on this machine (made if
        missing, its parent must exist; files of the same names are replaced), in bounded
        memory; resolves to the file bytes written. What arrives is checked entry by entry and
        written following no symlink: nothing lands outside `local_dir`, whatever the sandbox
        planted. Symlinks come as symlinks; modes (less set-id and sticky bits) and times are
        kept. On failure, what was written stays (no partial file). `progress(done, None)` is
        called with the bytes received so far."""
        local = os.fspath(local_dir)
        return OperationRef._of(self._download_dir(remote_dir, local, timeout_seconds, progress))

    async def _download_dir(
        self, remote: str, local: str, timeout_s: float | None, progress: Progress | None
    ) -> int:
        await self._ensure_started()
        client = await self._client()
        sandbox_id = self._require_id()
        reader = await client.transport.open_tree_read(sandbox_id, remote, call_timeout=timeout_s)
        writer: _local_trees.LocalTreeWriter | None = None
        try:
            writer = await asyncio.to_thread(_local_trees.LocalTreeWriter, local)
            done = 0
            if progress is not None:
                progress(0, None)
            while (chunk := await reader.next()) is not None:
                await asyncio.to_thread(writer.feed, chunk)
                done += len(chunk)
                if progress is not None:
                    progress(done, None)
            await asyncio.to_thread(writer.finish)
            return writer.written
        except TarError as e:
            raise SandboxFileError(
                f"download_dir {remote!r}: refused what the sandbox sent: {e}",
                sandbox_id=sandbox_id,
                filepath=remote,
            ) from None
        finally:
            reader.cancel()
            if writer is not None:
                writer.close()
