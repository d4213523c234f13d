"""`aviato keys`: create, list and revoke the API keys that remote clients present, and set
owners' own quotas.

These commands are clients of the service's Admin API (`aviato/v1/admin.proto`). It is served
only on the service's unix socket, whose mode 0600 makes its user the only one who can connect:
being the service's user is the authority to issue keys. So they always speak to the service of
the state directory (`--state-dir`), never to AVIATO_BASE_URL, and start it there when it is not
running, as every command does. A key's plaintext is shown once, at creation; the registry
keeps only its hash.

They use the SDK's `aviato.Admin`; `_admin` is the one place that turns its errors into lines.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import click

from aviato import Admin, OwnerQuota
from aviato.cli._output import CliError, age, iso, print_json, print_table
from aviato.exceptions import AviatoError
from aviato.v1 import quantities
from aviato.v1.quantities import format_bytes, format_cpu

# The Admin API's request fields that are options of these commands.
_OPTION_OF_FIELD = {"owner": "--owner", "name": "--name", "quota.owner": "--owner", "key_id": "ID"}


def _text(value: str, hint: str) -> str:
    """`value`, refused as a usage error if it cannot travel as text (undecodable bytes)."""
    try:
        value.encode()
    except UnicodeEncodeError:
        message = "must be text (it holds bytes that are not UTF-8)"
        raise click.BadParameter(message, param_hint=hint) from None
    return value


def _user_words(exc: AviatoError) -> str:
    """The service's message, with a request field named as the option that set it."""
    text = str(exc).splitlines()[0] if str(exc) else (exc.code or "the service refused")
    _, sep, reason = text.partition(" failed: ")  # the SDK's "<operation> failed: " lead
    details = reason if sep else text
    field, sep, problem = details.partition(": ")
    if sep and field in _OPTION_OF_FIELD:
        return f"{_OPTION_OF_FIELD[field]}: {problem}"
    return details


@contextlib.contextmanager
def _admin(state_dir: str | None) -> Iterator[Admin]:
    """The Admin API of the state directory's service (started if it is not running); a failed
    call leaves the block as a CliError."""
    try:
        yield Admin(state_dir)
    except AviatoError as exc:
        raise CliError(_user_words(exc)) from None


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
    with _admin(state_dir) as admin:
        created = admin.create_key(_text(owner, "--owner"), _text(name, "--name"))
    click.echo(created.secret)
    click.echo(
        f"created {created.key.id} for owner {created.key.owner!r}; "
        "store it now, it is not shown again",
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
    with _admin(state_dir) as admin:
        found = admin.list_keys(None if owner is None else _text(owner, "--owner"))
    if as_json:
        print_json(
            [
                {
                    "id": k.id,
                    "owner": k.owner,
                    "name": k.name,
                    "created_at": iso(k.created_at),
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
            age(k.created_at),
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
    missing: list[str] = []
    with _admin(state_dir) as admin:
        for key_id in key_ids:
            if not key_id.isprintable() or len(key_id) > 64:
                missing.append(repr(key_id)[1:-1])  # no key has such an id
                continue
            try:
                admin.revoke_key(key_id)
            except AviatoError as exc:
                if exc.code != "NOT_FOUND":
                    raise
                missing.append(key_id)
            else:
                click.echo(f"revoked {key_id}")
    if missing:
        raise CliError(f"no active key with id {', '.join(missing)}")


_DEFAULT = -1  # an option said "default": the owner's own value is removed


def _quota_value(kind: str) -> Callable[[click.Context, click.Parameter, str | None], int | None]:
    """A click callback: "default" (or unset) → None, else a count, cores or bytes (0: none)."""

    def parse(ctx: click.Context, param: click.Parameter, text: str | None) -> int | None:
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
    asked = {"max_sandboxes": max_sandboxes, "max_cpu_millis": max_cpu,
             "max_memory_bytes": max_memory, "max_disk_bytes": max_disk}  # fmt: skip
    changing = reset or any(v is not None for v in asked.values())
    if changing and not owner:
        raise click.UsageError("say whose quota to set: --owner NAME")
    if owner is not None and (not owner or len(owner) > 128 or not owner.isprintable()):
        raise click.BadParameter("must be 1 to 128 printable characters", param_hint="--owner")
    with _admin(state_dir) as admin:
        if changing:
            assert owner is not None
            current = admin.owner_quotas(owner)[0]
            values: dict[str, int | None] = {}
            for name, new in asked.items():
                kept = None if reset else getattr(current, name)
                values[name] = kept if new is None else (None if new == _DEFAULT else new)
            admin.set_owner_quota(
                OwnerQuota(
                    owner=owner,
                    max_sandboxes=values["max_sandboxes"],
                    max_cpu_millis=values["max_cpu_millis"],
                    max_memory_bytes=values["max_memory_bytes"],
                    max_disk_bytes=values["max_disk_bytes"],
                )
            )
        rows = admin.owner_quotas(owner)
    # (the JSON keys predate the Admin API's field names: they stay as scripts read them)
    kinds = (("sandboxes", "max_sandboxes", "count"), ("cpu_millis", "max_cpu_millis", "cpu"),
             ("memory_bytes", "max_memory_bytes", "bytes"),
             ("disk_bytes", "max_disk_bytes", "bytes"))  # fmt: skip

    def value_of(row: OwnerQuota, field: str) -> int | None:
        value: int | None = getattr(row, field)
        return value

    if as_json:
        print_json([{"owner": r.owner, **{key: value_of(r, f) for key, f, _ in kinds}}
                    for r in rows])  # fmt: skip
        return
    print_table(
        ["OWNER", "SANDBOXES", "CPU", "MEMORY", "DISK"],
        [[r.owner, *(_show_quota(value_of(r, f), k) for _, f, k in kinds)] for r in rows],
    )
