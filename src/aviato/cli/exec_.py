"""`aviato exec`: run one command in a sandbox as if it ran here.

Output is relayed byte for byte as it arrives (stdout to stdout, stderr to stderr), stdin is
passed through when it is not a terminal (a pipe or a file), and the exit status is the
command's. Ctrl-C (and SIGTERM) are forwarded to the command's process group, so it can clean up;
a third Ctrl-C gives up and kills it.

Why not `Sandbox.exec` of the SDK: its `Process` decodes output as text (binary output would be
altered) and keeps the whole output for `ProcessResult` (`cat` of a large file would fill
memory). A command line relays bytes and keeps nothing, so this speaks the Exec stream directly.

A command killed by the out-of-memory killer gets one line on stderr saying so (its exit status
stays its own, usually 137).

Exit statuses: the command's own; 124 when `--timeout` killed it (as timeout(1) does); 125 when
aviato itself failed before or while running it (unknown sandbox, service down), as `docker exec`
does, so that scripts can tell "the command failed" from "it could not be run".
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from types import FrameType

import click
import grpc

from aviato.cli._output import CliError, describe
from aviato.cli._params import duration, env_option
from aviato.cli._rpc import Connection, connection, wait_started
from aviato.cli._stream import ExecRequests, pump_fd, write_all
from aviato.exceptions import AviatoError
from aviato.v1 import sandbox_pb2 as pb

EXEC_FAILED = 125
TIMED_OUT = 124
_GIVE_UP_AFTER_INTERRUPTS = 3
_OOM_LINE = (
    b"aviato: the command was killed by the out-of-memory killer: the sandbox reached its "
    b"memory limit\n"
)
TERMINAL_STATUSES = (
    pb.SANDBOX_STATUS_COMPLETED,
    pb.SANDBOX_STATUS_FAILED,
    pb.SANDBOX_STATUS_TERMINATED,
)


def status_word(status: int) -> str:
    return pb.SandboxStatus.Name(status).removeprefix("SANDBOX_STATUS_").lower()


def ensure_running(conn: Connection, sandbox_id: str) -> None:
    """Wait for a starting sandbox; fail with one line if it has already ended."""
    record = wait_started(conn, sandbox_id)
    if record.status in TERMINAL_STATUSES:
        reason = f": {record.status_reason}" if record.status_reason else ""
        raise CliError(f"sandbox {sandbox_id} has ended ({status_word(record.status)}{reason})")


def stdin_is_passable() -> bool:
    """Whether fd 0 is open and not a terminal (a pipe, a file, /dev/null)."""
    try:
        os.fstat(0)
    except OSError:
        return False
    return not os.isatty(0)


class _SignalForwarder:
    """While installed, SIGINT and SIGTERM go to the remote command instead of killing us."""

    def __init__(self, requests: ExecRequests) -> None:
        self.requests = requests
        self.interrupts = 0
        self.previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGINT:
            self.interrupts += 1
            if self.interrupts >= _GIVE_UP_AFTER_INTERRUPTS:
                raise KeyboardInterrupt
        self.requests.send_signal(signum)

    def __enter__(self) -> _SignalForwarder:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self.previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)  # type: ignore[arg-type]


def run_command(conn: Connection, init: pb.ExecInit, pass_stdin: bool) -> int:
    """Relay one command; returns its exit status (see the module docstring)."""
    requests = ExecRequests(init)
    if pass_stdin:
        threading.Thread(
            target=pump_fd, args=(0, requests), name="aviato-stdin", daemon=True
        ).start()
    responses = conn.stub.Exec(iter(requests), metadata=conn.metadata)
    finished = False
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        with _SignalForwarder(requests):
            for response in responses:
                kind = response.WhichOneof("msg")
                if kind == "output":
                    fd = 2 if response.output.stream == pb.STREAM_STDERR else 1
                    write_all(fd, response.output.data)
                elif kind == "exit":
                    finished = True
                    if response.exit.oom_killed:
                        write_all(2, _OOM_LINE)
                    if response.exit.timed_out:
                        limit = f" after {init.timeout_seconds:g}s" if init.timeout_seconds else ""
                        raise CliError(f"the command timed out{limit} and was killed", TIMED_OUT)
                    return int(response.exit.exit_code)
                elif kind == "error":
                    finished = True
                    raise CliError(response.error.message or "the command failed to start")
        raise CliError("the connection ended before the command's exit status arrived")
    finally:
        if not finished:
            # Leaving early (Ctrl-C, a closed stdout): do not leave the command running.
            requests.send_signal(signal.SIGKILL)
        requests.close()
        if not finished:
            responses.cancel()


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
      aviato exec sb-1a2b3c -- python3 -c 'print(1 + 1)'
      aviato exec -w /tmp -e DEBUG=1 sb-1a2b3c -- make test
      git archive HEAD | aviato exec sb-1a2b3c -- tar -x -C /workspace
      aviato exec --timeout 30s sb-1a2b3c -- ./run_tests.sh
      aviato exec --protected sb-1a2b3c -- python3 /checks/grade.py
    """
    argv = list(command)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        raise click.UsageError("no command given: aviato exec ID -- CMD ...")
    pass_stdin = stdin_is_passable() if stdin is None else stdin
    init = pb.ExecInit(
        sandbox_id=sandbox_id,
        argv=argv,
        cwd=cwd or "",
        env=dict(env),
        timeout_seconds=timeout or 0.0,
        stdin=pass_stdin,
        protected=protected,
    )
    try:
        with connection() as conn:
            ensure_running(conn, sandbox_id)
            code = run_command(conn, init, pass_stdin)
    except CliError as exc:
        raise CliError(exc.message, EXEC_FAILED if exc.exit_code == 1 else exc.exit_code) from None
    except (grpc.RpcError, AviatoError) as exc:
        raise CliError(describe(exc), EXEC_FAILED) from None
    raise SystemExit(code)
