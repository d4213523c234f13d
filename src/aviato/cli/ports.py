"""`aviato port`: where a running sandbox's exposed ports are reached, as `docker port` says it.

The addresses are on the service host's 127.0.0.1 (the local service relays each connection
into the sandbox; docs/networking.md), so a browser or `curl` on that host can use them.
"""

from __future__ import annotations

import click

from aviato import Sandbox, SandboxStatus
from aviato.cli._output import CliError
from aviato.cli._reach import preflight


@click.command()
@click.argument("sandbox_id", metavar="ID")
@click.argument("port", type=click.IntRange(1, 65535), required=False, metavar="[PORT]")
def port(sandbox_id: str, port: int | None) -> None:
    """Print the address that reaches PORT of a running sandbox (all ports without PORT).

    Ports are exposed when the sandbox is made (`aviato run -p 8080`, or
    `network=NetworkOptions(exposed_ports=[8080])` in Python).

    \b
    Examples:
      aviato port sb-1a2b3c 8080
      curl "http://$(aviato port sb-1a2b3c 8080)/"
      aviato port sb-1a2b3c
    """
    preflight()
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
        return
    if port not in exposed:
        asked = ", ".join(str(p) for p in exposed) or "none"
        raise CliError(
            f"sandbox {sandbox_id} does not expose port {port} (it exposes: {asked}); "
            "ports are chosen when it is made, as with `aviato run -p PORT`"
        )
    click.echo(exposed[port])
