"""`aviato secret`: store, list and remove your secrets (docs/secrets.md), through the SDK's
`aviato.Secret`; `aviato run --secret NAME` gives one to a sandbox.

A value never comes from the command line, whose words other users of the machine can read in
/proc and which shells keep in their history: it is read from stdin (one trailing newline
dropped, so that `echo "$KEY" | aviato secret create KEY` stores the key), from a hidden prompt
when stdin is a terminal, or from an environment variable of this command (`--from-env VAR`).
"""

from __future__ import annotations

import os
import sys

import click

from aviato import AviatoError, Secret
from aviato.cli._output import CliError, age, describe, iso, print_json, print_table
from aviato.cli._reach import preflight

MAX_SECRET_BYTES = 64 * 1024  # the service's bound on a value (docs/secrets.md)


def _read_value(from_env: str | None) -> str:
    if from_env is not None:
        value = os.environ.get(from_env)
        if value is None:
            raise click.BadParameter(
                f"{from_env} is not set in this environment", param_hint="--from-env"
            )
        return value
    if sys.stdin.isatty():
        value = click.prompt("Value", hide_input=True, err=True, prompt_suffix=" (hidden): ")
        return str(value)
    data = sys.stdin.buffer.read(MAX_SECRET_BYTES + 2)
    if len(data) > MAX_SECRET_BYTES + 1:
        raise CliError(f"the value on stdin is larger than {MAX_SECRET_BYTES} bytes")
    if data.endswith(b"\n"):
        data = data[:-2] if data.endswith(b"\r\n") else data[:-1]
    if not data:
        raise CliError("no value on stdin: pipe it in, or use --from-env VAR")
    try:
        return data.decode()
    except UnicodeDecodeError:
        raise CliError("the value on stdin is not UTF-8 text") from None


@click.group()
def secret() -> None:
    """Store, list and remove your secrets.

    A secret is a value the service keeps encrypted and puts into the environment of the
    sandboxes that name it (`aviato run --secret NAME`), under its own name. Nothing shows a
    value back: `ls` lists names and dates.

    \b
    Examples:
      aviato secret create OPENAI_API_KEY            # asks for the value, hidden
      printf %s "$TOKEN" | aviato secret create HF_TOKEN
      aviato secret create GITHUB_TOKEN --from-env GITHUB_TOKEN
      aviato run --secret OPENAI_API_KEY -- python3 agent.py
      aviato secret ls
      aviato secret rm HF_TOKEN
    """


@secret.command("create")
@click.argument("name")
@click.option(
    "--from-env",
    "from_env",
    metavar="VAR",
    help="Take the value from this variable of your environment (not from stdin).",
)
@click.option("--replace", is_flag=True, help="Give an existing secret a new value.")
def create(name: str, from_env: str | None, replace: bool) -> None:
    """Store a secret NAME (the name of the environment variable it becomes).

    The value is read from stdin (one trailing newline dropped), from a hidden prompt when
    stdin is a terminal, or with --from-env from a variable; never from an argument. Sandboxes
    already running keep the value they started with.
    """
    value = _read_value(from_env)
    preflight()
    made = Secret.create(name, value, replace=replace).result()
    click.echo(made.name)


@secret.command("ls")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def ls(as_json: bool) -> None:
    """List your secrets: names and dates, never values."""
    preflight()
    found = Secret.list().result()
    if as_json:
        print_json(
            [
                {"name": s.name, "created_at": iso(s.created_at), "updated_at": iso(s.updated_at)}
                for s in found
            ]
        )
        return
    rows = [[s.name, age(s.created_at), age(s.updated_at)] for s in found]
    print_table(["NAME", "CREATED", "UPDATED"], rows)


@secret.command("rm")
@click.argument("names", nargs=-1, required=True, metavar="NAME...")
def rm(names: tuple[str, ...]) -> None:
    """Remove secrets. Sandboxes already running keep their values until they end."""
    preflight()
    failed = False
    for name in names:
        try:
            Secret.delete(name).result()
        except AviatoError as exc:
            sys.stderr.write(f"aviato: error: {describe(exc)}\n")
            failed = True
            continue
        click.echo(name)
    if failed:
        raise click.exceptions.Exit(1)
