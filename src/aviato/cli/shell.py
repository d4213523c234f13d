"""`aviato sh`: an interactive shell in a sandbox, through a real pseudo-terminal.

The local terminal is put in raw mode, so that every key (Ctrl-C, Ctrl-D, arrows, tab) reaches
the remote terminal untouched and the remote side does echo and line editing. SIGWINCH is turned
into a resize frame, so full-screen programs follow the window. The terminal's settings are
restored however the session ends, including on an error or a dropped connection.

Threads: the main thread prints what the stream delivers and runs the SIGWINCH handler, which
only appends a resize frame to the request queue (a non-blocking, reentrant put). One daemon
thread turns keystrokes into stdin frames; a pipe tells it when the session is over, since a read
of a terminal cannot otherwise be interrupted.
"""

from __future__ import annotations

import os
import selectors
import signal
import sys
import termios
import threading
import tty
from types import FrameType

import click
import grpc

from aviato.cli._output import CliError, describe
from aviato.cli._params import env_option
from aviato.cli._rpc import Connection, connection
from aviato.cli._stream import STDIN_CHUNK_BYTES, ExecRequests, write_all
from aviato.cli.exec_ import EXEC_FAILED, ensure_running
from aviato.exceptions import AviatoError
from aviato.v1 import sandbox_pb2 as pb

# bash when the image has it, else sh; as a login-less interactive shell.
DEFAULT_SHELL = (
    "/bin/sh",
    "-c",
    "if command -v bash >/dev/null 2>&1; then exec bash -i; else exec sh -i; fi",
)


def _terminal_size(fd: int) -> pb.TerminalSize:
    try:
        size = os.get_terminal_size(fd)
    except OSError:
        return pb.TerminalSize(rows=24, cols=80)
    return pb.TerminalSize(rows=size.lines, cols=size.columns)


class _TerminalBridge:
    """Joins the local terminal (fds in/out) to one remote TTY exec stream."""

    def __init__(self, fd_in: int, fd_out: int, init: pb.ExecInit) -> None:
        self.fd_in = fd_in
        self.fd_out = fd_out
        self.requests = ExecRequests(init)
        self.quit_r, self.quit_w = os.pipe()

    def _on_winch(self, signum: int, frame: FrameType | None) -> None:
        self.requests.send_resize(_terminal_size(self.fd_out))

    def _pump_stdin(self) -> None:
        """Keys to the stream until the session ends (the quit pipe becomes readable)."""
        with selectors.DefaultSelector() as selector:
            selector.register(self.fd_in, selectors.EVENT_READ)
            selector.register(self.quit_r, selectors.EVENT_READ)
            while True:
                for key, _ in selector.select():
                    if key.fd == self.quit_r:
                        return
                    try:
                        data = os.read(self.fd_in, STDIN_CHUNK_BYTES)
                    except OSError:
                        data = b""
                    if not data:
                        self.requests.send_eof()
                        selector.unregister(self.fd_in)
                    elif not self.requests.send_stdin(data):
                        return

    def run(self, conn: Connection) -> int:
        """Relay until the remote command exits; returns its exit code."""
        saved = termios.tcgetattr(self.fd_in)
        previous = signal.signal(signal.SIGWINCH, self._on_winch)
        pump = threading.Thread(target=self._pump_stdin, name="aviato-sh-stdin", daemon=True)
        responses = conn.stub.Exec(iter(self.requests), metadata=conn.metadata)
        finished = False
        try:
            tty.setraw(self.fd_in, termios.TCSANOW)
            pump.start()
            for response in responses:
                kind = response.WhichOneof("msg")
                if kind == "output":
                    write_all(self.fd_out, response.output.data)
                elif kind == "exit":
                    finished = True
                    return int(response.exit.exit_code)
                elif kind == "error":
                    finished = True
                    raise CliError(response.error.message or "the shell failed to start")
            raise CliError("the connection ended before the shell exited")
        finally:
            termios.tcsetattr(self.fd_in, termios.TCSADRAIN, saved)
            signal.signal(signal.SIGWINCH, previous)
            if not finished:
                self.requests.send_signal(signal.SIGKILL)
            self.requests.close()
            if not finished:
                responses.cancel()
            os.write(self.quit_w, b"q")
            pump.join(timeout=1.0)
            os.close(self.quit_r)
            os.close(self.quit_w)


@click.command(context_settings={"ignore_unknown_options": True})
@click.argument("sandbox_id", metavar="ID")
@click.argument("command", nargs=-1, type=click.UNPROCESSED, metavar="[-- CMD ...]")
@click.option("-w", "--cwd", metavar="DIR", help="Working directory inside the sandbox.")
@env_option()
def sh(
    sandbox_id: str, command: tuple[str, ...], cwd: str | None, env: tuple[tuple[str, str], ...]
) -> None:
    """Open an interactive shell in a sandbox, on a real terminal.

    Runs CMD instead of the shell when given.

    Keys go to the sandbox as typed (Ctrl-C interrupts the remote command, Ctrl-D ends the
    shell), and the remote terminal follows the size of the window. Exits with the shell's exit
    status. Needs a terminal; in scripts and pipes use `aviato exec`.

    \b
    Examples:
      aviato sh sb-1a2b3c
      aviato sh sb-1a2b3c -- python3
    """
    if not (os.isatty(0) and os.isatty(1)):
        raise CliError(
            "aviato sh needs a terminal; in scripts and pipes use 'aviato exec ID -- CMD'",
            EXEC_FAILED,
        )
    variables = {"TERM": os.environ.get("TERM") or "xterm-256color", **dict(env)}
    argv = list(command)
    if argv and argv[0] == "--":
        argv = argv[1:]
    try:
        with connection() as conn:
            ensure_running(conn, sandbox_id)
            init = pb.ExecInit(
                sandbox_id=sandbox_id,
                argv=argv or list(DEFAULT_SHELL),
                cwd=cwd or "",
                env=variables,
                stdin=True,
                tty=True,
                tty_size=_terminal_size(1),
            )
            sys.stdout.flush()
            code = _TerminalBridge(0, 1, init).run(conn)
    except CliError as exc:
        raise CliError(exc.message, EXEC_FAILED) from None
    except (grpc.RpcError, AviatoError) as exc:
        raise CliError(describe(exc), EXEC_FAILED) from None
    raise SystemExit(code)
