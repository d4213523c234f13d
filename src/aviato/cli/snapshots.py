"""`aviato snapshot create|ls|rm`: snapshots of sandboxes' writable layers
(docs/state.md). `aviato run --snapshot ID` starts a sandbox from one."""

from __future__ import annotations

import click

from aviato import Sandbox, Snapshot
from aviato.cli._output import print_json, print_table
from aviato.cli._reach import preflight


def _row(snap: Snapshot) -> dict[str, object]:
    return {
        "id": snap.id,
        "sandbox": snap.source_sandbox_id,
        "image": snap.image,
        "size_bytes": snap.size_bytes,
        "entries": snap.entries,
        "created_at": snap.created_at.isoformat() if snap.created_at else "",
    }


@click.group()
def snapshot() -> None:
    """Save a sandbox's files, and start new sandboxes from them.

    \b
    Examples:
      snap=$(aviato snapshot create sbx-1a2b3c4d5e6f)
      aviato run --snapshot "$snap"
      aviato snapshot ls
      aviato snapshot rm "$snap"
    """


@snapshot.command("create")
@click.argument("sandbox_id", metavar="ID")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def create(sandbox_id: str, as_json: bool) -> None:
    """Snapshot a running sandbox's writable layer (frozen meanwhile); prints the id."""
    preflight()
    snap = Sandbox.from_id(sandbox_id).result().snapshot().result()
    if as_json:
        print_json(_row(snap))
    else:
        click.echo(snap.id)


@snapshot.command("ls")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def ls(as_json: bool) -> None:
    """List your snapshots, oldest first."""
    preflight()
    found = Snapshot.list().result()
    if as_json:
        print_json([_row(s) for s in found])
        return
    rows = [[s.id, s.source_sandbox_id, s.image, str(s.size_bytes), str(_row(s)["created_at"])]
            for s in found]  # fmt: skip
    print_table(["ID", "SANDBOX", "IMAGE", "BYTES", "CREATED"], rows)


@snapshot.command("rm")
@click.argument("snapshot_ids", metavar="ID...", nargs=-1, required=True)
def rm(snapshot_ids: tuple[str, ...]) -> None:
    """Delete snapshots (refused while a running sandbox starts from one)."""
    preflight()
    for snapshot_id in snapshot_ids:
        Snapshot.delete(snapshot_id).result()


__all__ = ["snapshot"]
