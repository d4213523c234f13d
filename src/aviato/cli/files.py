"""`aviato cp`: copy one file between the host and a sandbox, in either direction.

Files move in chunks over the ReadFile and WriteFile streams, so their size is not bounded by a
gRPC message. A download is written to a temporary file beside the destination and renamed into
place at the end: an interrupted copy never leaves a truncated file under the real name. The
progress bar appears only on a terminal, and only for files of a size worth watching.
"""

from __future__ import annotations

import contextlib
import os
import stat
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import BinaryIO

import click
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from aviato.cli._output import CliError, stderr_console
from aviato.cli._params import Endpoint, parse_endpoint
from aviato.cli._rpc import Connection, connection
from aviato.v1 import sandbox_pb2 as pb

CHUNK_BYTES = 1024 * 1024
PROGRESS_MIN_BYTES = 4 * 1024 * 1024


def _progress(total: int | None, quiet: bool) -> Progress | None:
    big = total is None or total >= PROGRESS_MIN_BYTES
    if quiet or not big or not sys.stderr.isatty():
        return None
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=stderr_console(),
        transient=True,
    )


def _upload(conn: Connection, src: Endpoint, dst: Endpoint, parents: bool, quiet: bool) -> None:
    assert dst.sandbox_id is not None
    remote = dst.path
    size: int | None = None
    mode = 0o644
    if src.is_stdio:
        if remote.endswith("/"):
            raise CliError("copying from stdin: name the file, e.g. ID:/workspace/data.bin")
        source: BinaryIO = sys.stdin.buffer
    else:
        local = Path(src.path)
        try:
            info = local.stat()
        except OSError as exc:
            raise CliError(f"{src}: {exc.strerror}") from exc
        if stat.S_ISDIR(info.st_mode):
            raise CliError(f"{src} is a directory; aviato cp copies single files")
        size, mode = info.st_size, stat.S_IMODE(info.st_mode)
        if remote.endswith("/"):
            remote = str(PurePosixPath(remote) / local.name)
        source = local.open("rb")
    # Built here, not in frames(): a bad value (a path that is not UTF-8) must fail in this
    # thread with its own message, not inside grpc's request thread.
    try:
        header = pb.WriteFileHeader(
            sandbox_id=dst.sandbox_id, path=remote, mode=mode, make_parents=parents
        )
    except BaseException:
        if not src.is_stdio:
            source.close()
        raise
    bar = _progress(size, quiet)

    def frames() -> Iterator[pb.WriteFileRequest]:
        yield pb.WriteFileRequest(header=header)
        task = bar.add_task(Path(src.path).name, total=size) if bar else None
        while chunk := source.read(CHUNK_BYTES):
            if bar is not None and task is not None:
                bar.advance(task, len(chunk))
            yield pb.WriteFileRequest(data=chunk)
        yield pb.WriteFileRequest(end=True)  # without it the service keeps nothing

    with source, bar or contextlib.nullcontext():
        conn.stub.WriteFile(frames(), metadata=conn.metadata)


def _local_target(dst: Endpoint, remote: str) -> Path:
    target = Path(dst.path)
    if target.is_dir():
        return target / PurePosixPath(remote).name
    if dst.path.endswith("/"):
        raise CliError(f"{dst}: no such directory")
    if not target.parent.is_dir():
        raise CliError(f"{dst}: no such directory {target.parent}")
    return target


def _download(conn: Connection, src: Endpoint, dst: Endpoint, quiet: bool) -> None:
    assert src.sandbox_id is not None
    request = pb.ReadFileRequest(sandbox_id=src.sandbox_id, path=src.path)
    stream = conn.stub.ReadFile(request, metadata=conn.metadata)
    first = next(stream, None)
    if first is None or first.WhichOneof("msg") != "info":
        raise CliError(f"{src}: the service sent no file header")
    size, mode = first.info.size, first.info.mode & 0o777
    if dst.is_stdio:
        for frame in stream:
            sys.stdout.buffer.write(frame.data)
        sys.stdout.buffer.flush()
        return
    target = _local_target(dst, src.path)
    bar = _progress(size, quiet)
    fd, temp_name = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as out, bar or contextlib.nullcontext():
            task = bar.add_task(PurePosixPath(src.path).name, total=size) if bar else None
            for frame in stream:
                out.write(frame.data)
                if bar is not None and task is not None:
                    bar.advance(task, len(frame.data))
        # the sandbox's bits, but never set-id or writable by group and others on this host
        os.chmod(temp_name, (mode & 0o755) | 0o600 if mode else 0o644)
        os.replace(temp_name, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp_name)
        raise


@click.command()
@click.argument("src", metavar="SRC")
@click.argument("dst", metavar="DST")
@click.option(
    "-p", "--parents", is_flag=True, help="Create missing directories inside the sandbox."
)
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def cp(src: str, dst: str, parents: bool, quiet: bool) -> None:
    """Copy a file between the host and a sandbox.

    One of SRC and DST is ID:/path (a file in a sandbox), the other a host path, or `-` for
    stdin/stdout. A destination ending in `/`, or an existing host directory, receives the file
    under its own name. A progress bar shows on a terminal for files over 4 MiB.

    \b
    Examples:
      aviato cp data.csv sb-1a2b3c:/workspace/
      aviato cp sb-1a2b3c:/workspace/result.json ./result.json
      tar cz src | aviato cp - sb-1a2b3c:/tmp/src.tgz
    """
    source, target = parse_endpoint(src), parse_endpoint(dst)
    if source.sandbox_id and target.sandbox_id:
        raise click.UsageError("both SRC and DST are in sandboxes; copy through the host")
    if not source.sandbox_id and not target.sandbox_id:
        raise click.UsageError("one of SRC and DST must be ID:/path")
    with connection() as conn:
        if target.sandbox_id:
            _upload(conn, source, target, parents, quiet)
        else:
            _download(conn, source, target, quiet)
