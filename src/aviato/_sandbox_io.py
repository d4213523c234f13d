"""The commands and files of a sandbox: the part of `Sandbox` that works inside it.

`SandboxIO` is a base class of `aviato.Sandbox`, not used alone: its methods start the sandbox
if needed (`_ensure_started`), then run a command (`aviato._process`) or move a file
(`aviato._files`) through the sandbox's client, or forwards a port (`aviato._port_forward`).
"""

from __future__ import annotations

import asyncio
import os
import shlex
import stat
import uuid
from collections.abc import (
    AsyncIterable,
    AsyncIterator,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from datetime import UTC, datetime
from typing import Any, BinaryIO

from aviato import _defaults, _files
from aviato._bridge import get_bridge
from aviato._client import Client
from aviato._files import FileStream, Progress
from aviato._logs import LogStream, ResumingLogReader
from aviato._operation import OperationRef
from aviato._options import SandboxDefaults
from aviato._port_forward import PortForward
from aviato._process import ExecState, Process, resuming
from aviato._sandbox_observe import SandboxObserving
from aviato._transport.base import LogReader
from aviato.exceptions import SandboxError, SandboxNotRunningError, SandboxValidationError
from aviato.v1 import sandbox_pb2 as pb

__all__ = ["SandboxIO"]


DEFAULT_TTY_SIZE = (24, 80)
# `Sandbox.shell`: bash when the image has it, else sh, as a login-less interactive shell.
DEFAULT_SHELL = (
    "/bin/sh",
    "-c",
    "if command -v bash >/dev/null 2>&1; then exec bash -i; else exec sh -i; fi",
)


def _regular_file_size_and_mode(source: BinaryIO) -> tuple[int | None, int | None]:
    """The size and permission bits of a file object that is a regular file, else None."""
    try:
        info = os.fstat(source.fileno())
    except (OSError, AttributeError, ValueError):
        return None, None
    if not stat.S_ISREG(info.st_mode):
        return None, None
    return info.st_size, stat.S_IMODE(info.st_mode)


async def _threaded(items: Iterator[bytes]) -> AsyncIterator[bytes]:
    """`items`, each advanced on a worker thread."""
    done = object()
    while (item := await asyncio.to_thread(next, items, done)) is not done:
        yield item  # type: ignore[misc]


def _nanoseconds_of(when: datetime | float) -> int:
    """`since` as unix nanoseconds: a datetime (naive: UTC) or unix seconds."""
    if isinstance(when, datetime):
        aware = when if when.tzinfo is not None else when.replace(tzinfo=UTC)
        delta = aware - datetime(1970, 1, 1, tzinfo=UTC)
        return (delta.days * 86400 + delta.seconds) * 10**9 + delta.microseconds * 1000
    if isinstance(when, bool) or not isinstance(when, int | float) or when != when:
        raise TypeError(f"since must be a datetime or unix seconds, not {when!r}")
    return int(when * 1e9) if isinstance(when, float) else when * 10**9


def _terminal_size(size: tuple[int, int] | None) -> tuple[int, int]:
    """`tty_size` checked: (rows, cols), each 1 to 65535; None is 24 x 80."""
    if size is None:
        return DEFAULT_TTY_SIZE
    if not (isinstance(size, tuple | list) and len(size) == 2) or not all(
        isinstance(n, int) and not isinstance(n, bool) and 0 < n < 65536 for n in size
    ):
        raise ValueError(f"tty_size must be (rows, cols), each from 1 to 65535, not {size!r}")
    return int(size[0]), int(size[1])


class SandboxIO(SandboxObserving):
    """Commands and files (see the module docstring); `Sandbox` provides the state below."""

    _defaults: SandboxDefaults
    _request_timeout: float
    _sandbox_id: str | None
    _stop_requested: bool

    async def _ensure_started(self) -> None:
        raise NotImplementedError

    async def _client(self) -> Client:
        raise NotImplementedError

    def _require_id(self) -> str:
        raise NotImplementedError

    # -- commands ------------------------------------------------------------------------------

    def exec(
        self,
        command: Sequence[str],
        *,
        cwd: str | None = None,
        env: Mapping[str, str] | None = None,
        check: bool = False,
        timeout_seconds: float | None = None,
        stdin: bool = False,
        input: bytes | str | None = None,
        protected: bool = False,
        max_output_bytes: int | None = None,
        tty: bool = False,
        tty_size: tuple[int, int] | None = None,
    ) -> Process:
        """Runs `command` (an argv list) in the sandbox; returns a `Process` at once.

        If the sandbox is not running yet, the command waits for it (it is started if needed).
        `cwd` must be absolute (default: the sandbox's working directory). `env` is added to the
        sandbox's environment. `timeout_seconds` (default: no limit) is enforced by the service:
        the command's process group is killed and `result()` raises `SandboxTimeoutError` (with
        ``exec_result``). With `check`, a non-zero exit makes `result()` raise
        `SandboxExecutionError` carrying ``exec_result`` (after the output is complete).

        The command's stdin: with ``stdin=True``, ``process.stdin`` is a `StreamWriter` to feed
        it while it runs; with ``input=`` (bytes, or text sent as UTF-8; at most 4 MiB), it is
        that data followed by end-of-file, sent with the command in one message (as in
        `subprocess.run`; the cheaper way when the input is known up front); otherwise it is empty.
        The two cannot be combined.

        Output: ``process.stdout``/``stderr`` stream it live, in bounded memory (a reader that
        falls behind holds the command back). The `ProcessResult` keeps the first
        `max_output_bytes` of each stream (default `SandboxDefaults.max_output_bytes`, 64 MiB) and
        says when a stream was longer (``stdout_truncated``/``stderr_truncated``); the command
        runs to its end and its exit code arrives either way.

        With ``tty=True`` the command runs on a pseudo-terminal of `tty_size` (rows, cols;
        default 24 x 80), as in a terminal window: ``process.stdin`` takes raw bytes (keys,
        ``b"\\x03"`` for Ctrl-C), the terminal's output arrives on ``stdout`` (stderr stays
        empty), ``process.resize(rows, cols)`` follows a window's size and
        ``process.send_signal(signum)`` signals the command. For agents that drive ``bash``,
        ``python`` or an editor; ``stdin=True`` is implied.

        With ``protected=True`` nothing else running in the sandbox (a process an earlier
        command left behind, say) can read, write, signal or trace the command, open its
        descriptors or memory, or change its output or exit status; it still reads and writes
        the sandbox's files and reaches its servers as any command does. Meant for checks that
        judge code running in the same sandbox; see docs/security.md for what it does not
        promise. Needs a service running as root (else `SandboxError` says so).
        """
        if isinstance(command, str | bytes):
            raise TypeError(
                f"exec() takes a list of arguments, e.g. ['sh', '-c', {command!r}], not a string"
            )
        argv = [str(a) for a in command]
        if not argv:
            raise ValueError("exec() needs a non-empty command")
        if cwd is not None and not cwd.startswith("/"):
            raise SandboxValidationError(f"cwd must be an absolute path, not {cwd!r}")
        if timeout_seconds is not None and timeout_seconds <= 0:
            raise ValueError("timeout_seconds must be positive")
        if input is not None and (stdin or tty):
            raise ValueError("exec() takes stdin=True (or tty=True) or input=..., not both")
        rows, cols = _terminal_size(tty_size) if tty else (0, 0)
        stdin = stdin or tty
        data = input.encode() if isinstance(input, str) else bytes(input or b"")
        keep = (
            self._defaults.max_output_bytes
            if max_output_bytes is None
            else _defaults.byte_count("max_output_bytes", max_output_bytes)
        )
        state = ExecState(argv, stdin=stdin, tty=tty, max_output_bytes=keep)
        init = pb.ExecInit(
            argv=argv,
            cwd=cwd or "",
            env=dict(env or {}),
            timeout_seconds=float(timeout_seconds or 0.0),
            stdin=stdin,
            input=data,
            protected=protected,
            tty=tty,
            tty_size=pb.TerminalSize(rows=rows, cols=cols) if tty else None,
            request_id=uuid.uuid4().hex,  # a retry of this call attaches, never runs it again
        )
        future = get_bridge().submit(self._exec(state, init, check))
        return Process(future, state)

    def shell(
        self,
        *,
        tty_size: tuple[int, int] | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
    ) -> Process:
        """An interactive shell of the sandbox on a pseudo-terminal: ``bash -i`` where the image
        has bash, else ``sh -i`` (as `aviato sh` starts). The same `Process` as
        ``exec(..., tty=True)``: write keys to ``stdin`` (raw bytes: ``b"\\r"`` for Enter,
        ``b"\\x03"`` for Ctrl-C), read the screen from ``stdout``, follow a window with
        ``resize``; ``exit`` ends it. Like every command it has an `exec_id`: after a lost
        connection, `attach` gets the screen back (docs/interactive.md)."""
        return self.exec(list(DEFAULT_SHELL), tty=True, tty_size=tty_size, env=env, cwd=cwd)

    async def _exec(self, state: ExecState, init: pb.ExecInit, check: bool) -> Any:
        try:
            if self._stop_requested:
                raise SandboxNotRunningError(
                    f"cannot run {shlex.join(state.command)!r}: the sandbox was stopped",
                    sandbox_id=self._sandbox_id,
                )
            await self._ensure_started()
            init.sandbox_id = self._require_id()
            client = await self._client()
            return await self._observed(
                state.drive(client.transport, init, check=check, retry=resuming(client, "exec"))
            )
        except BaseException as err:
            state.finish(
                err if isinstance(err, Exception) else SandboxError("the command was cancelled")
            )
            raise

    # -- exposed ports -------------------------------------------------------------------------

    def forward_port(self, port: int, *, local_port: int = 0) -> PortForward:
        """Reaches exposed `port` of the sandbox on this machine's 127.0.0.1:`local_port` (0: a
        free port), through the service, as `kubectl port-forward` does: works with a remote
        service (TLS, API key) as with the local one. Returns a `PortForward` at once; it
        listens soon after (``with``/``async with``/``await`` wait for it; ``.address`` is
        ``"127.0.0.1:N"``; ``.close()`` ends it). Raises, when waited for,
        `SandboxValidationError` for a port the sandbox does not expose and
        `SandboxNotRunningError` for a sandbox that has ended. A sandbox not started yet is
        started. See docs/networking.md.
        """

        async def resolve() -> tuple[Client, str]:
            await self._ensure_started()
            return await self._client(), self._require_id()

        return PortForward(resolve, port, local_port)

    # -- the main process's log -----------------------------------------------------------------

    def stream_logs(
        self,
        *,
        follow: bool = False,
        tail: int | None = None,
        since: datetime | float | None = None,
        timeout_seconds: float | None = None,
    ) -> LogStream:
        """The output of the sandbox's main process as `LogRecord`s (time, stream, data).

        Returns a `LogStream` at once: iterate it with ``for`` or ``async for``. `since` (a
        `datetime`, naive meaning UTC, or unix seconds) keeps only the records written at or
        after that time; `tail` keeps only the last N records written so far (of those since
        `since`; None: all). With `follow` the iteration goes on as the process writes and ends
        when the sandbox ends (or on ``close()``); without, it ends with what was written so
        far. Works on ended sandboxes too (their log is kept). `timeout_seconds` bounds the
        whole stream (default: no limit).

        A stream that breaks because the service could not be reached (it restarted, the
        network dropped) resumes by itself from where it was, with no record lost or given
        twice, as long as the service is back within the client's retry budget (20 s).
        """
        if tail is not None:
            tail = _defaults.byte_count("tail", tail)  # a count of records: a whole number >= 0
        request = pb.StreamLogsRequest(tail=-1 if tail is None else tail, follow=follow)
        if since is not None:
            request.since.FromNanoseconds(_nanoseconds_of(since))

        async def open_() -> LogReader:
            await self._ensure_started()  # a sandbox not started yet is started (as exec does)
            request.sandbox_id = self._require_id()
            client = await self._client()
            return ResumingLogReader(client, request, timeout_seconds)

        return LogStream(open_)

    # -- files ---------------------------------------------------------------------------------

    def read_file(
        self,
        filepath: str,
        *,
        timeout_seconds: float | None = None,
        max_bytes: int | None = None,
    ) -> OperationRef[bytes]:
        """Reads a whole file of the sandbox into memory (streamed in 256 KiB chunks).

        At most `max_bytes` (default `SandboxDefaults.max_read_file_bytes`, 64 MiB): a larger
        file raises `SandboxFileError` naming its size and the cap, before any of it moves (and
        a file that grows past the cap while read stops there). Read big files with
        `read_file_streaming` (chunks) or `download_file` (into a local file), in bounded memory.
        Raises `SandboxFileError` (with ``filepath``) if it is missing, a directory, or
        unreadable. `timeout_seconds` defaults to `request_timeout_seconds`.
        """
        cap = None if max_bytes is None else _defaults.byte_count("max_bytes", max_bytes)
        return OperationRef._of(self._read_file(filepath, timeout_seconds, cap))

    async def _read_file(
        self, filepath: str, timeout_s: float | None, max_bytes: int | None = None
    ) -> bytes:
        await self._ensure_started()
        client = await self._client()
        return await self._observed(
            _files.read_whole(
                client,
                self._require_id(),
                filepath,
                timeout_s or self._request_timeout,
                self._defaults.max_read_file_bytes if max_bytes is None else max_bytes,
            )
        )

    def read_file_streaming(
        self, filepath: str, *, timeout_seconds: float | None = None
    ) -> FileStream:
        """Reads a file of the sandbox as a stream of ``bytes`` chunks, in bounded memory.

        Returns a `FileStream` at once: iterate it with ``for`` or ``async for``; each chunk is
        fetched when asked for, so a file of any size costs a chunk (256 KiB) and the
        connection's window, and a slow consumer holds the transfer back. ``close()`` it (or use
        ``with``) to stop early. Errors (`SandboxFileError` with ``filepath``) are raised by the
        iteration. `timeout_seconds` bounds the whole transfer (default: no limit).
        """
        return FileStream(filepath, lambda: self._open_read(filepath, timeout_seconds))

    def download_file(
        self,
        filepath: str,
        local_path: str | os.PathLike[str],
        *,
        timeout_seconds: float | None = None,
        progress: Progress | None = None,
    ) -> OperationRef[int]:
        """Copies a file of the sandbox to `local_path` on this machine, in bounded memory;
        resolves to the number of bytes written.

        Chunks are written to a temporary file beside `local_path`, renamed into place once the
        whole file arrived: an interrupted download leaves nothing under the real name. The file
        gets the sandbox file's permission bits less set-id bits and group/other write.
        `local_path` must name a file in an existing directory (else `IsADirectoryError` or
        `FileNotFoundError`, raised here). `timeout_seconds` bounds the whole transfer (default:
        no limit). Raises `SandboxFileError` as `read_file` does.

        `progress`, when given, is called as ``progress(done, total)`` (bytes written so far, the
        file's size or None when the service does not know it in advance) once at the start and
        after each chunk, on the SDK's background thread: keep it quick (update a bar).
        """
        target = _files.local_target(local_path)
        return OperationRef._of(
            _files.download(
                lambda: self._open_read(filepath, timeout_seconds), filepath, target, progress
            )
        )

    def upload_file(
        self,
        source: str | os.PathLike[str] | BinaryIO,
        filepath: str,
        *,
        mode: int | None = None,
        make_parents: bool = True,
        timeout_seconds: float | None = None,
        progress: Progress | None = None,
    ) -> OperationRef[int]:
        """Copies `source` (a local path, or a binary file object such as ``sys.stdin.buffer``)
        to `filepath` in the sandbox, in bounded memory; resolves to the number of bytes written.

        The data streams in chunks as it is read, so a file or a pipe of any size costs a chunk
        and the connection's window. `mode`: permission bits (default: the local file's, or
        0o644 for a file object). Missing parent directories are created unless `make_parents`
        is False. A file object is read to its end but not closed. A local path that is missing
        or a directory raises `FileNotFoundError` or `IsADirectoryError` here.
        `timeout_seconds` bounds the whole transfer (default: no limit). `progress` is called as
        ``progress(done, total)`` (total: the size of a regular file, else None), as in
        `download_file`. Raises `SandboxFileError` (with ``filepath``) on failure; never retried
        (a stream cannot be read twice).
        """
        if isinstance(source, str | os.PathLike):
            path = os.fspath(source)
            if os.path.isdir(path):
                raise IsADirectoryError(f"upload_file: {path!r} is a directory")
            opened: BinaryIO = open(path, "rb")  # noqa: SIM115 - closed by the upload
            owned = True
        elif hasattr(source, "read"):
            opened, owned = source, False
        else:
            raise TypeError(
                f"upload_file: source must be a path or a binary file, not {type(source).__name__}"
            )
        total, local_mode = _regular_file_size_and_mode(opened)
        if mode is None:
            mode = local_mode if owned else None
        return OperationRef._of(
            self._upload(
                opened, owned, filepath, mode, make_parents, total, progress, timeout_seconds
            ),
            finish_at_exit=True,
        )

    async def _upload(
        self,
        source: BinaryIO,
        owned: bool,
        filepath: str,
        mode: int | None,
        make_parents: bool,
        total: int | None,
        progress: Progress | None,
        timeout_s: float | None,
    ) -> int:
        try:
            await self._ensure_started()
            client = await self._client()
            return await self._observed(
                _files.upload(
                    client,
                    self._require_id(),
                    filepath,
                    source,
                    mode=mode or 0,
                    make_parents=make_parents,
                    total=total,
                    progress=progress,
                    rpc_timeout=timeout_s,
                    whole_file=owned,
                )
            )
        finally:
            if owned:
                source.close()

    def write_file_streaming(
        self,
        filepath: str,
        chunks: Iterable[bytes] | AsyncIterable[bytes],
        *,
        mode: int | None = None,
        make_parents: bool = True,
        timeout_seconds: float | None = None,
        progress: Progress | None = None,
    ) -> OperationRef[int]:
        """Writes `filepath` in the sandbox from `chunks`, an iterable or async iterable of
        ``bytes`` (a generator producing a file of any size), in bounded memory: each chunk is
        sent before the next is asked for; resolves to the number of bytes written.

        A plain iterable is advanced on a worker thread, so a generator that blocks (reading a
        socket, a subprocess) holds up nothing else. The file appears only once `chunks` ends:
        if it raises, or the transfer is cancelled, nothing is left under `filepath` and the
        error is raised. `mode`: permission bits (default 0o644). `progress(done, None)` is
        called after each chunk. Never retried (an iterator cannot be read twice).
        """
        return OperationRef._of(
            self._write_streaming(filepath, chunks, mode, make_parents, timeout_seconds, progress),
            finish_at_exit=True,
        )

    async def _write_streaming(
        self,
        filepath: str,
        chunks: Iterable[bytes] | AsyncIterable[bytes],
        mode: int | None,
        make_parents: bool,
        timeout_s: float | None,
        progress: Progress | None,
    ) -> int:
        await self._ensure_started()
        client = await self._client()
        header = pb.WriteFileHeader(
            sandbox_id=self._require_id(), path=filepath, mode=mode or 0, make_parents=make_parents
        )

        async def pieces() -> AsyncIterator[bytes]:
            done = 0
            if isinstance(chunks, AsyncIterable):
                source: AsyncIterator[bytes] = aiter(chunks)
            else:
                source = _threaded(iter(chunks))
            async for chunk in source:
                if not isinstance(chunk, bytes | bytearray | memoryview):
                    raise TypeError(
                        f"write_file_streaming: chunks must be bytes, not {type(chunk).__name__}"
                    )
                yield bytes(chunk)
                done += len(chunk)
                if progress is not None:
                    progress(done, None)

        return await self._observed(
            client.transport.write_file_chunks(header, pieces(), call_timeout=timeout_s)
        )

    async def _open_read(self, filepath: str, timeout_s: float | None) -> Any:
        await self._ensure_started()
        client = await self._client()
        opening = _files.open_read(client, self._require_id(), filepath, timeout_s)
        return await self._observed(opening)

    def write_file(
        self,
        filepath: str,
        contents: bytes | bytearray | memoryview | str,
        *,
        mode: int | None = None,
        make_parents: bool = True,
        timeout_seconds: float | None = None,
    ) -> OperationRef[None]:
        """Writes (creates or replaces) a file in the sandbox; str contents are UTF-8 encoded.

        Streamed in 256 KiB chunks, so any size works. `mode`: permission bits (default 0o644).
        Missing parent directories are created unless `make_parents` is False. Raises
        `SandboxFileError` (with ``filepath``) on failure.
        """
        data = contents.encode() if isinstance(contents, str) else contents
        if not isinstance(data, bytes | bytearray | memoryview):
            raise TypeError(
                f"write_file() contents must be bytes or str, not {type(data).__name__}"
            )
        return OperationRef._of(
            self._write_file(
                filepath, memoryview(data).cast("B"), mode, make_parents, timeout_seconds
            ),
            finish_at_exit=True,
        )

    async def _write_file(
        self,
        filepath: str,
        data: memoryview,
        mode: int | None,
        make_parents: bool,
        timeout_s: float | None,
    ) -> None:
        await self._ensure_started()
        client = await self._client()
        await self._observed(
            _files.write_whole(
                client,
                self._require_id(),
                filepath,
                data,
                mode=mode or 0,
                make_parents=make_parents,
                rpc_timeout=timeout_s or self._request_timeout,
            )
        )
