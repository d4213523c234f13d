"""`aviato files ls|stat|rm|mkdir|mv ID PATH`: a sandbox's directories and metadata, through the
SDK's `Sandbox.list_dir`, `stat`, `remove`, `make_dir` and `rename`. (`aviato ls` lists
sandboxes; files are a group of their own.)"""

from __future__ import annotations

import datetime as dt
import stat as stat_module

import click

from aviato import FileEntry, Sandbox
from aviato.cli._output import print_fields, print_json, print_table
from aviato.cli._reach import preflight


def _mode_text(entry: FileEntry) -> str:
    kind = {"dir": stat_module.S_IFDIR, "symlink": stat_module.S_IFLNK}.get(
        entry.type, stat_module.S_IFREG if entry.type == "file" else stat_module.S_IFIFO
    )
    return stat_module.filemode(kind | entry.mode)


def _when(entry: FileEntry) -> str:
    return dt.datetime.fromtimestamp(entry.mtime, dt.UTC).strftime("%Y-%m-%d %H:%M:%S")


def _as_dict(entry: FileEntry) -> dict[str, object]:
    return {
        "name": entry.name,
        "type": entry.type,
        "size": entry.size,
        "mode": f"{entry.mode:04o}",
        "mtime": entry.mtime,
        "target": entry.target or None,
    }


def _sandbox(sandbox_id: str) -> Sandbox:
    preflight()
    return Sandbox.from_id(sandbox_id).result()


@click.group()
def files() -> None:
    """List, describe, remove, make and rename files in a sandbox.

    \b
    Examples:
      aviato files ls sbx-1a2b3c4d5e6f /workspace
      aviato files mkdir -p sbx-1a2b3c4d5e6f /workspace/out/logs
      aviato files mv sbx-1a2b3c4d5e6f /workspace/a.txt /workspace/b.txt
      aviato files rm -r sbx-1a2b3c4d5e6f /workspace/out
    Copy files and trees with `aviato cp` (`cp -r` for directories).
    """


@files.command("ls")
@click.argument("sandbox_id", metavar="ID")
@click.argument("path", default="/")
@click.option("--limit", default=10_000, show_default=True, help="List at most this many.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def ls(sandbox_id: str, path: str, limit: int, as_json: bool) -> None:
    """List the directory PATH of sandbox ID (sorted by name)."""
    if limit < 1:
        raise click.BadParameter("must be 1 or more", param_hint="--limit")
    listing = _sandbox(sandbox_id).list_dir(path, limit=limit).result()
    entries = sorted(listing, key=lambda e: e.name)
    if as_json:
        print_json({"entries": [_as_dict(e) for e in entries], "truncated": listing.truncated})
        return
    rows = [
        [
            _mode_text(e),
            str(e.size),
            _when(e),
            e.name + (f" -> {e.target}" if e.is_symlink else "/" if e.is_dir else ""),
        ]
        for e in entries
    ]
    print_table(["MODE", "SIZE", "MODIFIED (UTC)", "NAME"], rows, wrap=["NAME"])
    if listing.truncated:
        click.echo(f"aviato: only the first {limit} entries (--limit to see more)", err=True)


@files.command("stat")
@click.argument("sandbox_id", metavar="ID")
@click.argument("path")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def stat(sandbox_id: str, path: str, as_json: bool) -> None:
    """Describe PATH in sandbox ID (a symlink itself, not what it points to)."""
    entry = _sandbox(sandbox_id).stat(path).result()
    if as_json:
        print_json(_as_dict(entry))
        return
    fields = [
        ("name", entry.name),
        ("type", entry.type),
        ("size", str(entry.size)),
        ("mode", f"{_mode_text(entry)} ({entry.mode:04o})"),
        ("modified", _when(entry) + " UTC"),
    ]
    if entry.is_symlink:
        fields.append(("target", entry.target))
    print_fields(fields)


@files.command("rm")
@click.argument("sandbox_id", metavar="ID")
@click.argument("paths", nargs=-1, required=True, metavar="PATH...")
@click.option("-r", "--recursive", is_flag=True, help="Remove directories and their contents.")
def rm(sandbox_id: str, paths: tuple[str, ...], recursive: bool) -> None:
    """Remove files, symlinks or (with -r) directories from sandbox ID."""
    sandbox = _sandbox(sandbox_id)
    for path in paths:
        sandbox.remove(path, recursive=recursive).result()


@files.command("mkdir")
@click.argument("sandbox_id", metavar="ID")
@click.argument("paths", nargs=-1, required=True, metavar="PATH...")
@click.option("-p", "--parents", is_flag=True, help="Make parents; no error if it exists.")
@click.option("-m", "--mode", default="755", show_default=True, help="Permission bits, octal.")
def mkdir(sandbox_id: str, paths: tuple[str, ...], parents: bool, mode: str) -> None:
    """Make directories in sandbox ID."""
    try:
        bits = int(mode, 8)
    except ValueError:
        raise click.BadParameter(
            f"{mode!r} is not an octal mode such as 755", param_hint="--mode"
        ) from None
    if not 0 <= bits <= 0o1777:
        raise click.BadParameter(f"{mode!r}: permission bits and sticky only", param_hint="--mode")
    sandbox = _sandbox(sandbox_id)
    for path in paths:
        sandbox.make_dir(path, parents=parents, mode=bits).result()


@files.command("mv")
@click.argument("sandbox_id", metavar="ID")
@click.argument("source")
@click.argument("destination")
def mv(sandbox_id: str, source: str, destination: str) -> None:
    """Rename SOURCE to DESTINATION in sandbox ID."""
    _sandbox(sandbox_id).rename(source, destination).result()
