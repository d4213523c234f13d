"""`aviato exec`: run one command in a sandbox as if it ran here.

Output is relayed byte for byte as it arrives (stdout to stdout, stderr to stderr), stdin is
passed through when it is not a terminal (a pipe or a file), and the exit status is the
command's. Ctrl-C (and SIGTERM) are forwarded to the command's process group, so it can clean up;
a third Ctrl-C gives up and kills it.

The command runs through the SDK (`Sandbox.exec`) with its stdin open (so that signals can be
forwarded) and ``max_output_bytes=0``: the output is relayed as raw bytes (`iter_bytes`) and
nothing is kept, so `cat` of a large file does not fill memory.

A command killed by the out-of-memory killer gets one line on stderr saying so (its exit status
stays its own, usually 137).

Exit statuses: the command's own; 124 when `--timeout` killed it (as timeout(1) does); 125 when
aviato itself failed before or while running it (unknown sandbox, service down), as `docker exec`
does, so that scripts can tell "the command failed" from "it could not be run".
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Mapping
from concurrent.futures import CancelledError
from concurrent.futures import TimeoutError as FutureTimeout
from types import FrameType

import click

from aviato import Process, ProcessResult, Sandbox, SandboxStatus
from aviato.cli._output import CliError, describe
from aviato.cli._params import duration, env_option
from aviato.cli._reach import preflight
from aviato.cli._stream import OutputRelay, pump_fd, write_all
from aviato.exceptions import (
    AviatoError,
    SandboxFailedError,
    SandboxTerminatedError,
    SandboxTimeoutError,
)

EXEC_FAILED = 125
TIMED_OUT = 124
_GIVE_UP_AFTER_INTERRUPTS = 3
_OOM_LINE = (
    b"aviato: the command was killed by the out-of-memory killer: the sandbox reached its "
    b"memory limit\n"
)
_WAIT_STARTED_SECONDS = 120.0
_POLL_SECONDS = 0.25  # how often the main thread wakes to run signal handlers


def ensure_running(sandbox_id: str) -> Sandbox:
    """The sandbox, once it runs; fails with one line if it has already ended.

    A sandbox just made by `aviato run` may still be pending: wait for it to start."""
    sandbox = Sandbox.from_id(sandbox_id).result()
    with contextlib.suppress(SandboxFailedError, SandboxTerminatedError):
        sandbox.wait(_WAIT_STARTED_SECONDS)
    status = sandbox.status
    if status is not None and status.is_terminal:
        reason = f": {sandbox.status_reason}" if sandbox.status_reason else ""
        raise CliError(f"sandbox {sandbox_id} has ended ({SandboxStatus(status).value}{reason})")
    return sandbox


def stdin_is_passable() -> bool:
    """Whether fd 0 is open and not a terminal (a pipe, a file, /dev/null)."""
    try:
        os.fstat(0)
    except OSError:
        return False
    return not os.isatty(0)


class _SignalForwarder:
    """While installed, SIGINT and SIGTERM go to the remote command instead of killing us."""

    def __init__(self, process: Process) -> None:
        self.process = process
        self.interrupts = 0
        self.previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGINT:
            self.interrupts += 1
            if self.interrupts >= _GIVE_UP_AFTER_INTERRUPTS:
                raise KeyboardInterrupt
        self.process.send_signal(signum)  # queued on the SDK's loop; never blocks

    def __enter__(self) -> _SignalForwarder:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self.previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)  # type: ignore[arg-type]


def wait_for_exit(process: Process) -> ProcessResult:
    """The command's result, waking often enough for signal handlers to run here."""
    while True:
        try:
            return process.result(timeout=_POLL_SECONDS)
        except FutureTimeout:
            continue


def run_command(
    sandbox: Sandbox,
    argv: list[str],
    *,
    cwd: str | None,
    env: Mapping[str, str],
    timeout: float | None,
    pass_stdin: bool,
    protected: bool,
) -> int:
    """Relay one command; returns its exit status (see the module docstring)."""
    sys.stdout.flush()
    sys.stderr.flush()
    process = sandbox.exec(
        argv,
        cwd=cwd,
        env=env,
        timeout_seconds=timeout,
        stdin=True,
        protected=protected,
        max_output_bytes=0,
    )
    assert process.stdin is not None
    # Forwarding first: once a relay prints the command's first output, a Ctrl-C must reach
    # the command, not interrupt us (seen in CI under load: exit 130 instead of the command's).
    with _SignalForwarder(process):
        return _relay(process, pass_stdin, timeout)


def _relay(process: Process, pass_stdin: bool, timeout: float | None) -> int:
    assert process.stdin is not None
    if pass_stdin:
        threading.Thread(
            target=pump_fd, args=(0, process), name="aviato-stdin", daemon=True
        ).start()
    else:
        process.stdin.close()
    relays = [OutputRelay(process.stdout, 1, process.cancel)]
    relays.append(OutputRelay(process.stderr, 2, process.cancel))
    finished = False
    try:
        try:
            result = wait_for_exit(process)
        except CancelledError:
            # only a relay cancels: our stdout or stderr was closed under us
            for relay in relays:
                relay.join(timeout=5.0)
            broken = next(relay.broken for relay in relays if relay.broken is not None)
            raise broken from None
        except SandboxTimeoutError as exc:
            finished = True
            limit = f" after {timeout:g}s" if timeout else ""
            if exc.exec_result is not None:
                _finish_output(relays, exc.exec_result)
            raise CliError(f"the command timed out{limit} and was killed", TIMED_OUT) from None
        finished = True
        _finish_output(relays, result)
        return result.returncode
    finally:
        if not finished:
            # Leaving early (Ctrl-C, a closed stdout): do not leave the command running.
            process.cancel()


def _finish_output(relays: list[OutputRelay], result: ProcessResult) -> None:
    for relay in relays:
        relay.join()
    if result.oom_killed:
        write_all(2, _OOM_LINE)


@click.command(
    "exec",
    context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False},
)
@click.option("-w", "--cwd", metavar="DIR", help="Working directory inside the sandbox.")
@env_option()
@click.option(
    "--timeout",
    metavar="DURATION",
    callback=duration,
    help="Kill the command after this long (e.g. 30s, 5m).",
)
@click.option(
    "--stdin/--no-stdin",
    "stdin",
    default=None,
    help="Pass stdin to the command [default: when stdin is a pipe or a file, not a terminal].",
)
@click.option(
    "--protected",
    is_flag=True,
    help="Nothing else running in the sandbox can signal, trace or tamper with the command "
    "(for checks that judge code in the same sandbox; needs a service running as root).",
)
@click.argument("sandbox_id", metavar="ID")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED, metavar="-- CMD ...")
def exec_command(
    sandbox_id: str,
    command: tuple[str, ...],
    cwd: str | None,
    env: tuple[tuple[str, str], ...],
    timeout: float | None,
    stdin: bool | None,
    protected: bool,
) -> None:
    """Run a command in a sandbox, as if it ran here.

    Its output streams here as it is written, and its exit status is aviato's.

    Options go before ID; everything after ID (after `--`) is the command. Exits with the
    command's status, 124 if --timeout killed it, 125 if aviato could not run it.

    \b
    Examples:
      aviato exec sbx-1a2b3c4d5e6f -- python3 -c 'print(1 + 1)'
      aviato exec -w /tmp -e DEBUG=1 sbx-1a2b3c4d5e6f -- make test
      git archive HEAD | aviato exec sbx-1a2b3c4d5e6f -- tar -x -C /workspace
      aviato exec --timeout 30s sbx-1a2b3c4d5e6f -- ./run_tests.sh
      aviato exec --protected sbx-1a2b3c4d5e6f -- python3 /checks/grade.py
    """
    argv = list(command)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        raise click.UsageError("no command given: aviato exec ID -- CMD ...")
    pass_stdin = stdin_is_passable() if stdin is None else stdin
    try:
        preflight()
        sandbox = ensure_running(sandbox_id)
        code = run_command(
            sandbox,
            argv,
            cwd=cwd,
            env=dict(env),
            timeout=timeout,
            pass_stdin=pass_stdin,
            protected=protected,
        )
    except CliError as exc:
        raise CliError(exc.message, EXEC_FAILED if exc.exit_code == 1 else exc.exit_code) from None
    except UnicodeEncodeError:
        raise  # text that cannot be sent at all: a usage problem (exit 1), not a failed run
    except (AviatoError, ValueError) as exc:
        raise CliError(describe(exc), EXEC_FAILED) from None
    raise SystemExit(code)
