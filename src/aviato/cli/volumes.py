"""`aviato volume`: list and remove the caller's named volumes (docs/volumes.md).

A volume is created by the first sandbox that mounts it (`aviato run -v NAME:/path`, or
``Sandbox.run(volumes={"/path": Volume("NAME")})``). These use the SDK's `aviato.Volumes`.
"""

from __future__ import annotations

import sys

import click

from aviato import AviatoError, HostMount, Volume, Volumes
from aviato.cli._output import age, describe, human_bytes, iso, print_json, print_table


def parse_volume_options(values: tuple[str, ...]) -> dict[str, Volume | HostMount] | None:
    """`-v NAME:/path[:OPTIONS]` (OPTIONS: `ro` or `rw`, and `size=QUANTITY` for a new
    volume, comma-separated) and `-v /host/dir:/path` (a host directory, always read-only) as
    the SDK's ``volumes``; a bad one is a usage error naming it."""
    mounts: dict[str, Volume | HostMount] = {}
    expected = "expected NAME:/path[:ro][,size=10Gi] or /host/dir:/path"
    for value in values:
        parts = value.split(":")
        options = parts.pop().split(",") if len(parts) == 3 else []
        sizes = [o.removeprefix("size=") for o in options if o.startswith("size=")]
        modes = [o for o in options if not o.startswith("size=")]
        if (
            len(parts) != 2
            or not parts[0]
            or not parts[1]
            or len(sizes) > 1
            or len(modes) > 1
            or any(m not in ("ro", "rw") for m in modes)
        ):
            raise click.BadParameter(f"{value!r}: {expected}", param_hint="-v")
        source, path = parts
        if path in mounts:
            raise click.BadParameter(f"{path!r} is mounted twice", param_hint="-v")
        try:
            if source.startswith("/"):
                if options:
                    raise click.BadParameter(
                        f"{value!r}: a host directory takes no options (it is read-only)",
                        param_hint="-v",
                    )
                mounts[path] = HostMount(source)
            else:
                size = sizes[0] if sizes else None
                mounts[path] = Volume(source, read_only=modes == ["ro"], size=size)
        except AviatoError as exc:
            raise click.BadParameter(str(exc), param_hint="-v") from None
    return mounts or None


@click.group()
def volume() -> None:
    """List and remove your volumes.

    \b
    Examples:
      aviato run -v cache:/cache -- sh -c 'echo hi > /cache/greeting'
      aviato run -v cache:/cache:ro -v /data/datasets/imagenet:/datasets
      aviato volume ls
      aviato volume rm cache
    """


@volume.command("ls")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def ls(as_json: bool) -> None:
    """List your volumes, each measured now."""
    volumes = Volumes.list()
    if as_json:
        print_json(
            [
                {
                    "name": v.name,
                    "size_bytes": v.size_bytes,
                    "max_size_bytes": v.max_size_bytes,
                    "size_enforced": v.size_enforced,
                    "node": v.node,
                    "created_at": iso(v.created_at),
                    "used_by": list(v.used_by),
                }
                for v in volumes
            ]
        )
        return
    nodes = any(v.node for v in volumes)
    rows = [
        [
            v.name,
            human_bytes(v.size_bytes),
            _bound(v.max_size_bytes, v.size_enforced),
            *([v.node[:12] or "-"] if nodes else []),
            age(v.created_at),
            ", ".join(v.used_by) or "-",
        ]
        for v in volumes
    ]
    heads = ["NAME", "USED", "SIZE", *(["NODE"] if nodes else []), "CREATED", "USED BY"]
    print_table(heads, rows, wrap=["USED BY"])


def _bound(max_size_bytes: int, enforced: bool) -> str:
    """A sized volume's size; an older volume's measured bound, marked with "~"."""
    if not max_size_bytes:
        return "-"
    return human_bytes(max_size_bytes) if enforced else "~" + human_bytes(max_size_bytes)


@volume.command("rm")
@click.argument("names", nargs=-1, required=True)
def rm(names: tuple[str, ...]) -> None:
    """Remove volumes and their files (refused for a volume a live sandbox mounts)."""
    failed = False
    for name in names:
        try:
            Volumes.delete(name)
        except AviatoError as exc:
            sys.stderr.write(f"aviato: error: {name}: {_reason(exc)}\n")
            failed = True
            continue
        sys.stdout.write(name + "\n")
    if failed:
        raise click.exceptions.Exit(1)


def _reason(exc: AviatoError) -> str:
    """The service's reason, without the SDK's "delete volume X failed: " lead."""
    text = describe(exc)
    head, sep, rest = text.partition(" failed: ")
    return rest if sep and head.startswith("delete volume ") else text
