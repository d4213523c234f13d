"""`aviato server`: run, start, stop and inspect the aviato service of this machine.

Every subcommand works on the service of one state directory (`--state-dir`, else
AVIATO_STATE_DIR, else the XDG default), through its unix socket and its files (`server.pid`,
`server.log`); AVIATO_BASE_URL is ignored here, since it may point at another machine.

- `aviato server [--listen ...]` runs the service in the foreground (`python -m aviato.server`),
  the form for a terminal, a container or a process supervisor.
- `aviato server start` starts it detached through the SDK's `aviato.start_local_service`, what
  the SDK does on first use (with the options given), so both agree on locking and logging.
- `stop` sends SIGTERM and waits; sandboxes keep running and are re-attached on the next start.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import click

from aviato import AviatoError, ServerInfo, server_info, start_local_service
from aviato.cli._output import CliError, print_error, print_fields
from aviato.cli._params import listen_address
from aviato.v1.endpoint import LOG_NAME, SOCKET_NAME
from aviato.v1.endpoint import state_dir as default_state_dir

PID_NAME = "server.pid"
STOP_TIMEOUT_SECONDS = 20.0
NOT_RUNNING_STATUS = 3  # as `systemctl status` and LSB init scripts use for "not running"


@dataclass(frozen=True)
class _Paths:
    state_dir: Path

    @property
    def socket(self) -> Path:
        return self.state_dir / SOCKET_NAME

    @property
    def pid_file(self) -> Path:
        return self.state_dir / PID_NAME

    @property
    def log(self) -> Path:
        return self.state_dir / LOG_NAME


def _resolve(state_dir: str | None) -> _Paths:
    directory = default_state_dir(state_dir)
    return _Paths(directory)


def _server_info(paths: _Paths, timeout: float = 3.0) -> ServerInfo | None:
    """The service's answer on its socket, or None when nothing answers there."""
    try:
        return server_info(start_local=False, state_dir=paths.state_dir, timeout_seconds=timeout)
    except AviatoError:
        return None


def _read_pid(paths: _Paths) -> int | None:
    """The pid in server.pid if that process is alive and is an aviato service."""
    try:
        pid = int(paths.pid_file.read_text().strip())
    except (OSError, ValueError):
        return None
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return pid if b"aviato" in cmdline else None


def _server_args(listen: str | None, tls_cert: str | None, tls_key: str | None) -> list[str]:
    """The options of `aviato server` that a background start passes on."""
    argv: list[str] = []
    if listen:
        argv += ["--listen", listen]
    if tls_cert and tls_key:
        argv += ["--tls-cert", str(Path(tls_cert).absolute())]
        argv += ["--tls-key", str(Path(tls_key).absolute())]
    return argv


def _check_tls(listen: str | None, tls_cert: str | None, tls_key: str | None) -> None:
    if bool(tls_cert) != bool(tls_key):
        raise click.UsageError("--tls-cert and --tls-key go together")
    if tls_cert and not listen:
        raise click.UsageError("--tls-cert/--tls-key need --listen (the unix socket has no TLS)")


listen_option = click.option(
    "--listen",
    metavar="HOST:PORT",
    callback=listen_address,
    help="Also serve remote clients on TCP; they must present an API key (`aviato keys`).",
)
tls_cert_option = click.option(
    "--tls-cert", type=click.Path(exists=True, dir_okay=False), help="TLS certificate (PEM)."
)
tls_key_option = click.option(
    "--tls-key", type=click.Path(exists=True, dir_okay=False), help="TLS private key (PEM)."
)


# Limits forwarded to `python -m aviato.server` as they are (it checks them): per-owner quotas
# and the bound on all sandboxes together. Unset ones fall back to the service's environment
# variables (AVIATO_OWNER_MAX_*, AVIATO_CGROUP_*), then to its defaults.
_LIMIT_OPTIONS = (
    ("--owner-max-sandboxes", "N", "Live sandboxes per owner (0: no bound)."),
    ("--owner-max-cpu", "CPUS", "Sum of each owner's cpu limits, e.g. 8."),
    ("--owner-max-memory", "QUANTITY", "Sum of each owner's memory limits, e.g. 16Gi."),
    ("--owner-max-disk", "QUANTITY", "Sum of each owner's disk sizes, e.g. 50Gi."),
    ("--cgroup-parent", "PATH", "The cgroup that holds every sandbox's [default: aviato]."),
    ("--cgroup-memory", "QUANTITY",
     "Memory of all sandboxes together [default: 3/4 of the host's; 0: leave as is]."),
    ("--cgroup-pids", "N",
     "Tasks of all sandboxes together [default: half of pid_max or threads-max]."),
    # The operator's view (docs/operations.md), forwarded the same way.
    ("--http", "HOST:PORT|off",
     "Serve /metrics and the web dashboard here, or 'off' [env AVIATO_HTTP; default: "
     "127.0.0.1 on a free port, unless --listen names a non-loopback address]."),
    ("--usage-interval", "SECONDS",
     "Sample each sandbox's CPU, memory and tasks this often [default 5; 0: never]."),
    # The warm pool (server/warm_pool.py), forwarded the same way.
    ("--warm-pool", "N",
     "Keep N sandboxes of the default shape ready for creates [env AVIATO_WARM_POOL; "
     "default 0]."),
    # The retention of ended sandboxes (server/retention.py), forwarded the same way.
    ("--keep-stopped", "DURATION",
     "Remove a sandbox's record and log this long after it ended, e.g. 12h or 7d "
     "[env AVIATO_KEEP_STOPPED; default 7d; 0: keep them until deleted]."),
)  # fmt: skip


def limit_options(fn: Callable[..., None]) -> Callable[..., None]:
    for flag, metavar, text in reversed(_LIMIT_OPTIONS):
        fn = click.option(flag, metavar=metavar, help=text)(fn)
    return fn


def _limit_argv(values: Mapping[str, str | None]) -> list[str]:
    argv: list[str] = []
    for flag, _, _ in _LIMIT_OPTIONS:
        value = values.get(flag.lstrip("-").replace("-", "_"))
        if value is not None:
            argv += [flag, str(value)]
    return argv


@click.group(invoke_without_command=True)
@click.option(
    "--state-dir",
    type=click.Path(file_okay=False),
    envvar="AVIATO_STATE_DIR",
    help="State directory of the service [env AVIATO_STATE_DIR; default ~/.local/state/aviato].",
)
@listen_option
@tls_cert_option
@tls_key_option
@click.option(
    "--placement",
    type=click.Choice(["local", "ray"]),
    default="local",
    help="Where sandboxes run: this machine, or the nodes of a Ray cluster (docs/cluster.md).",
)
@click.option("--ray-address", metavar="HOST:PORT", help="The Ray cluster to join (with ray).")
@click.option(
    "--insecure-registry",
    "insecure_registries",
    multiple=True,
    metavar="HOST[:PORT]",
    help="Allow plain HTTP and loopback/private addresses for this registry (repeatable; "
    "also AVIATO_INSECURE_REGISTRIES, comma-separated).",
)
@click.option(
    "--max-image-size",
    metavar="QUANTITY",
    help="Refuse images that unpack to more than this, e.g. 32Gi [default 16Gi].",
)
@click.option(
    "--max-image-files",
    metavar="N",
    help="Refuse images whose layers hold more entries than this [default 1000000].",
)
@click.option(
    "--allow-host-mount",
    "host_mounts",
    multiple=True,
    metavar="DIR",
    help="Sandboxes may mount this host directory, or one below it, read-only (repeatable; "
    "docs/volumes.md).",
)
@click.option(
    "--volume-max-size",
    metavar="QUANTITY",
    help="A volume holding this much can no longer be mounted read-write [default 10Gi].",
)
@limit_options
@click.pass_context
def server(
    ctx: click.Context,
    /,
    state_dir: str | None,
    listen: str | None,
    tls_cert: str | None,
    tls_key: str | None,
    placement: str = "local",
    ray_address: str | None = None,
    insecure_registries: tuple[str, ...] = (),
    max_image_size: str | None = None,
    max_image_files: str | None = None,
    host_mounts: tuple[str, ...] = (),
    volume_max_size: str | None = None,
    **limits: str | None,
) -> None:
    """Run or manage the aviato service on this machine.

    Without a subcommand, runs the service in the foreground until Ctrl-C or SIGTERM. It always
    serves the unix socket of its state directory (no key needed: the socket is private to its
    user); with --listen it also serves TCP, where clients need an API key, and TLS when given a
    certificate and key.

    \b
    Examples:
      aviato server status
      aviato server start
      aviato keys create --owner alice
      aviato server --listen 0.0.0.0:7443 --tls-cert cert.pem --tls-key key.pem
      aviato server start --listen 127.0.0.1:7080
      aviato server --listen 0.0.0.0:7443 --owner-max-sandboxes 20 --owner-max-memory 32Gi
    """
    paths = _resolve(state_dir)
    ctx.obj = paths
    if ctx.invoked_subcommand is not None:
        if listen or tls_cert or tls_key or _limit_argv(limits):
            raise click.UsageError(
                f"put --listen/--tls-*/limits after the subcommand: "
                f"aviato server {ctx.invoked_subcommand} --listen ..."
            )
        if insecure_registries or max_image_size or max_image_files or host_mounts:
            raise click.UsageError(
                "--insecure-registry, --max-image-* and --allow-host-mount apply to the service "
                "run in the foreground (aviato server ...); for 'start', set "
                "AVIATO_INSECURE_REGISTRIES"
            )
        return
    _check_tls(listen, tls_cert, tls_key)
    if _server_info(paths) is not None:
        raise CliError(
            f"a service already runs for {paths.state_dir} (pid {_read_pid(paths) or '?'}); "
            "stop it first with 'aviato server stop'"
        )
    argv = [sys.executable, "-m", "aviato.server", "--state-dir", str(paths.state_dir)]
    argv += _server_args(listen, tls_cert, tls_key)
    if placement != "local":
        argv += ["--placement", placement]
    if ray_address:
        argv += ["--ray-address", ray_address]
    argv += _limit_argv(limits)
    for name in insecure_registries:
        argv += ["--insecure-registry", name]
    if max_image_size:
        argv += ["--max-image-size", max_image_size]
    if max_image_files:
        argv += ["--max-image-files", max_image_files]
    for directory in host_mounts:
        argv += ["--allow-host-mount", directory]
    if volume_max_size:
        argv += ["--volume-max-size", volume_max_size]
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(argv[0], argv)


@server.command()
@listen_option
@tls_cert_option
@tls_key_option
@limit_options
@click.pass_obj
def start(
    paths: _Paths,
    /,
    listen: str | None,
    tls_cert: str | None,
    tls_key: str | None,
    **limits: str | None,
) -> None:
    """Start the service in the background if it is not running.

    Its log goes to server.log in the state directory (`aviato server logs`). Commands and the
    SDK start it by themselves on first use; `start` is for starting it ahead of time, or with
    --listen to serve remote clients.

    \b
    Examples:
      aviato server start
      aviato server start --listen 127.0.0.1:7080
    """
    _check_tls(listen, tls_cert, tls_key)
    info = _server_info(paths)
    if info is not None:
        if listen:
            raise CliError(
                f"a service already runs for {paths.state_dir} (pid {_read_pid(paths) or '?'}); "
                "to serve --listen, stop it first with 'aviato server stop'"
            )
        click.echo(f"already running (pid {_read_pid(paths) or '?'}, socket {paths.socket})")
        return
    start_local_service(
        paths.state_dir, server_args=_server_args(listen, tls_cert, tls_key) + _limit_argv(limits)
    )
    where = f", listening on {listen}" if listen else ""
    click.echo(f"started (pid {_read_pid(paths) or '?'}, socket {paths.socket}{where})")


def _exited(pid: int) -> bool:
    """True once `pid` has exited: gone, or a zombie. A service the SDK started is a child of
    the program that started it, which reaps it only when it exits; until then the ended
    service stays a zombie that `kill(pid, 0)` still finds."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except FileNotFoundError:
        return True
    except OSError:  # no /proc: ask the kernel the plain way
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False
    return stat[stat.rfind(b")") + 2 : stat.rfind(b")") + 3] == b"Z"


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _exited(pid):
            return True
        time.sleep(0.05)
    return False


@server.command()
@click.option(
    "--timeout",
    type=click.FloatRange(min=0),
    default=STOP_TIMEOUT_SECONDS,
    show_default=True,
    help="Seconds to wait after SIGTERM before SIGKILL.",
)
@click.pass_obj
def stop(paths: _Paths, timeout: float) -> None:
    """Stop the service. Sandboxes keep running; the next start re-attaches them.

    \b
    Example:
      aviato server stop
    """
    pid = _read_pid(paths)
    if pid is None:
        click.echo("not running")
        return
    os.kill(pid, signal.SIGTERM)
    if not _wait_gone(pid, timeout):
        print_error(f"the service (pid {pid}) did not stop within {timeout:.0f}s; killing it")
        os.kill(pid, signal.SIGKILL)
        _wait_gone(pid, 5.0)
    click.echo(f"stopped (pid {pid})")


@server.command()
@click.pass_obj
def status(paths: _Paths) -> None:
    """Show whether the service runs, and how: version, isolation, cgroups, sandboxes.

    Exits 0 when it runs, 3 when it does not.

    \b
    Example:
      aviato server status
    """
    info = _server_info(paths)
    pid = _read_pid(paths)
    if info is None:
        print_fields(
            [
                ("state dir", str(paths.state_dir)),
                ("status", "not running" + (f" (pid {pid} does not answer)" if pid else "")),
            ]
        )
        raise SystemExit(NOT_RUNNING_STATUS)
    limit = f" of at most {info.max_sandboxes}" if info.max_sandboxes else ""
    print_fields(
        [
            ("state dir", info.state_dir or str(paths.state_dir)),
            ("status", "running"),
            ("pid", str(pid) if pid else "?"),
            ("socket", str(paths.socket)),
            ("log", str(paths.log)),
            ("version", info.version),
            ("placement", info.placement),
            ("runtime", info.runtime),
            ("cgroups", info.cgroups if info.cgroups != "none" else _NO_CGROUPS),
            ("all sandboxes", info.sandbox_limits or "-"),
            ("sandboxes", f"{info.sandboxes_running} running{limit}"),
            ("quota (local)", info.quota or "-"),
            ("egress", info.egress or "-"),
            ("http", f"{info.http} (/metrics, the dashboard at /)" if info.http else "off"),
            (
                "usage sampling",
                f"every {info.usage_interval_seconds:g} s"
                if info.usage_interval_seconds
                else "off",
            ),
            ("warm pool", info.warm_pool or "off"),
            ("keep stopped", info.kept_stopped or "-"),
        ]
    )


_NO_CGROUPS = (
    "none: sandboxes run without memory, pids or cpu limits, and creates that ask for limits "
    "are refused (run the service as root, or under a delegated cgroup v2 subtree)"
)


def _follow(path: Path, start: int) -> Iterator[bytes]:
    position = start
    while True:
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            size = 0
        if size < position:  # the log was truncated or replaced
            position = 0
        if size > position:
            with path.open("rb") as f:
                f.seek(position)
                data = f.read()
                position += len(data)
                yield data
        else:
            time.sleep(0.25)


@server.command("logs")
@click.option("-f", "--follow", is_flag=True, help="Keep printing new lines until Ctrl-C.")
@click.option("--tail", type=click.IntRange(min=0), metavar="N", help="Only the last N lines.")
@click.pass_obj
def server_logs(paths: _Paths, follow: bool, tail: int | None) -> None:
    """Print the service's log (server.log in the state directory).

    \b
    Examples:
      aviato server logs --tail 50
      aviato server logs -f
    """
    try:
        data = paths.log.read_bytes()
    except FileNotFoundError:
        if not follow:
            raise CliError(f"no log yet at {paths.log}: the service has never run there") from None
        data = b""
    shown = data
    if tail is not None:
        lines = data.splitlines(keepends=True)
        shown = b"".join(lines[-tail:]) if tail else b""
    out = sys.stdout.buffer
    out.write(shown)
    out.flush()
    if follow:
        for chunk in _follow(paths.log, len(data)):
            out.write(chunk)
            out.flush()
