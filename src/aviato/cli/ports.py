"""`aviato port`: where a running sandbox's exposed ports are reached, as `docker port` says it,
or a forwarder to one of them, as `kubectl port-forward` runs.

Against the local service the addresses are on the service host's 127.0.0.1 (the service relays
each connection into the sandbox; docs/networking.md), so a browser or `curl` on that host can
use them, and `aviato port ID PORT` prints one. A remote service's 127.0.0.1 is out of this
machine's reach: there `aviato port ID PORT` forwards in the foreground instead (this machine's
127.0.0.1:N, each connection carried by the service, `Sandbox.forward_port`), until Ctrl-C or
the end of the sandbox; `--forward [LOCAL_PORT]` does the same with the local service.
"""

from __future__ import annotations

import logging

import click

from aviato import Sandbox, SandboxStatus
from aviato.cli._output import CliError
from aviato.cli._reach import base_url, preflight


@click.command()
@click.argument("sandbox_id", metavar="ID")
@click.argument("port", type=click.IntRange(1, 65535), required=False, metavar="[PORT]")
@click.option(
    "--forward",
    "local_port",
    type=click.IntRange(0, 65535),
    is_flag=False,
    flag_value=0,
    default=None,
    metavar="[LOCAL_PORT]",
    help="Forward 127.0.0.1:LOCAL_PORT of this machine to PORT (default: a free port) in the "
    "foreground, through the service; the default with a remote service (AVIATO_BASE_URL).",
)
def port(sandbox_id: str, port: int | None, local_port: int | None) -> None:
    """Print the address that reaches PORT of a running sandbox (all ports without PORT), or,
    with a remote service or --forward, forward a port of this machine to it until Ctrl-C.

    Ports are exposed when the sandbox is made (`aviato run -p 8080`, or
    `network=NetworkOptions(exposed_ports=[8080])` in Python).

    \b
    Examples:
      aviato port sbx-1a2b3c4d5e6f 8080
      curl "http://$(aviato port sbx-1a2b3c4d5e6f 8080)/"
      aviato port sbx-1a2b3c4d5e6f
      aviato port --forward 8000 sbx-1a2b3c4d5e6f 8080   # then: curl http://127.0.0.1:8000/
    """
    preflight()
    if local_port is not None and port is None:
        raise click.UsageError("--forward needs the PORT to forward")
    sandbox = Sandbox.from_id(sandbox_id).result()
    exposed = dict(sandbox.exposed_ports)
    if sandbox.status != SandboxStatus.RUNNING:
        status = sandbox.status.value if sandbox.status else "unknown"
        raise CliError(
            f"sandbox {sandbox_id} is {status}: its ports are reachable only while it runs"
        )
    if port is None:
        for number, address in exposed.items():
            click.echo(f"{number} -> {address}")
        if base_url() is not None and exposed:
            click.echo(
                "(addresses on the service's host; from here: aviato port "
                f"{sandbox_id} PORT forwards one)",
                err=True,
            )
        return
    if port not in exposed:
        asked = ", ".join(str(p) for p in exposed) or "none"
        raise CliError(
            f"sandbox {sandbox_id} does not expose port {port} (it exposes: {asked}); "
            "ports are chosen when it is made, as with `aviato run -p PORT`"
        )
    if local_port is None and base_url() is None:
        click.echo(exposed[port])
        return
    _forward(sandbox, port, local_port or 0)


class _ToStderr(logging.Handler):
    """The forwarder's reports (a connection the service refused) as lines on stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        click.echo(f"aviato: {record.getMessage()}", err=True)


def _forward(sandbox: Sandbox, port: int, local_port: int) -> None:
    """Forwards in the foreground until Ctrl-C (exit 0) or the end of the sandbox (an error)."""
    handler = _ToStderr(logging.WARNING)
    logger = logging.getLogger("aviato")
    logger.addHandler(handler)
    try:
        with sandbox.forward_port(port, local_port=local_port) as forward:
            click.echo(
                f"Forwarding {forward.address} -> {sandbox.sandbox_id}:{port} (Ctrl-C to stop)"
            )
            try:
                forward.wait_closed().result()
            except KeyboardInterrupt:
                return
    finally:
        logger.removeHandler(handler)
