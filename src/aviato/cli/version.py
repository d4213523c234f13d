"""`aviato version`: this client's version and, when one answers, the service's.

The service is only asked, never started: `version` must answer on a machine where nothing runs,
and quickly when the service is down (one short deadline).
"""

from __future__ import annotations

import platform
import sys

import click
import grpc

from aviato.cli import _rpc
from aviato.cli._output import describe
from aviato.v1 import sandbox_pb2 as pb

_SERVER_DEADLINE_SECONDS = 2.0


def package_version() -> str:
    from aviato import __version__

    return __version__


def _server_line() -> str:
    remote = _rpc.base_url() is not None
    if not remote and not _rpc.local_socket(start=False).exists():
        return "not running (it starts on first use)"
    try:
        with _rpc.connection(start_local=False) as conn:
            info = conn.stub.GetServerInfo(
                pb.GetServerInfoRequest(),
                metadata=conn.metadata,
                timeout=_SERVER_DEADLINE_SECONDS,
            )
            return f"{info.version} at {conn.target}"
    except grpc.RpcError as exc:
        return f"unreachable: {describe(exc)}"


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
