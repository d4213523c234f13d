"""`aviato sh`: an interactive shell in a sandbox, through a real pseudo-terminal.

The local terminal is put in raw mode, so that every key (Ctrl-C, Ctrl-D, arrows, tab) reaches
the remote terminal untouched and the remote side does echo and line editing. SIGWINCH is turned
into a resize frame, so full-screen programs follow the window. The terminal's settings are
restored however the session ends, including on an error or a dropped connection.

The terminal is the SDK's: `Sandbox.exec(..., tty=True)`, with `Process.resize` on SIGWINCH.

Threads: the main thread prints what the terminal shows (raw bytes, `iter_bytes`) and runs the
SIGWINCH handler, which only queues a resize on the SDK's loop (it never blocks). One daemon
thread turns keystrokes into stdin writes; a pipe tells it when the session is over, since a read
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

from aviato import AviatoError, Process, Sandbox
from aviato.cli._output import CliError, describe
from aviato.cli._params import env_option
from aviato.cli._reach import preflight
from aviato.cli._stream import STDIN_CHUNK_BYTES, send_stdin, write_all
from aviato.cli.exec_command import EXEC_FAILED, ensure_running

# bash when the image has it, else sh; as a login-less interactive shell.
DEFAULT_SHELL = (
    "/bin/sh",
    "-c",
    "if command -v bash >/dev/null 2>&1; then exec bash -i; else exec sh -i; fi",
)


def _terminal_size(fd: int) -> tuple[int, int]:
    """(rows, cols) of the terminal on `fd`; 24 x 80 when it has none."""
    try:
        size = os.get_terminal_size(fd)
    except OSError:
        return (24, 80)
    return (size.lines or 24, size.columns or 80)


class _TerminalBridge:
    """Joins the local terminal (fds in/out) to one remote terminal command."""

    def __init__(self, fd_in: int, fd_out: int) -> None:
        self.fd_in = fd_in
        self.fd_out = fd_out
        self.quit_r, self.quit_w = os.pipe()
        self.process: Process | None = None

    def _on_winch(self, signum: int, frame: FrameType | None) -> None:
        if self.process is not None:
            rows, cols = _terminal_size(self.fd_out)
            self.process.resize(rows, cols)

    def _pump_stdin(self, process: Process) -> None:
        """Keys to the command until the session ends (the quit pipe becomes readable)."""
        assert process.stdin is not None
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
                        process.stdin.close()
                        selector.unregister(self.fd_in)
                    elif not send_stdin(process, data):
                        return

    def run(self, sandbox: Sandbox, argv: list[str], cwd: str | None, env: dict[str, str]) -> int:
        """Relay until the remote command exits; returns its exit code."""
        saved = termios.tcgetattr(self.fd_in)
        previous = signal.signal(signal.SIGWINCH, self._on_winch)
        finished = False
        process: Process | None = None
        pump: threading.Thread | None = None
        try:
            process = self.process = sandbox.exec(
                argv,
                cwd=cwd,
                env=env,
                tty=True,
                tty_size=_terminal_size(self.fd_out),
                max_output_bytes=0,
            )
            tty.setraw(self.fd_in, termios.TCSANOW)
            pump = threading.Thread(
                target=self._pump_stdin, args=(process,), name="aviato-sh-stdin", daemon=True
            )
            pump.start()
            for chunk in process.stdout.iter_bytes():
                write_all(self.fd_out, chunk)
            code = process.wait()
            finished = True
            return code
        finally:
            termios.tcsetattr(self.fd_in, termios.TCSADRAIN, saved)
            signal.signal(signal.SIGWINCH, previous)
            if process is not None and not finished:
                process.cancel()
            os.write(self.quit_w, b"q")
            if pump is not None:
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
      aviato sh sbx-1a2b3c4d5e6f
      aviato sh sbx-1a2b3c4d5e6f -- python3
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
        preflight()
        sandbox = ensure_running(sandbox_id)
        sys.stdout.flush()
        code = _TerminalBridge(0, 1).run(sandbox, argv or list(DEFAULT_SHELL), cwd, variables)
    except CliError as exc:
        raise CliError(exc.message, EXEC_FAILED) from None
    except UnicodeEncodeError:
        raise  # text that cannot be sent at all: a usage problem (exit 1), not a failed run
    except (AviatoError, ValueError) as exc:
        raise CliError(describe(exc), EXEC_FAILED) from None
    raise SystemExit(code)
