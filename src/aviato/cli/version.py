"""`aviato version`: this client's version and, when one answers, the service's.

The service is only asked, never started: `version` must answer on a machine where nothing runs,
and quickly when the service is down (one short deadline).
"""

from __future__ import annotations

import platform
import sys

import click

from aviato import AviatoError, __version__, server_info
from aviato.cli._output import describe
from aviato.cli._reach import base_url
from aviato.v1 import endpoint

_SERVER_DEADLINE_SECONDS = 2.0


def package_version() -> str:
    return __version__


def _server_line() -> str:
    remote = base_url() is not None
    if not remote and not endpoint.socket_path().exists():
        return "not running (it starts on first use)"
    try:
        info = server_info(start_local=False, timeout_seconds=_SERVER_DEADLINE_SECONDS)
    except (AviatoError, ValueError) as exc:
        return f"unreachable: {describe(exc)}"
    return f"{info.version} at {info.url}"


@click.command()
def version() -> None:
    """Print the versions of aviato, Python and the service.

    The service is asked only if it runs; `version` never starts it.

    \b
    Example:
      aviato version
    """
    click.echo(f"aviato:  {package_version()}")
    click.echo(f"python:  {platform.python_version()} ({sys.executable})")
    click.echo(f"service: {_server_line()}")
