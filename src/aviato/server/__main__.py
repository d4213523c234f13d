"""`python -m aviato.server`: runs the service in the foreground until SIGTERM or SIGINT.

On either signal the service closes gracefully *without* stopping sandboxes; a later start
re-attaches them. Exit status: 0 after a clean shutdown, 2 on bad arguments, 1 when the service
cannot start (the reason is logged to stderr).
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aviato.images.egress import parse_registry_name
from aviato.images.limits import DEFAULT_MAX_IMAGE_BYTES, DEFAULT_MAX_IMAGE_ENTRIES
from aviato.images.reference import InvalidReference, parse_reference
from aviato.server.app import StartupError, configure_logging, serve
from aviato.server.config import (
    DEFAULT_MAX_LIFETIME_SECONDS,
    DEFAULT_MAX_SANDBOXES,
    DEFAULT_MIN_FREE_DISK_BYTES,
    ServerConfig,
    default_http,
    default_min_free_memory_bytes,
    parse_listen,
    resolve_state_dir,
)
from aviato.server.quotas import Quota
from aviato.server.retention import DEFAULT_KEEP_STOPPED_SECONDS, MAX_KEEP_STOPPED_SECONDS
from aviato.v1 import durations, quantities


def _memory(text: str) -> int:
    try:
        return quantities.parse_bytes(text)
    except quantities.QuantityError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _image(text: str) -> str:
    if text == "host":
        return text
    try:
        parse_reference(text)
    except InvalidReference as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def _registry_name(text: str) -> str:
    try:
        parse_registry_name(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text.strip()


def _insecure_from_env() -> list[str]:
    """AVIATO_INSECURE_REGISTRIES: comma-separated HOST or HOST:PORT names."""
    raw = os.environ.get("AVIATO_INSECURE_REGISTRIES", "")
    names = [n.strip() for n in raw.split(",") if n.strip()]
    for name in names:
        parse_registry_name(name)  # ValueError saying what is wrong
    return names


def _http(text: str) -> str:
    """--http: HOST:PORT, or "off" (no HTTP side, also on loopback)."""
    return text if text == "off" else _listen(text)


def _listen(text: str) -> str:
    try:
        parse_listen(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def _addresses(text: str) -> tuple[str, ...]:
    """A comma-separated list of IP addresses (DNS servers)."""
    out: list[str] = []
    for item in text.split(","):
        try:
            out.append(str(ipaddress.ip_address(item.strip())))
        except ValueError:
            raise argparse.ArgumentTypeError(f"{item.strip()!r} is not an IP address") from None
    return tuple(out)


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be 0 or more")
    return value


def _cpu(text: str) -> int:
    try:
        return quantities.parse_cpu_millis(text)
    except quantities.QuantityError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


# Flags whose default comes from an environment variable, checked like the flag's own value
# (an error names the variable): dest -> (variable, parse, default when neither is set).
_ENV_DEFAULTS: dict[str, tuple[str, Callable[[str], Any], Any]] = {}


def _env(dest: str, name: str, parse: Callable[[str], Any], default: Any) -> None:
    """Registers `name` as the environment variable behind the flag `dest` (default None)."""
    _ENV_DEFAULTS[dest] = (name, parse, default)


def _apply_env(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    for dest, (name, parse, default) in _ENV_DEFAULTS.items():
        if getattr(args, dest) is not None:
            continue
        text = os.environ.get(name)
        if not text:
            setattr(args, dest, default)
            continue
        try:
            setattr(args, dest, parse(text))
        except argparse.ArgumentTypeError as e:
            p.error(f"{name}={text!r}: {e}")


def _seconds_or_zero(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 <= value <= 3600:
        raise argparse.ArgumentTypeError(f"{text!r} must be 0 (off) to 3600 seconds")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive finite number")
    return value


_env("owner_max_sandboxes", "AVIATO_OWNER_MAX_SANDBOXES", _count, 0)
_env("owner_max_cpu", "AVIATO_OWNER_MAX_CPU", _cpu, 0)
_env("owner_max_memory", "AVIATO_OWNER_MAX_MEMORY", _memory, 0)
_env("owner_max_disk", "AVIATO_OWNER_MAX_DISK", _memory, 0)
_env("cgroup_parent", "AVIATO_CGROUP_PARENT", str, "aviato")
_env("cgroup_memory", "AVIATO_CGROUP_MEMORY", _memory, None)  # None: derived from the host
_env("cgroup_pids", "AVIATO_CGROUP_PIDS", _count, None)
_env("warm_pool", "AVIATO_WARM_POOL", _count, 0)


def _keep_stopped(text: str) -> float:
    """--keep-stopped: a duration (`aviato.v1.durations`), 0 for forever, at most 100 years."""
    try:
        seconds = durations.parse_duration(text, allow_zero=True)
    except durations.DurationError as e:
        raise argparse.ArgumentTypeError(f"{e} (seconds, or a number with s, m, h or d; "
                                         "0: keep forever)") from None  # fmt: skip
    if seconds > MAX_KEEP_STOPPED_SECONDS:
        raise argparse.ArgumentTypeError(f"{text!r} is more than 100 years (0: keep forever)")
    return seconds


_env("keep_stopped", "AVIATO_KEEP_STOPPED", _keep_stopped, DEFAULT_KEEP_STOPPED_SECONDS)


def _host_dir(text: str) -> str:
    """--allow-host-mount: an existing absolute directory, kept as its real path."""
    if not os.path.isabs(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not an absolute path")
    real = os.path.realpath(text)
    if not os.path.isdir(real):
        raise argparse.ArgumentTypeError(f"{text!r} is not a directory")
    if real == "/":
        raise argparse.ArgumentTypeError("the whole host ('/') cannot be allowed")
    return real


def parse_args(argv: list[str] | None = None) -> ServerConfig:
    p = argparse.ArgumentParser(prog="python -m aviato.server", description=__doc__)
    p.add_argument("--state-dir", help="state directory (default: $AVIATO_STATE_DIR, "
                   "$XDG_STATE_HOME/aviato or ~/.local/state/aviato)")  # fmt: skip
    p.add_argument("--listen", type=_listen, metavar="HOST:PORT",
                   help="also serve TCP here (API keys required)")  # fmt: skip
    p.add_argument("--tls-cert", type=Path, help="PEM certificate chain for --listen")
    p.add_argument("--tls-key", type=Path, help="PEM private key for --listen")
    p.add_argument("--http", type=_http, metavar="HOST:PORT|off", default=None,
                   help="serve /metrics and the dashboard here, or 'off' (docs/operations.md;"
                        " default: $AVIATO_HTTP, else 127.0.0.1 on a free port unless --listen "
                        "names a non-loopback address)")  # fmt: skip
    p.add_argument("--usage-interval", type=_seconds_or_zero, default=5.0, metavar="SECONDS",
                   help="sample each sandbox's CPU, memory and tasks this often "
                        "(default 5; 0: never)")  # fmt: skip
    p.add_argument("--placement", choices=["local", "ray"], default="local",
                   help="ray: the nodes of a Ray cluster (docs/cluster.md)")  # fmt: skip
    p.add_argument("--ray-address", default="", metavar="HOST:PORT",
                   help="the Ray cluster's GCS address (default: $RAY_ADDRESS)")  # fmt: skip
    p.add_argument("--ray-namespace", default="aviato", help="Ray namespace of the node hosts")
    p.add_argument("--ray-node-state-dir", default="/var/lib/aviato/node", metavar="DIR",
                   help="state directory on every node (a subdirectory per node id)")  # fmt: skip
    p.add_argument("--ray-node-lease", type=_positive_float, default=10.0, metavar="SECONDS",
                   help="a node cut off this long stops its sandboxes")  # fmt: skip
    p.add_argument("--placement-timeout", type=_positive_float, default=300.0,
                   metavar="SECONDS", help="a sandbox without a node this long fails")  # fmt: skip
    p.add_argument("--egress-dns", type=_addresses, default=(), metavar="ADDR[,ADDR]",
                   help="DNS servers the egress proxy resolves sandboxes' names with "
                        "(default: the host's /etc/resolv.conf)")  # fmt: skip
    p.add_argument("--writable-layer", choices=("memory", "disk"), default="memory",
                   help="where a sandbox's writable layer lives unless its spec says: "
                        "'memory' (a tmpfs; the default) or 'disk' (a filesystem of the "
                        "sandbox's disk size under the state directory; needs root)")  # fmt: skip
    p.add_argument("--max-sandboxes", type=int, default=DEFAULT_MAX_SANDBOXES,
                   help="live sandboxes at most (0: no bound)")  # fmt: skip
    p.add_argument("--warm-pool", type=_count, default=None, metavar="N",
                   help="keep N sandboxes of the default shape (default image and limits, "
                        "nothing else asked) started, each handed out once to a create that "
                        "asks for exactly that (env AVIATO_WARM_POOL; default 0: none; "
                        "--placement local only)")  # fmt: skip
    p.add_argument("--keep-stopped", type=_keep_stopped, default=None, metavar="DURATION",
                   help="remove the record and kept log of a sandbox this long after it ended "
                        "(stopped, exited or failed): seconds, or a number with s, m, h or d "
                        "such as 12h or 7d (env AVIATO_KEEP_STOPPED; default 7d; 0: keep them "
                        "forever, until deleted)")  # fmt: skip
    p.add_argument("--max-memory", type=_memory, default=0, metavar="QUANTITY",
                   help="bound on the sum of live sandboxes' memory limits, e.g. 16Gi "
                        "(0: no bound)")  # fmt: skip
    p.add_argument("--min-free-memory", type=_memory, default=None, metavar="QUANTITY",
                   help="refuse creates while the host has less memory available than this "
                        "(default: 5%% of the host's memory, at most 1Gi; 0: none)")  # fmt: skip
    p.add_argument("--min-free-disk", type=_memory, default=DEFAULT_MIN_FREE_DISK_BYTES,
                   metavar="QUANTITY",
                   help="refuse creates while the state directory's filesystem has less free "
                        "space than this, and pulls that would go below it (logs, images; "
                        "default 256Mi; 0: no floor)")  # fmt: skip
    quota = p.add_argument_group(
        "per-owner quotas",
        "bounds on each owner's live sandboxes (0: no bound); `aviato keys quota` sets an "
        "owner's own values; a sandbox without a cpu limit counts as all of the host's cores",
    )
    quota.add_argument(
        "--owner-max-sandboxes", type=_count, metavar="N",
        help="live sandboxes per owner (env AVIATO_OWNER_MAX_SANDBOXES)",
    )  # fmt: skip
    quota.add_argument(
        "--owner-max-cpu", type=_cpu, metavar="CPUS",
        help="sum of cpu limits per owner, e.g. 8 (env AVIATO_OWNER_MAX_CPU)",
    )  # fmt: skip
    quota.add_argument(
        "--owner-max-memory", type=_memory, metavar="QUANTITY",
        help="sum of memory limits per owner, e.g. 16Gi (env AVIATO_OWNER_MAX_MEMORY)",
    )  # fmt: skip
    quota.add_argument(
        "--owner-max-disk", type=_memory, metavar="QUANTITY",
        help="sum of disk sizes per owner (env AVIATO_OWNER_MAX_DISK)",
    )  # fmt: skip
    host = p.add_argument_group(
        "all sandboxes together",
        "limits of the parent cgroup that holds every sandbox's cgroup, written at start "
        "(0: leave the parent's limit as it is)",
    )
    host.add_argument(
        "--cgroup-parent", metavar="PATH",
        help="the parent cgroup, relative to each hierarchy's root "
             "(default aviato; env AVIATO_CGROUP_PARENT)",
    )  # fmt: skip
    host.add_argument(
        "--cgroup-memory", type=_memory, metavar="QUANTITY",
        help="memory of all sandboxes together, their writable layers included "
             "(default 3/4 of the host's memory; env AVIATO_CGROUP_MEMORY)",
    )  # fmt: skip
    host.add_argument(
        "--cgroup-pids", type=_count, metavar="N",
        help="processes and threads of all sandboxes together (default half of "
             "kernel.pid_max or kernel.threads-max, whichever is smaller; env AVIATO_CGROUP_PIDS)",
    )  # fmt: skip
    p.add_argument("--default-max-lifetime", type=_positive_float,
                   default=DEFAULT_MAX_LIFETIME_SECONDS, metavar="SECONDS")  # fmt: skip
    p.add_argument("--default-image", type=_image, metavar="IMAGE",
                   default=os.environ.get("AVIATO_DEFAULT_IMAGE") or "host",
                   help="image of sandboxes whose spec names none: 'host' or an OCI reference "
                        "such as python:3.11 (default: $AVIATO_DEFAULT_IMAGE, else host; "
                        "docs/images.md)")  # fmt: skip
    p.add_argument("--insecure-registry", action="append", default=[], metavar="HOST[:PORT]",
                   type=_registry_name,
                   help="allow plain HTTP and loopback/private addresses for this registry "
                        "(HOST: every port); repeatable; also $AVIATO_INSECURE_REGISTRIES, "
                        "comma-separated")  # fmt: skip
    p.add_argument("--max-image-size", type=_memory, default=DEFAULT_MAX_IMAGE_BYTES,
                   metavar="QUANTITY",
                   help="refuse images that unpack to more than this, e.g. 32Gi (default 16Gi; "
                        "0: no bound)")  # fmt: skip
    p.add_argument("--max-image-files", type=_count, default=DEFAULT_MAX_IMAGE_ENTRIES,
                   metavar="N",
                   help="refuse images whose layers hold more entries than this (default "
                        f"{DEFAULT_MAX_IMAGE_ENTRIES}; 0: no bound)")  # fmt: skip
    vol = p.add_argument_group("volumes", "named volumes and host directories (docs/volumes.md)")
    vol.add_argument(
        "--allow-host-mount", action="append", default=[], metavar="DIR", type=_host_dir,
        help="sandboxes may mount this host directory, or one below it, read-only; repeatable",
    )  # fmt: skip
    vol.add_argument(
        "--volume-max-size", type=_memory, default=10 << 30, metavar="QUANTITY",
        help="the size of a new volume (a filesystem of its own: a hard bound) and the largest "
             "one may ask for; an older (directory) volume holding this much can no longer be "
             "mounted read-write (default 10Gi; 0: new volumes are unbounded directories)",
    )  # fmt: skip
    vol.add_argument(
        "--owner-max-volumes", type=_count, default=64, metavar="N",
        help="volumes per owner (default 64; 0: no bound)",
    )  # fmt: skip
    vol.add_argument(
        "--ray-volume-dir", default="", metavar="DIR",
        help="--placement ray: keep new volumes in DIR, a shared filesystem mounted at the same "
             "path on every node and here (one that supports id-mapped mounts, e.g. CephFS; "
             "not NFS), usable from any node; sizes are then measured, not enforced",
    )  # fmt: skip
    p.add_argument("--log-level", default="INFO",
                   choices=["DEBUG", "INFO", "WARNING", "ERROR", "debug", "info", "warning",
                            "error"])  # fmt: skip
    args = p.parse_args(argv)
    _apply_env(p, args)
    try:
        insecure = [*args.insecure_registry, *_insecure_from_env()]
    except ValueError as e:
        p.error(f"AVIATO_INSECURE_REGISTRIES: {e}")
    if args.max_sandboxes < 0:
        p.error("--max-sandboxes must be >= 0")
    parent = args.cgroup_parent.strip("/")
    if not parent or any(part in ("", ".", "..") for part in parent.split("/")):
        p.error(f"--cgroup-parent: {args.cgroup_parent!r} is not a relative cgroup path")
    if bool(args.tls_cert) != bool(args.tls_key):
        p.error("--tls-cert and --tls-key must be given together")
    if args.warm_pool and args.placement != "local":
        p.error("--warm-pool (AVIATO_WARM_POOL) needs --placement local")
    if args.ray_volume_dir and args.placement != "ray":
        p.error("--ray-volume-dir needs --placement ray")
    if args.ray_volume_dir and not os.path.isabs(args.ray_volume_dir):
        p.error(f"--ray-volume-dir: {args.ray_volume_dir!r} is not an absolute path")
    if args.tls_cert and not (args.listen or args.http not in (None, "off")):
        p.error("--tls-cert/--tls-key need --listen or --http")
    http = args.http or os.environ.get("AVIATO_HTTP") or None
    http_by_default = http is None
    if http is None:
        http = default_http(args.listen)
    elif http == "off":
        http = None
    else:
        try:
            parse_listen(http)
        except ValueError as e:
            p.error(f"--http / AVIATO_HTTP: {e}".replace("--listen: ", ""))
    return ServerConfig(
        state_dir=resolve_state_dir(args.state_dir),
        listen=args.listen,
        tls_cert=args.tls_cert.absolute() if args.tls_cert else None,
        tls_key=args.tls_key.absolute() if args.tls_key else None,
        placement=args.placement,
        max_sandboxes=args.max_sandboxes,
        egress_dns=args.egress_dns,
        max_memory_bytes=args.max_memory,
        min_free_disk_bytes=args.min_free_disk,
        min_free_memory_bytes=(
            default_min_free_memory_bytes()
            if args.min_free_memory is None
            else args.min_free_memory
        ),
        default_max_lifetime_seconds=args.default_max_lifetime,
        owner_quota=Quota(
            sandboxes=args.owner_max_sandboxes,
            cpu_millis=args.owner_max_cpu,
            memory_bytes=args.owner_max_memory,
            disk_bytes=args.owner_max_disk,
        ),
        cgroup_parent=parent,
        cgroup_memory_bytes=args.cgroup_memory,
        cgroup_pids=args.cgroup_pids,
        log_level=args.log_level.upper(),
        default_image=args.default_image,
        default_writable_layer=args.writable_layer,
        insecure_registries=tuple(dict.fromkeys(insecure)),
        max_image_bytes=args.max_image_size,
        max_image_entries=args.max_image_files,
        ray_address=args.ray_address or os.environ.get("RAY_ADDRESS", ""),
        ray_namespace=args.ray_namespace,
        ray_node_state_dir=args.ray_node_state_dir,
        ray_node_lease_seconds=args.ray_node_lease,
        placement_timeout_seconds=args.placement_timeout,
        volume_max_bytes=args.volume_max_size,
        owner_max_volumes=args.owner_max_volumes,
        allow_host_mounts=tuple(dict.fromkeys(args.allow_host_mount)),
        ray_volume_dir=args.ray_volume_dir,
        usage_interval_seconds=args.usage_interval,
        http=http,
        http_by_default=http_by_default and http is not None,
        warm_pool=args.warm_pool,
        keep_stopped_seconds=args.keep_stopped,
    )


async def _main(config: ServerConfig) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signo in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signo, stop.set)
    await serve(config, stop)


# grpc.aio runs its completion-queue poller in a second thread that hands every event to the
# loop thread; with the default 5 ms GIL switch interval those handoffs add up to a
# measurable part of an exec round trip (about 0.3 ms here). A shorter interval costs a little
# throughput on CPU-bound threads, which the service does not have.
GIL_SWITCH_INTERVAL_SECONDS = 0.0005


def main(argv: list[str] | None = None) -> int:
    config = parse_args(argv)
    configure_logging(config.log_level)
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_SECONDS)
    try:
        asyncio.run(_main(config))
    except StartupError as e:
        logging.getLogger("aviato.server").error("cannot start: %s", e)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
