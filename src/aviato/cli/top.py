"""`aviato top`: a live table of the caller's live sandboxes, like `docker stats`.

Each refresh makes two calls: `Sandbox.list()` (status, image, age, network figures) and
`Sandbox.list_usage(last=2)` (the service's two newest usage samples of each: CPU % between
them, memory and tasks of the newest; docs/operations.md). On a terminal the table is redrawn
in place every `--interval` seconds until Ctrl-C (rich's Live display on the alternate screen,
so the shell's scrollback is left as it was), and a key changes the order (c, m, p, n, a, i) or
quits (q); on a pipe, or with `--once`, it is printed once as plain columns (`docker stats
--no-stream`).

CPU and memory come from the service's sampler, so they are as fresh as its interval (5 s by
default): a sandbox younger than two samples shows "-" for CPU. Under Ray the node hosts do not
report usage; those sandboxes show "-" too.
"""

from __future__ import annotations

import contextlib
import os
import select
import sys
import termios
import time
import tty
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import click
from rich.live import Live
from rich.table import Table

from aviato import Sandbox, SandboxUsage
from aviato.cli._output import age, human_bytes, print_table, stdout_console
from aviato.cli._reach import preflight

__all__ = ["top"]

_HEADERS = ["ID", "STATUS", "CPU %", "MEM", "PIDS", "NET I/O", "CALLS", "AGE", "IMAGE"]


@dataclass(frozen=True)
class _Row:
    sandbox_id: str
    status: str
    cpu: float | None
    memory: int | None
    pids: int | None
    net_in: int
    net_out: int
    calls: int
    age_seconds: float
    age_text: str
    image: str

    def cells(self) -> list[str]:
        return [
            self.sandbox_id,
            self.status,
            "-" if self.cpu is None else f"{self.cpu:.1f}",
            "-" if self.memory is None else human_bytes(self.memory),
            "-" if self.pids is None else str(self.pids),
            f"{human_bytes(self.net_in)} / {human_bytes(self.net_out)}",
            str(self.calls),
            self.age_text,
            self.image,
        ]


_SORTS: dict[str, Callable[[_Row], tuple[float, str]]] = {
    "cpu": lambda r: (-(r.cpu or 0.0), r.sandbox_id),
    "mem": lambda r: (-(r.memory or 0), r.sandbox_id),
    "pids": lambda r: (-(r.pids or 0), r.sandbox_id),
    "net": lambda r: (-(r.net_in + r.net_out), r.sandbox_id),
    "age": lambda r: (-r.age_seconds, r.sandbox_id),
    "id": lambda r: (0.0, r.sandbox_id),
}


# Keys on a terminal: one letter changes the order, q quits (as Ctrl-C does).
_KEYS = {"c": "cpu", "m": "mem", "p": "pids", "n": "net", "a": "age", "i": "id"}


@contextlib.contextmanager
def _keys() -> Iterator[int | None]:
    """stdin's descriptor in cbreak mode (a key is read at once, not echoed) while the table
    is shown, restored after; None when stdin is not a terminal (no keys then)."""
    if not sys.stdin.isatty():
        yield None
        return
    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)
    try:
        tty.setcbreak(fd)
        yield fd
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def _wait_for_key(fd: int | None, seconds: float) -> str:
    """The key pressed within `seconds` ("" when none, or without a terminal)."""
    if fd is None:
        time.sleep(seconds)
        return ""
    ready, _, _ = select.select([fd], [], [], seconds)
    return os.read(fd, 1).decode(errors="replace").lower() if ready else ""


def _rows(tags: list[str] | None, sort: str) -> list[_Row]:
    sandboxes = Sandbox.list(tags=tags).result()
    usage: dict[str, SandboxUsage] = {u.sandbox_id: u for u in Sandbox.list_usage(last=2).result()}
    now = time.time()
    rows = []
    for sb in sandboxes:
        sid = sb.sandbox_id or "-"
        history = usage.get(sid)
        latest = history.samples[-1] if history is not None and history.samples else None
        net = sb.network_usage
        created = sb.created_at
        rows.append(
            _Row(
                sandbox_id=sid,
                status=sb.status.value if sb.status else "-",
                cpu=history.cpu_percent() if history is not None else None,
                memory=latest.memory_bytes if latest and latest.memory_bytes >= 0 else None,
                pids=latest.pids if latest and latest.pids >= 0 else None,
                net_in=net.bytes_received,
                net_out=net.bytes_sent,
                calls=history.active_calls if history is not None else 0,
                age_seconds=now - created.timestamp() if created else 0.0,
                age_text=age(created),
                image=sb.container_image,
            )
        )
    rows.sort(key=_SORTS[sort])
    return rows


def _table(rows: list[_Row], sort: str, interval: float) -> Table:
    table = Table(
        box=None,
        pad_edge=False,
        header_style="bold",
        caption=f"{len(rows)} sandboxes · sorted by {sort} · every {interval:g} s · "
        "keys: c m p n a i sort, q quits",
        caption_justify="left",
    )
    for header in _HEADERS:
        table.add_column(header, no_wrap=True, justify="right" if header in (
            "CPU %", "MEM", "PIDS", "CALLS", "AGE") else "left")  # fmt: skip
    for row in rows:
        table.add_row(*row.cells())
    return table


@click.command()
@click.option(
    "--sort",
    type=click.Choice(sorted(_SORTS), case_sensitive=False),
    default="cpu",
    show_default=True,
    help="Order of the rows (largest first; id and age: by id, oldest first).",
)
@click.option(
    "-t", "--tag", "tags", multiple=True, metavar="TAG", help="Only sandboxes with this tag."
)
@click.option(
    "-n",
    "--interval",
    type=click.FloatRange(0.5, 3600),
    default=2.0,
    show_default=True,
    metavar="SECONDS",
    help="Seconds between refreshes on a terminal.",
)
@click.option("--once", is_flag=True, help="Print the table once and exit (also on a pipe).")
def top(sort: str, tags: tuple[str, ...], interval: float, once: bool) -> None:
    """Show live sandboxes' CPU, memory, tasks and network, refreshed in place.

    CPU % is of one core (200 is two cores busy), between the service's last two samples;
    MEM is what the sandbox's cgroup is charged (its processes, writable layer and file
    cache); CALLS counts the commands and file transfers running in it now. On a terminal,
    keys change the order (c cpu, m mem, p pids, n net, a age, i id) and q quits.

    \b
    Examples:
      aviato top
      aviato top --sort mem --tag eval
      aviato top --once | sort -k3 -n
    """
    preflight()
    sort = sort.lower()
    wanted = list(tags) or None
    if once or not sys.stdout.isatty():
        rows = _rows(wanted, sort)
        print_table(_HEADERS, [r.cells() for r in rows])
        return
    console = stdout_console()
    with (
        contextlib.suppress(KeyboardInterrupt),
        _keys() as fd,
        Live(console=console, screen=True, auto_refresh=False) as live,
    ):
        while True:
            live.update(_table(_rows(wanted, sort), sort, interval), refresh=True)
            deadline = time.monotonic() + interval
            while (left := deadline - time.monotonic()) > 0:
                key = _wait_for_key(fd, left)
                if key == "q":
                    return
                if key in _KEYS:
                    sort = _KEYS[key]
                    break  # redraw at once in the new order
