"""Option values that need parsing: `K=V` pairs, durations, and `ID:/path` copy endpoints.

Each parser raises `click.BadParameter`, so that a bad value is reported as a usage error
(exit status 2) naming the option, before any connection to the service is made. They are option
callbacks rather than `click.ParamType` subclasses: ParamType became generic in recent click, and
a subclass cannot be typed for both the old and the new one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import click

from aviato.v1 import durations, quantities

_F = TypeVar("_F", bound=Callable[..., Any])


def parse_env_pair(text: str) -> tuple[str, str]:
    """`NAME=VALUE`; the value may be empty and may itself contain `=`."""
    name, sep, value = text.partition("=")
    if not sep or not name or any(c.isspace() for c in name):
        raise click.BadParameter(f"{text!r} is not NAME=VALUE")
    return name, value


def parse_duration(text: str, allow_zero: bool = False) -> float:
    """Seconds from `90`, `90s`, `15m`, `2h`, `1d` or sums such as `1h30m`
    (`aviato.v1.durations`, the grammar the service's options share)."""
    try:
        return durations.parse_duration(text, allow_zero)
    except durations.DurationError as e:
        raise click.BadParameter(str(e)) from None


def env_pairs(
    ctx: click.Context, param: click.Parameter, values: tuple[str, ...]
) -> tuple[tuple[str, str], ...]:
    """click callback of a repeatable `-e NAME=VALUE` option."""
    return tuple(parse_env_pair(value) for value in values)


def env_option(help: str = "Set a variable (repeatable).") -> Callable[[_F], _F]:
    """The `-e/--env NAME=VALUE` option, repeatable, parsed into pairs (parameter `env`)."""
    return click.option(
        "-e", "--env", "env", multiple=True, metavar="NAME=VALUE", callback=env_pairs, help=help
    )


def label_pairs(
    ctx: click.Context, param: click.Parameter, values: tuple[str, ...]
) -> dict[str, str]:
    """click callback of a repeatable `LABEL=VALUE` option (`--node-selector`): a label given
    twice with different values is refused (a node carries one value per label)."""
    pairs: dict[str, str] = {}
    for text in values:
        label, sep, value = text.partition("=")
        if not sep or not label or any(c.isspace() for c in label):
            raise click.BadParameter(f"{text!r} is not LABEL=VALUE, e.g. pool=gpu")
        if pairs.get(label, value) != value:
            raise click.BadParameter(f"label {label!r} given twice: {pairs[label]!r} and {value!r}")
        pairs[label] = value
    return pairs


def duration(ctx: click.Context, param: click.Parameter, value: str | None) -> float | None:
    """click callback of a duration option (`--lifetime 2h`); zero is refused."""
    return None if value is None else parse_duration(value)


def duration_or_zero(ctx: click.Context, param: click.Parameter, value: str | None) -> float | None:
    """click callback of a duration option where 0 means "at once" (`--grace 0`)."""
    return None if value is None else parse_duration(value, allow_zero=True)


def absolute_path(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """click callback of a sandbox directory option (`-w /workspace`)."""
    if value is not None and not value.startswith("/"):
        raise click.BadParameter(f"{value!r} is not an absolute path (one starting with /)")
    return value


def size(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """click callback of a size option (`--memory 512Mi`): a usage error unless it is one."""
    if value is not None:
        try:
            quantities.parse_bytes(value)
        except quantities.QuantityError as exc:
            raise click.BadParameter(str(exc)) from None
    return value


def cpus(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """click callback of a cpu option (`--cpu 0.5`): a usage error unless it is one."""
    if value is not None:
        try:
            quantities.parse_cpu_millis(value)
        except quantities.QuantityError as exc:
            raise click.BadParameter(str(exc)) from None
    return value


def listen_address(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """click callback of `--listen HOST:PORT` (`[::1]:PORT` for IPv6): checked before the
    service is started, so that a typo is a usage error and not a service that exits."""
    if value is None:
        return None
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise click.BadParameter(f"{value!r} is not HOST:PORT, e.g. 127.0.0.1:7443")
    return value


@dataclass(frozen=True)
class Endpoint:
    """One side of `aviato cp`: a sandbox path when `sandbox_id` is set, else a host path."""

    path: str
    sandbox_id: str | None = None

    @property
    def is_stdio(self) -> bool:
        return self.sandbox_id is None and self.path == "-"

    def __str__(self) -> str:
        return f"{self.sandbox_id}:{self.path}" if self.sandbox_id else self.path


def parse_endpoint(text: str) -> Endpoint:
    """`ID:/path` names a file in a sandbox; anything else is a host path.

    As with `docker cp`, a colon counts only when the part before it has no `/`, so a host path
    with a colon in it can be written `./a:b`.
    """
    head, sep, tail = text.partition(":")
    if sep and head and "/" not in head:
        if not tail:
            raise click.BadParameter(f"{text!r}: missing path after the sandbox id")
        return Endpoint(path=tail, sandbox_id=head)
    return Endpoint(path=text)
