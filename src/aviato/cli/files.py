"""`aviato cp`: copy one file (or, with -r, a directory tree) between the host and a sandbox,
in either direction.

Files move through the SDK's streaming transfers (`Sandbox.upload_file`, `download_file`,
`read_file_streaming`), in chunks, so their size is not bounded by a message and memory stays
at a chunk. A download is written to a temporary file beside the destination and renamed into
place at the end: an interrupted copy never leaves a truncated file under the real name. The
progress bar appears only on a terminal, and only for files of a size worth watching; it is fed
by the SDK's ``progress(done, total)`` callback, which runs on the SDK's thread (rich's bar is
made for updates from other threads).
"""

from __future__ import annotations

import stat
import sys
from pathlib import Path, PurePosixPath
from typing import BinaryIO

import click
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from aviato import Sandbox
from aviato.cli._output import CliError, stderr_console
from aviato.cli._params import Endpoint, parse_endpoint
from aviato.cli._reach import preflight

PROGRESS_MIN_BYTES = 4 * 1024 * 1024


class _ProgressBar:
    """A transfer's bar, made on the first report once the size is known (big or unknown
    sizes only, on a terminal only, never with --quiet); a callable for the SDK's `progress`."""

    def __init__(self, name: str, quiet: bool) -> None:
        self.name = name
        self.enabled = not quiet and sys.stderr.isatty()
        self.bar: Progress | None = None
        self.task: TaskID | None = None

    def __call__(self, done: int, total: int | None) -> None:
        if not self.enabled:
            return
        if self.bar is None:
            if total is not None and total < PROGRESS_MIN_BYTES:
                self.enabled = False
                return
            self.bar = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                DownloadColumn(),
                TransferSpeedColumn(),
                TimeRemainingColumn(),
                console=stderr_console(),
                transient=True,
            )
            self.bar.start()
            self.task = self.bar.add_task(self.name, total=total)
        assert self.task is not None
        self.bar.update(self.task, completed=done)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def _upload(src: Endpoint, dst: Endpoint, parents: bool, quiet: bool) -> None:
    assert dst.sandbox_id is not None
    remote = dst.path
    if src.is_stdio:
        if remote.endswith("/"):
            raise CliError("copying from stdin: name the file, e.g. ID:/workspace/data.bin")
        source: BinaryIO | Path = sys.stdin.buffer
    else:
        local = Path(src.path)
        try:
            info = local.stat()
        except OSError as exc:
            raise CliError(f"{src}: {exc.strerror}") from exc
        if stat.S_ISDIR(info.st_mode):
            raise CliError(f"{src} is a directory; copy it with aviato cp -r")
        if remote.endswith("/"):
            remote = str(PurePosixPath(remote) / local.name)
        source = local
    sandbox = Sandbox.from_id(dst.sandbox_id).result()
    bar = _ProgressBar(Path(src.path).name, quiet)
    try:
        sandbox.upload_file(source, remote, make_parents=parents, progress=bar).result()
    finally:
        bar.close()


def _local_target(dst: Endpoint, remote: str) -> Path:
    target = Path(dst.path)
    if target.is_dir():
        return target / PurePosixPath(remote).name
    if dst.path.endswith("/"):
        raise CliError(f"{dst}: no such directory")
    if not target.parent.is_dir():
        raise CliError(f"{dst}: no such directory {target.parent}")
    return target


def _download(src: Endpoint, dst: Endpoint, quiet: bool) -> None:
    assert src.sandbox_id is not None
    sandbox = Sandbox.from_id(src.sandbox_id).result()
    if dst.is_stdio:
        with sandbox.read_file_streaming(src.path) as chunks:
            for chunk in chunks:
                sys.stdout.buffer.write(chunk)
        sys.stdout.buffer.flush()
        return
    target = _local_target(dst, src.path)
    bar = _ProgressBar(PurePosixPath(src.path).name, quiet)
    try:
        sandbox.download_file(src.path, target, progress=bar).result()
    finally:
        bar.close()


def _copy_tree(src: Endpoint, dst: Endpoint, quiet: bool) -> None:
    if src.is_stdio or dst.is_stdio:
        raise click.UsageError("-r copies directories; '-' (stdin/stdout) is for single files")
    name = PurePosixPath(src.path.rstrip("/") or "/").name
    target = dst.path
    if target.endswith("/") and name:
        target = target + name
    bar = _ProgressBar(name or "/", quiet)
    try:
        if dst.sandbox_id:
            if not Path(src.path).is_dir():
                raise CliError(f"{src}: no such directory")
            sandbox = Sandbox.from_id(dst.sandbox_id).result()
            sandbox.upload_dir(src.path, target, progress=bar).result()
        else:
            assert src.sandbox_id is not None
            if not Path(target).parent.is_dir():
                raise CliError(f"{dst}: no such directory {Path(target).parent}")
            sandbox = Sandbox.from_id(src.sandbox_id).result()
            sandbox.download_dir(src.path, target, progress=bar).result()
    finally:
        bar.close()


@click.command()
@click.argument("src", metavar="SRC")
@click.argument("dst", metavar="DST")
@click.option(
    "-p", "--parents", is_flag=True, help="Create missing directories inside the sandbox."
)
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@click.option("-r", "--recursive", is_flag=True, help="Copy a directory tree.")
def cp(src: str, dst: str, parents: bool, quiet: bool, recursive: bool) -> None:
    """Copy a file between the host and a sandbox.

    One of SRC and DST is ID:/path (a file in a sandbox), the other a host path, or `-` for
    stdin/stdout. A destination ending in `/`, or an existing host directory, receives the file
    under its own name. A progress bar shows on a terminal for files over 4 MiB.

    \b
    Examples:
      aviato cp data.csv sbx-1a2b3c4d5e6f:/workspace/
      aviato cp sbx-1a2b3c4d5e6f:/workspace/result.json ./result.json
      tar cz src | aviato cp - sbx-1a2b3c4d5e6f:/tmp/src.tgz
      aviato cp -r ./repo sbx-1a2b3c4d5e6f:/workspace/repo
      aviato cp -r sbx-1a2b3c4d5e6f:/workspace/out ./out

    With -r, the directory SRC's contents go to the directory DST (made if missing; ending in
    `/`, DST receives the tree under SRC's name), modes, times and symlinks kept.
    """
    source, target = parse_endpoint(src), parse_endpoint(dst)
    if source.sandbox_id and target.sandbox_id:
        raise click.UsageError("both SRC and DST are in sandboxes; copy through the host")
    if not source.sandbox_id and not target.sandbox_id:
        raise click.UsageError("one of SRC and DST must be ID:/path")
    preflight()
    if recursive:
        _copy_tree(source, target, quiet)
    elif target.sandbox_id:
        _upload(source, target, parents, quiet)
    else:
        _download(source, target, quiet)
