"""`aviato run | ls | get | stop | rm`: sandboxes as records, through the public SDK (pause,
resume and extend are in pausing.py).

These commands are plain uses of `aviato.Sandbox` (run, list, from_id, stop, delete), so that
what the command line shows is what a Python user of the SDK gets. Operations on several
sandboxes are started together and collected afterwards — the SDK's handles run concurrently —
and each failure is reported on its own line, the others still being carried out.

Sandboxes made by `aviato run` belong to no session: they outlive the command and run until
stopped, until their main process ends, or until their lifetime (the service's default is one
hour; `--lifetime` changes it).
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Sequence
from typing import Any

import click

from aviato import HostMount, NetworkOptions, Sandbox, SandboxFailedError, SandboxStatus, Volume
from aviato.cli import network as network_cli
from aviato.cli._output import (
    CliError,
    age,
    describe,
    iso,
    print_error,
    print_fields,
    print_json,
    print_table,
)
from aviato.cli._params import (
    absolute_path,
    cpus,
    duration,
    duration_or_zero,
    env_option,
    label_pairs,
    size,
)
from aviato.cli._reach import preflight
from aviato.cli.images import credential_options, read_credentials
from aviato.cli.volumes import parse_volume_options

STATUS_CHOICES = [s.value for s in SandboxStatus if s is not SandboxStatus.UNSPECIFIED]
START_TIMEOUT_SECONDS = 120.0
STATUS_WIDTH = 48  # `ls` cuts long failure reasons; `get` shows them whole
CONFIRM_ABOVE = 5  # rm asks before deleting more than this many (or with --all)


def _status_text(sb: Sandbox, limit: int | None = None) -> str:
    """`running`, or for an ended sandbox `failed (exit 1, OOMKilled)`; cut to `limit` chars."""
    status = sb.status.value if sb.status else "unknown"
    details = []
    if sb.status is not None and sb.status.is_terminal:
        if sb.returncode is not None:
            details.append(f"exit {sb.returncode}")
        if sb.status_reason:
            details.append(sb.status_reason)
    text = f"{status} ({', '.join(details)})" if details else status
    if limit is not None and len(text) > limit:
        text = text[: limit - 2] + "…)"
    return text


def _as_dict(sb: Sandbox) -> dict[str, Any]:
    return {
        "id": sb.sandbox_id,
        "status": sb.status.value if sb.status else None,
        "status_reason": sb.status_reason,
        "exit_code": sb.returncode,
        "image": sb.container_image,
        "tags": sb.tags,
        "node": sb.node,
        "exposed_ports": {str(port): address for port, address in sb.exposed_ports},
        "egress_mode": sb.applied_egress_mode,
        "egress": [rule.dns_name or rule.cidr for rule in sb.egress_rules],
        "network_usage": dataclasses.asdict(sb.network_usage),
        "resources": sb.resources,
        "mounts": [_mount_dict(path, mount) for path, mount in sb.volumes.items()],
        "secrets": sb.secrets,
        "created_at": iso(sb.created_at),
        "started_at": iso(sb.started_at),
        "ended_at": iso(sb.ended_at),
        "expires_at": iso(sb.expires_at),
    }


def _network(ports: Sequence[int], internet: bool, allow: Sequence[str]) -> NetworkOptions | None:
    egress = network_cli.egress_options(internet, allow)
    if not ports:
        return egress
    return dataclasses.replace(egress or NetworkOptions(), exposed_ports=tuple(ports))


def _resources(cpu: str | None, memory: str | None) -> dict[str, str] | None:
    resources = {key: value for key, value in (("cpu", cpu), ("memory", memory)) if value}
    return resources or None


@click.command(context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@click.option(
    "--image", metavar="IMAGE", help="Image of the sandbox [default: $AVIATO_IMAGE, else host]."
)
@click.option(
    "--image-command",
    is_flag=True,
    help="Run the image's own Entrypoint + Cmd as the main process (not with a CMD).",
)
@credential_options
@click.option(
    "-t",
    "--tag",
    "tags",
    multiple=True,
    metavar="TAG",
    help="Tag it (repeatable); ls and rm select by tag.",
)
@env_option("Set a variable for every process (repeatable).")
@click.option("--cpu", metavar="CPUS", callback=cpus, help="CPU limit: 0.5, 500m, 2.")
@click.option("--memory", metavar="SIZE", callback=size, help="Memory limit: 512Mi, 2Gi.")
@click.option(
    "--lifetime",
    metavar="DURATION",
    callback=duration,
    help="Stop it after this long: 90s, 30m, 8h [default: 1h].",
)
@click.option(
    "--idle-timeout",
    "idle_timeout",
    metavar="DURATION",
    callback=duration,
    help="Stop it once it has run no command and moved no file for this long: 10m, 1h "
    "[default: never].",
)
@click.option(
    "-w", "--workdir", metavar="DIR", callback=absolute_path,
    help="Working directory [default: /workspace].",
)  # fmt: skip
@click.option(
    "--node-selector",
    "node_selector",
    multiple=True,
    metavar="LABEL=VALUE",
    callback=label_pairs,
    help="Run it on a node with this label (repeatable: all must match); a service on a "
    "cluster only (docs/cluster.md).",
)
@click.option(
    "-p",
    "--port",
    "ports",
    multiple=True,
    type=click.IntRange(1, 65535),
    metavar="PORT",
    help="Expose this TCP port of the sandbox's loopback at an address on this host's "
    "127.0.0.1 (repeatable; see `aviato port`).",
)
@click.option("--internet", is_flag=True, help=network_cli.INTERNET_HELP)
@click.option("--allow", multiple=True, metavar="NAME|CIDR", help=network_cli.ALLOW_HELP)
@click.option(
    "-v",
    "--volume",
    "volume_options",
    multiple=True,
    metavar="NAME:/PATH[:ro]",
    help="Mount your volume NAME at /PATH (created on first use; :ro read-only), or a host "
    "directory the operator allows, /HOST/DIR:/PATH (read-only). Repeatable.",
)
@click.option(
    "--disk-layer", "disk_layer", flag_value="disk", default=None,
    help="Keep its files on the service's disk (a filesystem of its disk size), not in memory.",
)  # fmt: skip
@click.option("--snapshot", metavar="SNAPSHOT", help="Start from this snapshot's files.")
@click.option(
    "--secret",
    "secret_names",
    multiple=True,
    metavar="NAME",
    help="Put your secret NAME (see `aviato secret`) into its environment (repeatable).",
)
@click.option(
    "--wait/--no-wait",
    default=True,
    show_default=True,
    help="Return once it runs (failing if it cannot start), or right after it is created.",
)
@click.argument("command", nargs=-1, type=click.UNPROCESSED, metavar="[-- CMD ...]")
def run(
    image: str | None,
    image_command: bool,
    username: str,
    password_stdin: bool,
    tags: tuple[str, ...],
    env: tuple[tuple[str, str], ...],
    cpu: str | None,
    memory: str | None,
    lifetime: float | None,
    idle_timeout: float | None,
    workdir: str | None,
    node_selector: dict[str, str],
    ports: tuple[int, ...],
    internet: bool,
    allow: tuple[str, ...],
    volume_options: tuple[str, ...],
    disk_layer: str | None,
    snapshot: str | None,
    secret_names: tuple[str, ...],
    wait: bool,
    command: tuple[str, ...],
) -> None:
    """Create a sandbox and print its id.

    Without CMD the sandbox waits for commands (`aviato exec`, `aviato sh`) until it is stopped;
    with CMD, that command is its main process and the sandbox ends when it exits (see `aviato
    logs`). With --image-command, the image's own Entrypoint + Cmd is the main process, as in
    `docker run IMAGE`. Options go before CMD. The id is printed once the sandbox runs, or at
    once with --no-wait; a sandbox that cannot start is an error (its record stays, see `ls
    --all`). An image is pulled on first use (or ahead of time with `aviato image pull`); for a
    private registry give --username and the password (or a token, without --username) on stdin.

    \b
    Examples:
      aviato run
      id=$(aviato run --tag eval --memory 1Gi --cpu 1 --lifetime 2h)
      aviato run -e SEED=3 -- python3 -c 'import os; print(os.environ["SEED"])'
      aviato run --image python:3.11 -- python3 -c 'print(1)'
      id=$(aviato run --image ghcr.io/org/job:1.4 --image-command); aviato logs -f "$id"
      aviato run --image 127.0.0.1:5000/team/app:1 --username bob --password-stdin <pw.txt
      aviato run --node-selector pool=gpu --memory 8Gi
      id=$(aviato run -p 8080 -- python3 -m http.server 8080); aviato port "$id" 8080
      aviato run --allow pypi.org --allow files.pythonhosted.org -- pip install requests
      aviato run -v cache:/cache -v /data/datasets/imagenet:/datasets
      aviato run --secret OPENAI_API_KEY -- python3 agent.py
    """
    argv = list(command)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if image_command and argv:
        raise CliError("--image-command runs the image's Entrypoint + Cmd: give it or a CMD")
    credentials = read_credentials(username, password_stdin)
    mounts = parse_volume_options(volume_options)
    preflight()
    sandbox = Sandbox.run(
        *argv,
        container_image=image,
        tags=list(tags) or None,
        environment_variables=dict(env) or None,
        resources=_resources(cpu, memory),
        max_lifetime_seconds=lifetime,
        idle_timeout_seconds=idle_timeout,
        working_dir=workdir,
        image_command=image_command or None,
        image_pull_credentials=credentials,
        node_selector=node_selector or None,
        network=_network(ports, internet, allow),
        volumes=mounts,
        writable_layer=disk_layer,
        snapshot=snapshot,
        secrets=list(secret_names) or None,
    )
    if wait:
        try:
            sandbox.wait(timeout=START_TIMEOUT_SECONDS)
        except SandboxFailedError as exc:
            if exc.returncode is None:  # it never ran; a CMD that exited non-zero did run
                raise
    click.echo(sandbox.sandbox_id)


@click.command()
@click.option(
    "-t",
    "--tag",
    "tags",
    multiple=True,
    metavar="TAG",
    help="Only sandboxes with this tag (repeatable: all of them).",
)
@click.option(
    "-s",
    "--status",
    type=click.Choice(STATUS_CHOICES, case_sensitive=False),
    help="Only sandboxes in this status.",
)
@click.option("-a", "--all", "show_all", is_flag=True, help="Include sandboxes that have ended.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array of records.")
@click.option("-q", "--quiet", is_flag=True, help="Print only ids, one per line.")
def ls(
    tags: tuple[str, ...], status: str | None, show_all: bool, as_json: bool, quiet: bool
) -> None:
    """List sandboxes: those not yet ended, or all with --all.

    \b
    Examples:
      aviato ls
      aviato ls --all --tag eval
      aviato ls -q --status running | xargs aviato stop
      aviato ls --json | jq '.[].id'
    """
    if as_json and quiet:
        raise click.UsageError("--json and -q exclude each other")
    preflight()
    found = Sandbox.list(tags=list(tags) or None, status=status, include_stopped=show_all).result()
    if as_json:
        print_json([_as_dict(sb) for sb in found])
    elif quiet:
        for sb in found:
            click.echo(sb.sandbox_id)
    else:
        rows = [
            [
                sb.sandbox_id or "-",
                _status_text(sb, limit=STATUS_WIDTH),
                age(sb.created_at),
                sb.container_image,
                ",".join(sb.tags) or "-",
            ]
            for sb in found
        ]
        print_table(["ID", "STATUS", "AGE", "IMAGE", "TAGS"], rows, wrap=("STATUS", "TAGS"))


@click.command()
@click.argument("sandbox_id", metavar="ID")
@click.option("--json", "as_json", is_flag=True, help="Print the record as JSON.")
def get(sandbox_id: str, as_json: bool) -> None:
    """Show one sandbox's record.

    \b
    Examples:
      aviato get sbx-1a2b3c4d5e6f
      aviato get --json sbx-1a2b3c4d5e6f
    """
    preflight()
    sb = Sandbox.from_id(sandbox_id).result()
    if as_json:
        print_json(_as_dict(sb))
        return
    record = _as_dict(sb)
    print_fields(
        [
            ("id", record["id"]),
            ("status", _status_text(sb)),
            ("image", record["image"]),
            ("tags", ", ".join(sb.tags) or "-"),
            ("node", record["node"] or "-"),
            ("created", record["created_at"] or "-"),
            ("started", record["started_at"] or "-"),
            ("ended", record["ended_at"] or "-"),
            ("expires", record["expires_at"] or "-"),
            ("limits", _limits_text(sb.resources)),
            ("ports", _ports_text(sb)),
            ("egress", network_cli.egress_text(sb)),
            ("traffic", network_cli.usage_text(sb)),
            ("mounts", _mounts_text(sb)),
            ("secrets", ", ".join(sb.secrets) or "-"),
        ]
    )


def _limits_text(resources: dict[str, str | int]) -> str:
    """``cpu 500m, memory 1Gi, pids 1024, disk 1Gi`` (``cpu no limit`` without one)."""
    cpu = f"cpu {resources['cpu']}" if "cpu" in resources else "cpu no limit"
    rest = [f"{key} {resources[key]}" for key in ("memory", "pids", "disk") if key in resources]
    return ", ".join([cpu, *rest])


def _mount_dict(path: str, mount: Volume | HostMount) -> dict[str, Any]:
    if isinstance(mount, HostMount):
        return {"path": path, "host_path": mount.host_path, "read_only": True}
    return {"path": path, "volume": mount.name, "read_only": mount.read_only}


def _mounts_text(sb: Sandbox) -> str:
    """``/cache: volume cache, /data: host /srv/data (read-only)``; "-" without any."""
    parts = []
    for path, mount in sb.volumes.items():
        if isinstance(mount, HostMount):
            parts.append(f"{path}: host {mount.host_path} (read-only)")
        else:
            parts.append(
                f"{path}: volume {mount.name}" + (" (read-only)" if mount.read_only else "")
            )
    return ", ".join(parts) or "-"


def _ports_text(sb: Sandbox) -> str:
    """``8080 -> 127.0.0.1:41234, ...``; "-" when nothing is exposed or it is not running."""
    return ", ".join(f"{port} -> {address}" for port, address in sb.exposed_ports) or "-"


def _report(outcomes: Sequence[tuple[str, BaseException | None]]) -> None:
    """Print the ids that succeeded on stdout, one error line per failure, exit 1 if any."""
    failed = False
    for sandbox_id, error in outcomes:
        if error is None:
            click.echo(sandbox_id)
        else:
            failed = True
            print_error(describe(error))
    if failed:
        raise SystemExit(1)


@click.command()
@click.argument("sandbox_ids", nargs=-1, required=True, metavar="ID...")
@click.option(
    "--grace",
    metavar="DURATION",
    callback=duration_or_zero,
    default="10s",
    show_default="10s",
    help="Time between SIGTERM to the main process and SIGKILL to everything.",
)
def stop(sandbox_ids: tuple[str, ...], grace: float) -> None:
    """Stop sandboxes. Their records stay (see `ls --all`, `logs`) until `rm`.

    Prints each id once that sandbox has ended.

    \b
    Examples:
      aviato stop sbx-1a2b3c4d5e6f
      aviato ls -q --tag eval | xargs aviato stop --grace 0
    """
    preflight()
    lookups = [(sid, Sandbox.from_id(sid)) for sid in sandbox_ids]
    stops = []
    outcomes: list[tuple[str, BaseException | None]] = []
    for sid, ref in lookups:
        try:
            stops.append((sid, ref.result().stop(graceful_shutdown_seconds=grace)))
        except Exception as exc:
            outcomes.append((sid, exc))
    for sid, stop_ref in stops:
        try:
            stop_ref.result()
            outcomes.append((sid, None))
        except Exception as exc:
            outcomes.append((sid, exc))
    _report(outcomes)


def _confirm(count: int, everything: bool) -> None:
    if count <= CONFIRM_ABOVE and not (everything and count > 1):
        return
    if not sys.stdin.isatty():
        raise CliError(f"refusing to delete {count} sandboxes without confirmation; add -y")
    if not click.confirm(f"Delete {count} sandboxes?", default=False, err=True):
        raise CliError("nothing deleted")


@click.command()
@click.argument("sandbox_ids", nargs=-1, metavar="[ID...]")
@click.option(
    "-t",
    "--tag",
    "tags",
    multiple=True,
    metavar="TAG",
    help="Delete every sandbox with this tag (repeatable: all of them).",
)
@click.option(
    "-a", "--all", "everything", is_flag=True, help="Delete every sandbox, ended ones included."
)
@click.option("-y", "--yes", is_flag=True, help=f"Do not ask, even for more than {CONFIRM_ABOVE}.")
def rm(sandbox_ids: tuple[str, ...], tags: tuple[str, ...], everything: bool, yes: bool) -> None:
    """Delete sandboxes and their records, stopping those still running.

    Give ids, or select with --tag or --all. Asks first when deleting more than five, or with
    --all; -y skips the question (needed when stdin is not a terminal).

    \b
    Examples:
      aviato rm sbx-1a2b3c4d5e6f sbx-4d5e6f7a8b9c
      aviato rm --tag eval -y
    """
    if sandbox_ids and (tags or everything):
        raise click.UsageError("give ids, or select with --tag/--all, not both")
    if not (sandbox_ids or tags or everything):
        raise click.UsageError("give ids, or select with --tag or --all")
    preflight()
    by_selection = not sandbox_ids
    if by_selection:
        found = Sandbox.list(tags=list(tags) or None, include_stopped=True).result()
        ids = [sb.sandbox_id for sb in found if sb.sandbox_id]
        if not ids:
            return
    else:
        ids = list(dict.fromkeys(sandbox_ids))
    if not yes:
        _confirm(len(ids), everything)
    refs = [(sid, Sandbox.delete(sid, missing_ok=by_selection)) for sid in ids]
    outcomes: list[tuple[str, BaseException | None]] = []
    for sid, ref in refs:
        try:
            ref.result()
            outcomes.append((sid, None))
        except Exception as exc:
            outcomes.append((sid, exc))
    _report(outcomes)
