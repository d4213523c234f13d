"""`aviato keys`: create, list and revoke the API keys that remote clients present.

These commands open the service's registry file directly (SQLite arbitrates with a running
service), so they work whether or not the service runs, and only for a user who can read the
state directory: owning the files is the authority to issue keys. A key's plaintext is shown
once, at creation; the registry keeps only its hash.
"""

from __future__ import annotations

import contextlib
import datetime as dt
from collections.abc import Iterator
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
