"""Finding, and if needed starting, the embedded local service.

With no `AVIATO_BASE_URL`, the SDK talks to a service on this machine over the unix socket
``<state dir>/aviato.sock`` (state dir: `AVIATO_STATE_DIR`, else ``$XDG_STATE_HOME/aviato``, else
``~/.local/state/aviato``). `ensure_local_service()` makes sure one answers there:

1. if the socket answers `GetServerInfo`, use it;
2. otherwise take ``server.lock`` (flock), so that of many processes starting at once exactly
   one starts the service while the others wait, and look again;
3. remove a stale socket (connection refused: its service died), start
   ``python -m aviato.server --state-dir D`` detached (new session, stdin from /dev/null, output
   appended to ``server.log``), and wait until it answers; if it does not within ~15 s (or
   exits), raise `AviatoConnectionError` with the tail of ``server.log``.

The service outlives the process that started it, so sandboxes survive the client and `from_id`,
`list` and session adoption work across processes. Stop it with ``aviato server stop`` (or SIGTERM
to the pid in ``server.pid``).

This module is blocking; the SDK calls it from a worker thread, never on its event loop.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import grpc

from aviato._private import open_private, private_dir
from aviato.exceptions import AviatoConnectionError
from aviato.v1 import endpoint, sandbox_pb2_grpc
from aviato.v1 import sandbox_pb2 as pb

__all__ = ["ensure_local_service", "socket_path", "start_local_service", "state_dir"]

START_TIMEOUT_SECONDS = 15.0
_MAX_UNIX_PATH = 107
_spawned: list[subprocess.Popen[bytes]] = []  # keep references: no "still running" warnings


def state_dir() -> Path:
    """The local service's state directory (`aviato.v1.endpoint.state_dir`)."""
    return endpoint.state_dir()


def socket_path(directory: str | os.PathLike[str] | None = None) -> Path:
    """The unix socket of the local service in `directory` (default: `state_dir()`)."""
    return endpoint.socket_path(directory)


def _connect_state(sock: Path) -> str:
    """ "missing", "refused" (stale socket) or "accepting"."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(1.0)
        s.connect(str(sock))
        return "accepting"
    except FileNotFoundError:
        return "missing"
    except ConnectionRefusedError:
        return "refused"
    except OSError as e:
        if e.errno in (errno.ECONNREFUSED, errno.ENOTSOCK):
            return "refused"
        return "accepting" if e.errno in (errno.EAGAIN, errno.ETIMEDOUT) else "refused"
    finally:
        s.close()


def _answers(sock: Path, timeout: float = 2.0) -> bool:
    """True if an aviato service answers GetServerInfo on `sock`."""
    if _connect_state(sock) != "accepting":
        return False
    channel = grpc.insecure_channel(f"unix://{sock}")
    try:
        stub = sandbox_pb2_grpc.SandboxServiceStub(channel)  # type: ignore[no-untyped-call]
        stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=timeout)
        return True
    except grpc.RpcError as err:
        code = err.code() if hasattr(err, "code") else None
        # UNAVAILABLE / DEADLINE_EXCEEDED: not (yet) serving. Anything else is an answer.
        return code not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    finally:
        channel.close()


def _log_tail(log: Path, lines: int = 30) -> str:
    try:
        with open(log, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 16384))
            text = f.read().decode(errors="replace")
    except OSError:
        return "(no server.log)"
    return "\n".join(text.splitlines()[-lines:]) or "(server.log is empty)"


def _child_env() -> dict[str, str]:
    """The environment of the service: ours, with this SDK's package importable first."""
    env = dict(os.environ)
    pkg_root = str(Path(__file__).resolve().parents[1])
    if "site-packages" not in pkg_root and "dist-packages" not in pkg_root:
        current = env.get("PYTHONPATH", "")
        parts = [p for p in current.split(os.pathsep) if p]
        if pkg_root not in parts:
            env["PYTHONPATH"] = os.pathsep.join([pkg_root, *parts])
    return env


def _spawn(directory: Path, server_args: Sequence[str] = ()) -> subprocess.Popen[bytes]:
    log = directory / endpoint.LOG_NAME
    with os.fdopen(open_private(log, os.O_WRONLY | os.O_APPEND), "ab") as out:
        out.write(
            f"--- {time.strftime('%Y-%m-%dT%H:%M:%S')} started by pid {os.getpid()}\n".encode()
        )
        out.flush()
        proc = subprocess.Popen(
            [sys.executable, "-m", "aviato.server", "--state-dir", str(directory), *server_args],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            close_fds=True,
            cwd="/",
            env=_child_env(),
        )
    _spawned.append(proc)
    return proc


def answering_socket(state_dir_path: str | os.PathLike[str] | None = None) -> str | None:
    """The socket path of the local service of `state_dir_path` if one answers, else None
    (never starts one)."""
    sock = endpoint.state_dir(state_dir_path) / endpoint.SOCKET_NAME
    return str(sock) if _answers(sock) else None


def ensure_local_service(
    state_dir_path: str | os.PathLike[str] | None = None,
    *,
    timeout: float = START_TIMEOUT_SECONDS,
    server_args: Sequence[str] = (),
) -> str:
    """Returns the socket path of a local service that answers, starting one if needed.

    With `server_args` (arguments of ``aviato server``, e.g. ``["--listen", "127.0.0.1:7080"]``)
    a new service is started with them, and one that already answers is an error: it would not
    have them. Raises `AviatoConnectionError` (with the tail of ``server.log``) if it cannot be
    started.
    """
    server_args = [str(arg) for arg in server_args]
    directory = endpoint.state_dir(state_dir_path)
    sock = directory / endpoint.SOCKET_NAME
    if len(str(sock).encode()) > _MAX_UNIX_PATH:
        raise AviatoConnectionError(
            f"the state directory {directory} is too long for a unix socket path "
            f"({len(str(sock))} > {_MAX_UNIX_PATH} bytes); set AVIATO_STATE_DIR to a shorter path"
        )
    if _answers(sock) and not server_args:
        return str(sock)
    try:
        private_dir(directory, ours=True)
    except OSError as e:
        raise AviatoConnectionError(f"cannot use the state directory {directory}: {e}") from e
    with os.fdopen(open_private(directory / endpoint.LOCK_NAME), "a+b") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            if _answers(sock):
                if server_args:
                    raise AviatoConnectionError(
                        f"a service already runs for {directory}; stop it first to start one "
                        f"with {' '.join(server_args)}"
                    )
                return str(sock)
            # A service that accepts connections but does not answer yet is still starting.
            deadline = time.monotonic() + timeout
            if _connect_state(sock) == "accepting":
                while time.monotonic() < deadline:
                    if _answers(sock):
                        return str(sock)
                    time.sleep(0.1)
            if _connect_state(sock) == "refused":
                with contextlib.suppress(FileNotFoundError):
                    sock.unlink()
            proc = _spawn(directory, server_args)
            deadline = time.monotonic() + timeout
            delay = 0.02
            while time.monotonic() < deadline:
                if _answers(sock, timeout=1.0):
                    return str(sock)
                if proc.poll() is not None:
                    raise AviatoConnectionError(
                        f"the local aviato service exited with code {proc.returncode} while "
                        f"starting (state dir {directory}). server.log:\n"
                        f"{_log_tail(directory / endpoint.LOG_NAME)}"
                    )
                time.sleep(delay)
                delay = min(delay * 1.5, 0.25)
            raise AviatoConnectionError(
                f"the local aviato service did not answer on {sock} within {timeout:.0f}s. "
                f"server.log:\n{_log_tail(directory / endpoint.LOG_NAME)}"
            )
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


def start_local_service(
    state_dir: str | os.PathLike[str] | None = None, *, server_args: Sequence[str] = ()
) -> str:
    """Starts the local service of `state_dir` (default: `AVIATO_STATE_DIR`, else the user's)
    if it is not running, in the background with its log in ``server.log``, and returns its
    socket's path once it answers. SDK calls do this by themselves on first use; this is for
    starting it ahead of time, or with `server_args` (the options of ``aviato server``, such as
    ``["--listen", "127.0.0.1:7080"]``), in which case a service already running is an error
    (`AviatoConnectionError`). The start takes the state directory's lock, so that concurrent
    starters wait for one service instead of racing.
    """
    return ensure_local_service(state_dir, server_args=server_args)
