"""`aviato pause | resume | extend`: freezing a sandbox where it is, letting it continue, and
giving it more lifetime, through the public SDK (`Sandbox.pause`, `resume`, `extend`)."""

from __future__ import annotations

from collections.abc import Callable

import click

from aviato import OperationRef, Sandbox
from aviato.cli._output import describe, print_error
from aviato.cli._params import parse_duration
from aviato.cli._reach import preflight


def _each(sandbox_ids: tuple[str, ...], act: Callable[[Sandbox], OperationRef[None]]) -> None:
    """Starts `act` on every sandbox at once, then prints each id that succeeded on stdout and
    one error line per failure; exits 1 if any failed."""
    preflight()
    started: list[tuple[str, OperationRef[None] | BaseException]] = []
    for sid in sandbox_ids:
        try:
            started.append((sid, act(Sandbox.from_id(sid).result())))
        except Exception as exc:
            started.append((sid, exc))
    failed = False
    for sid, outcome in started:
        try:
            if isinstance(outcome, BaseException):
                raise outcome
            outcome.result()
            click.echo(sid)
        except Exception as exc:
            failed = True
            print_error(describe(exc))
    if failed:
        raise SystemExit(1)


@click.command()
@click.argument("sandbox_ids", nargs=-1, required=True, metavar="ID...")
def pause(sandbox_ids: tuple[str, ...]) -> None:
    """Freeze sandboxes where they are: they use no CPU (their memory stays theirs) until
    `aviato resume`. Commands, file copies and port connections are refused meanwhile; the
    lifetime keeps running (see `aviato extend`).

    \b
    Examples:
      aviato pause sbx-1a2b3c4d5e6f
      aviato ls -q --tag eval | xargs aviato pause
    """
    _each(sandbox_ids, lambda sb: sb.pause())


@click.command()
@click.argument("sandbox_ids", nargs=-1, required=True, metavar="ID...")
def resume(sandbox_ids: tuple[str, ...]) -> None:
    """Let paused sandboxes continue from where they were.

    \b
    Examples:
      aviato resume sbx-1a2b3c4d5e6f
    """
    _each(sandbox_ids, lambda sb: sb.resume())


@click.command()
@click.argument("sandbox_id", metavar="ID")
@click.argument("duration", metavar="DURATION")
def extend(sandbox_id: str, duration: str) -> None:
    """Make a sandbox's lifetime end DURATION later (90s, 30m, 8h); never beyond the service's
    maximum lifetime (7 days from its creation).

    \b
    Examples:
      aviato extend sbx-1a2b3c4d5e6f 2h
    """
    try:
        seconds = parse_duration(duration)
    except click.BadParameter as exc:
        raise click.BadParameter(str(exc.message), param_hint="DURATION") from None
    _each((sandbox_id,), lambda sb: sb.extend(seconds))
