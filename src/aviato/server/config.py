"""The service's configuration and where its state lives.

State directory resolution follows docs/internals/layout.md: an explicit path, else
`$AVIATO_STATE_DIR`, else `$XDG_STATE_HOME/aviato`, else `~/.local/state/aviato`.

This module only describes; it does not create directories or check that a TLS file exists
(`app` does that when it starts, where the error can be reported).
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field
from pathlib import Path

from aviato.images.limits import DEFAULT_MAX_IMAGE_BYTES, DEFAULT_MAX_IMAGE_ENTRIES, PullLimits
from aviato.runtime.model import DEFAULT_DISK_BYTES, DEFAULT_MEMORY_BYTES, DEFAULT_PIDS
from aviato.server.quotas import Quota
from aviato.server.retention import DEFAULT_KEEP_STOPPED_SECONDS
from aviato.server.validation import DEFAULT_MAX_LIFETIME_SECONDS, SpecDefaults
from aviato.v1 import endpoint

__all__ = [
    "DEFAULT_KEEP_STOPPED_SECONDS",
    "DEFAULT_MAX_LIFETIME_SECONDS",
    "DEFAULT_MAX_SANDBOXES",
    "DEFAULT_MIN_FREE_DISK_BYTES",
    "LOOPBACK_HTTP",
    "ServerConfig",
    "available_memory_bytes",
    "default_http",
    "default_min_free_memory_bytes",
    "free_disk_bytes",
    "host_memory_bytes",
    "is_loopback",
    "parse_listen",
    "resolve_state_dir",
]

DEFAULT_MAX_SANDBOXES = 1000
DEFAULT_MIN_FREE_DISK_BYTES = 256 << 20


def resolve_state_dir(explicit: str | os.PathLike[str] | None = None) -> Path:
    """The state directory, absolute (`aviato.v1.endpoint.state_dir`); never created here."""
    return endpoint.state_dir(explicit)


def parse_listen(text: str) -> tuple[str, int]:
    """Splits "HOST:PORT" (or "[v6]:PORT"); raises ValueError with a readable message."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not port_text.isdigit():
        raise ValueError(f"--listen: {text!r} is not HOST:PORT")
    port = int(port_text)
    if not 0 <= port <= 65535:
        raise ValueError(f"--listen: port {port} out of range")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host or "0.0.0.0", port


#: Where the HTTP side listens when the operator says nothing and the service serves no other
#: host: loopback only, on a port the kernel picks (`aviato server status` shows it).
LOOPBACK_HTTP = "127.0.0.1:0"


def is_loopback(host: str) -> bool:
    """True for "localhost" and the loopback addresses (127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def default_http(listen: str | None) -> str | None:
    """The HTTP side's address when none was asked for: on for a service reachable only from
    this machine (no `--listen`, or a loopback one), off for one that listens on the network,
    whose operator chooses where its metrics and dashboard go."""
    if listen and not is_loopback(parse_listen(listen)[0]):
        return None
    return LOOPBACK_HTTP


def _meminfo_bytes(field: str) -> int | None:
    """A field of /proc/meminfo in bytes, or None when it cannot be read."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def available_memory_bytes() -> int | None:
    """MemAvailable of this machine, or None when /proc/meminfo cannot be read."""
    return _meminfo_bytes("MemAvailable")


def free_disk_bytes(path: Path) -> int | None:
    """Bytes available to this user on the filesystem of `path` (None when it cannot be read)."""
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def default_min_free_memory_bytes() -> int:
    """The default floor of host memory below which creates are refused: 5% of MemTotal, at
    most 1 GiB (0 when MemTotal is unknown, i.e. no floor)."""
    return min(host_memory_bytes() // 20, 1 << 30)


def host_memory_bytes() -> int:
    """MemTotal of this machine (0 when /proc/meminfo cannot be read)."""
    return _meminfo_bytes("MemTotal") or 0


@dataclass(frozen=True)
class ServerConfig:
    """Everything `app.serve` needs. Paths are absolute.

    Capacity: `max_sandboxes` counts non-terminal sandboxes; `max_memory_bytes` bounds the sum of
    the memory limits of non-terminal sandboxes, where a sandbox that asks for none counts as
    `default_memory_bytes` (the limit it gets). 0 means no bound. The bound is on
    limits, not on use: it cannot see memory that processes outside sandboxes take. That is what
    `min_free_memory_bytes` is for: while the host's MemAvailable is below it, creates are
    refused whatever the limits say (0: no floor). `min_free_disk_bytes` is the same for the
    filesystem of the state directory, which holds main logs (up to 64 MiB each), kept logs and
    the image store; a sandbox's writable layer is not there (it is memory). It applies to image
    pulls too, with `max_image_bytes` and `max_image_entries` (`image_limits`).

    `owner_quota` bounds each owner's live sandboxes (docs in `quotas`; an owner's own row in the
    registry replaces it). `cgroup_parent` is the cgroup under which every sandbox gets its own;
    `cgroup_memory_bytes` and `cgroup_pids` are written to that parent at start, so that all
    sandboxes together cannot take more of the host (0: the parent's limit is left as it is;
    None: the default of each machine that runs sandboxes, `ParentLimits.of_this_machine`).
    """

    state_dir: Path
    listen: str | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    placement: str = "local"
    max_sandboxes: int = DEFAULT_MAX_SANDBOXES
    max_memory_bytes: int = 0
    min_free_memory_bytes: int = 0
    min_free_disk_bytes: int = DEFAULT_MIN_FREE_DISK_BYTES
    # What a spec that names none gets (resolved once, at validation: `spec_defaults`).
    default_memory_bytes: int = DEFAULT_MEMORY_BYTES
    default_pids: int = DEFAULT_PIDS
    default_disk_bytes: int = DEFAULT_DISK_BYTES
    owner_quota: Quota = field(default_factory=Quota)
    cgroup_parent: str = "aviato"
    cgroup_memory_bytes: int | None = 0
    cgroup_pids: int | None = 0
    default_max_lifetime_seconds: float = DEFAULT_MAX_LIFETIME_SECONDS
    default_stop_grace_seconds: float = 10.0
    reaper_interval_seconds: float = 0.5
    # The DNS servers the egress proxy asks (addresses); empty: the host's /etc/resolv.conf.
    egress_dns: tuple[str, ...] = ()
    log_level: str = "INFO"
    # The image of a sandbox whose spec names none ("host", or an OCI reference such as
    # "python:3.11"); the registries that may be spoken to over plain HTTP and on loopback or
    # private addresses (HOST or HOST:PORT; docs/images.md); what one pull may unpack.
    default_image: str = "host"
    # Where a sandbox's writable layer lives when its spec does not say ("memory" or "disk").
    default_writable_layer: str = "memory"
    insecure_registries: tuple[str, ...] = ()
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    max_image_entries: int = DEFAULT_MAX_IMAGE_ENTRIES
    # --placement ray (docs/cluster.md): the cluster, the Ray namespace of the node-host actors,
    # where each node keeps its sandboxes' state (plus /<node id>), how long a sandbox may wait
    # for room before it fails, and how long a node may lose the cluster before it fences.
    ray_address: str = ""
    ray_namespace: str = "aviato"
    ray_node_state_dir: str = "/var/lib/aviato/node"
    placement_timeout_seconds: float = 300.0
    ray_node_lease_seconds: float = 10.0
    # Volumes (docs/volumes.md): the bound on each volume's size (a read-write mount of a volume
    # that holds this much is refused; 0: no bound), how many volumes each owner may have (0: no
    # bound), and the host directories sandboxes may mount read-only (resolved at start).
    # Under Ray, `ray_volume_dir`: a directory mounted at the same path on every node and on the
    # control plane's machine (shared storage), where new volumes live usable from any node.
    volume_max_bytes: int = 10 << 30
    owner_max_volumes: int = 64
    allow_host_mounts: tuple[str, ...] = ()
    ray_volume_dir: str = ""
    # The operator's view (docs/operations.md): how often each sandbox's usage is sampled (0:
    # never), and where the HTTP side (/metrics, the dashboard) listens (None: nowhere).
    # `http_by_default`: the address is the loopback default of a service that serves no other
    # host (`default_http`), not the operator's choice: it is bound once the API is ready, and
    # a failure to bind is a warning, not a failed start.
    usage_interval_seconds: float = 5.0
    http: str | None = None
    http_by_default: bool = False
    # Sandboxes of the default shape kept started ahead of demand (server/warm_pool.py; 0: none).
    warm_pool: int = 0
    # How long an ended sandbox's record and kept log stay (server/retention.py; 0: forever).
    keep_stopped_seconds: float = DEFAULT_KEEP_STOPPED_SECONDS

    def spec_defaults(self) -> SpecDefaults:
        """The defaults that validation resolves in every sandbox spec."""
        return SpecDefaults(
            image=self.default_image,
            memory_bytes=self.default_memory_bytes,
            pids=self.default_pids,
            disk_bytes=self.default_disk_bytes,
            max_lifetime_seconds=self.default_max_lifetime_seconds,
            writable_layer=self.default_writable_layer,
        )

    def image_limits(self) -> PullLimits:
        """What one pull may cost on a node (the free-disk floor applies to pulls too)."""
        return PullLimits(self.max_image_bytes, self.max_image_entries, self.min_free_disk_bytes)

    @property
    def socket_path(self) -> Path:
        return self.state_dir / endpoint.SOCKET_NAME

    @property
    def registry_path(self) -> Path:
        return self.state_dir / "registry.db"

    @property
    def pid_path(self) -> Path:
        return self.state_dir / "server.pid"

    @property
    def logs_dir(self) -> Path:
        """Where the service keeps main logs of terminal sandboxes until they are deleted or
        older than `keep_stopped_seconds`."""
        return self.state_dir / "logs"
