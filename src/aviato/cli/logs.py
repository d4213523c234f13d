"""`aviato logs`: the output of a sandbox's main process, optionally followed live.

Entries are written as the raw bytes the process produced, stdout to stdout and stderr to stderr,
so that `aviato logs ID > out.txt` keeps the two apart as the process wrote them. With `-f` the
stream stays open until the sandbox ends or Ctrl-C.
"""

from __future__ import annotations

import sys

import click

from aviato import Sandbox
from aviato.cli._reach import preflight


@click.command()
@click.argument("sandbox_id", metavar="ID")
@click.option(
    "-f", "--follow", is_flag=True, help="Keep printing new output until the sandbox ends."
)
@click.option(
    "--tail",
    type=click.IntRange(min=0),
    default=None,
    metavar="N",
    help="Only the last N log entries (usually lines) written so far.",
)
def logs(sandbox_id: str, follow: bool, tail: int | None) -> None:
    """Print the output of the sandbox's main process.

    \b
    Examples:
      aviato logs sbx-1a2b3c4d5e6f
      aviato logs -f --tail 20 sbx-1a2b3c4d5e6f
    """
    preflight()
    sandbox = Sandbox.from_id(sandbox_id).result()
    with sandbox.stream_logs(follow=follow, tail=tail) as records:
        for record in records:
            out = sys.stderr if record.stream == "stderr" else sys.stdout
            out.flush()
            out.buffer.write(record.data)
            out.buffer.flush()
