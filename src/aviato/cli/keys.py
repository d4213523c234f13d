"""`aviato keys`: create, list and revoke the API keys that remote clients present.

These commands open the service's registry file directly (SQLite arbitrates with a running
service), so they work whether or not the service runs, and only for a user who can read the
state directory: owning the files is the authority to issue keys. A key's plaintext is shown
once, at creation; the registry keeps only its hash.
"""

from __future__ import annotations

import contextlib
import datetime as dt
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import click

from aviato._private import private_dir
from aviato.cli._output import CliError, age, iso, print_json, print_table

if TYPE_CHECKING:
    from aviato.server.registry import Registry

REGISTRY_NAME = "registry.db"


@contextlib.contextmanager
def _registry(state_dir: str | None) -> Iterator[Registry]:
    from aviato.server.config import resolve_state_dir
    from aviato.server.registry import Registry

    directory: Path = resolve_state_dir(state_dir)
    try:
        private_dir(directory)
        registry = Registry(directory / REGISTRY_NAME)
    except OSError as exc:
        raise CliError(f"cannot open the registry in {directory}: {exc.strerror or exc}") from exc
    try:
        yield registry
    finally:
        registry.close()


def _when(created_ns: int) -> dt.datetime:
    return dt.datetime.fromtimestamp(created_ns / 1e9, tz=dt.UTC)


state_dir_option = click.option(
    "--state-dir",
    type=click.Path(file_okay=False),
    envvar="AVIATO_STATE_DIR",
    help="State directory of the service [env AVIATO_STATE_DIR; default ~/.local/state/aviato].",
)


@click.group()
def keys() -> None:
    """Manage API keys for remote clients.

    Keys are what clients of `aviato server --listen` present.

    Each key belongs to an owner; a client sees only its owner's sandboxes. Owner `local` is the
    owner of calls on the unix socket, so a `local` key shares the sandboxes of this machine's
    user. Clients send the key in AVIATO_API_KEY.

    \b
    Examples:
      aviato keys create --owner alice
      aviato keys list
      aviato keys revoke key_1a2b3c4d5e6f
    """


@keys.command()
@click.option(
    "--owner",
    default="local",
    show_default=True,
    help="Whose sandboxes the key reaches; each owner sees only their own.",
)
@click.option("--name", default="", help="A note to recognise the key by, e.g. 'ci runner'.")
@state_dir_option
def create(owner: str, name: str, state_dir: str | None) -> None:
    """Create a key and print it. It is shown only this once.

    The key alone goes to stdout, so that it can be captured; what it is goes to stderr.

    \b
    Examples:
      aviato keys create --owner alice --name laptop
      export AVIATO_API_KEY=$(aviato keys create --owner ci)
    """
    from aviato.server.auth import create_key

    with _registry(state_dir) as registry:
        info, secret = create_key(registry, owner, name)
    click.echo(secret)
    click.echo(
        f"created {info.id} for owner {info.owner!r}; store it now, it is not shown again",
        err=True,
    )


@keys.command("list")
@click.option("--owner", help="Only the keys of this owner.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@state_dir_option
def list_(owner: str | None, as_json: bool, state_dir: str | None) -> None:
    """List keys (never their secrets), revoked ones included.

    \b
    Examples:
      aviato keys list
      aviato keys list --owner alice --json
    """
    from aviato.server.auth import list_keys

    with _registry(state_dir) as registry:
        found = list_keys(registry, owner)
    if as_json:
        print_json(
            [
                {
                    "id": k.id,
                    "owner": k.owner,
                    "name": k.name,
                    "created_at": iso(_when(k.created_ns)),
                    "revoked": k.revoked,
                }
                for k in found
            ]
        )
        return
    rows = [
        [
            k.id,
            k.owner,
            k.name or "-",
            age(_when(k.created_ns)),
            "revoked" if k.revoked else "active",
        ]
        for k in found
    ]
    print_table(["ID", "OWNER", "NAME", "AGE", "STATE"], rows, wrap=("NAME",))


@keys.command()
@click.argument("key_ids", nargs=-1, required=True, metavar="ID...")
@state_dir_option
def revoke(key_ids: tuple[str, ...], state_dir: str | None) -> None:
    """Revoke keys; calls presenting them are refused from then on.

    \b
    Example:
      aviato keys revoke key_1a2b3c4d5e6f
    """
    from aviato.server.auth import revoke_key

    missing: list[str] = []
    with _registry(state_dir) as registry:
        for key_id in key_ids:
            if revoke_key(registry, key_id):
                click.echo(f"revoked {key_id}")
            else:
                missing.append(key_id)
    if missing:
        raise CliError(f"no active key with id {', '.join(missing)}")


_DEFAULT = -1  # an option said "default": the owner's own value is removed


def _quota_value(kind: str) -> Callable[[click.Context, click.Parameter, str | None], int | None]:
    """A click callback: "default" (or unset) → None, else a count, cores or bytes (0: none)."""

    def parse(ctx: click.Context, param: click.Parameter, text: str | None) -> int | None:
        from aviato.server import quantities

        if text is None:
            return None
        if text == "default":
            return _DEFAULT
        try:
            if kind == "count":
                if not text.isdigit():
                    raise quantities.QuantityError(f"{text!r} is not a whole number")
                return int(text)
            value = (
                quantities.parse_cpu_millis(text) if kind == "cpu" else quantities.parse_bytes(text)
            )
        except quantities.QuantityError as exc:
            raise click.BadParameter(f"{exc}; or 0 for no bound, or 'default'") from None
        return value

    return parse


def _show_quota(value: int | None, kind: str) -> str:
    from aviato.server.quotas import format_bytes, format_cpu

    if value is None:
        return "default"
    if value == 0:
        return "no bound"
    if kind == "cpu":
        return format_cpu(value)
    return format_bytes(value) if kind == "bytes" else str(value)


@keys.command()
@click.option("--owner", help="The owner whose quota to set (without any option: to show).")
@click.option("--max-sandboxes", metavar="N", callback=_quota_value("count"),
              help="Live sandboxes at most.")  # fmt: skip
@click.option("--max-cpu", metavar="CPUS", callback=_quota_value("cpu"),
              help="Sum of cpu limits, e.g. 4 or 2500m.")  # fmt: skip
@click.option("--max-memory", metavar="QUANTITY", callback=_quota_value("bytes"),
              help="Sum of memory limits, e.g. 16Gi.")  # fmt: skip
@click.option("--max-disk", metavar="QUANTITY", callback=_quota_value("bytes"),
              help="Sum of disk sizes, e.g. 50Gi.")  # fmt: skip
@click.option("--reset", is_flag=True, help="Back to the service's defaults for this owner.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@state_dir_option
def quota(
    owner: str | None,
    max_sandboxes: int | None,
    max_cpu: int | None,
    max_memory: int | None,
    max_disk: int | None,
    reset: bool,
    as_json: bool,
    state_dir: str | None,
) -> None:
    """Set or show owners' own quotas, in place of the service's defaults.

    A quota bounds what an owner's live sandboxes hold together. The service's defaults
    (`aviato server --owner-max-sandboxes/--owner-max-cpu/--owner-max-memory/--owner-max-disk`)
    apply to every owner; values set here replace them for one owner, from the next create on.
    0 means no bound; 'default' goes back to the service's value. Without --owner, lists the
    owners that have values of their own.

    \b
    Examples:
      aviato keys quota --owner alice --max-sandboxes 20 --max-memory 32Gi
      aviato keys quota --owner ci --max-cpu 0
      aviato keys quota --owner alice --max-memory default
      aviato keys quota --owner alice --reset
      aviato keys quota
    """
    from aviato.server.registry import OwnerQuotaRecord

    asked = {"sandboxes": max_sandboxes, "cpu_millis": max_cpu, "memory_bytes": max_memory,
             "disk_bytes": max_disk}  # fmt: skip
    changing = reset or any(v is not None for v in asked.values())
    if changing and not owner:
        raise click.UsageError("say whose quota to set: --owner NAME")
    if owner is not None and (not owner or len(owner) > 128 or not owner.isprintable()):
        raise click.BadParameter("must be 1 to 128 printable characters", param_hint="--owner")
    with _registry(state_dir) as registry:
        if changing:
            assert owner is not None
            current = registry.get_owner_quota(owner) or OwnerQuotaRecord(owner)
            values: dict[str, int | None] = {}
            for name, new in asked.items():
                kept = None if reset else getattr(current, name)
                values[name] = kept if new is None else (None if new == _DEFAULT else new)
            registry.set_owner_quota(OwnerQuotaRecord(owner, **values))
        rows = (
            [registry.get_owner_quota(owner) or OwnerQuotaRecord(owner)]
            if owner
            else registry.list_owner_quotas()
        )
    kinds = (("sandboxes", "count"), ("cpu_millis", "cpu"), ("memory_bytes", "bytes"),
             ("disk_bytes", "bytes"))  # fmt: skip
    if as_json:
        print_json([{"owner": r.owner, **{n: getattr(r, n) for n, _ in kinds}} for r in rows])
        return
    print_table(
        ["OWNER", "SANDBOXES", "CPU", "MEMORY", "DISK"],
        [[r.owner, *(_show_quota(getattr(r, n), k) for n, k in kinds)] for r in rows],
    )
