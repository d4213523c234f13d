"""The one internal model of a sandbox spec and of an exec request.

Everything past the public API speaks these types: the service's lifecycle and registry, the
placements (local and Ray) and the runtimes. They are built once, by the service's codec
(`aviato.server.codec`) when a request is validated, and by then every default is resolved:
a `SandboxConfig` says the memory, pids and disk the sandbox gets, not what the request left
out. No consumer applies a default of its own.

The field defaults of these dataclasses are the platform's defaults, for code that builds a
config directly (tests, tools); the service passes its configured values for every field.

What the model cannot hold: facts only a node learns, such as an OCI image's own working
directory or Entrypoint (`working_dir` "" and `image_command` say "the image's"), and secrets
beyond the create (`registry_credentials` and `secret_env` are never stored).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from aviato.images.credentials import RegistryCredentials

__all__ = [
    "DEFAULT_DISK_BYTES",
    "DEFAULT_MEMORY_BYTES",
    "DEFAULT_PIDS",
    "LIMIT_NAMES",
    "DirectoryMount",
    "EgressPolicy",
    "EgressRule",
    "ExecSpec",
    "RegistryCredentials",
    "SandboxConfig",
]

DEFAULT_MEMORY_BYTES = 1 << 30
DEFAULT_PIDS = 1024
DEFAULT_DISK_BYTES = 1 << 30
# The names of the limits a request may ask for (`SandboxConfig.asked_limits`).
LIMIT_NAMES = ("cpu", "memory", "pids", "disk")


@dataclass(frozen=True)
class EgressRule:
    """One entry of an egress allow-list, validated and normalized: exactly one of `dns_name`
    (a host name in lower case without a trailing dot, or "*.suffix" for every name under
    suffix but not suffix itself) and `cidr` (a network in its canonical text, "10.8.0.0/16").
    """

    dns_name: str = ""
    cidr: str = ""


@dataclass(frozen=True)
class EgressPolicy:
    """What a sandbox may reach outside itself. The default (no internet, no rules) is
    loopback only. `internet`: every public address (never the host's own, its loopback or
    the special ranges of docs/networking.md) plus `rules`; without it only what `rules`
    allow. A name rule admits a connection by that name (never by address) to the addresses
    the name resolves to, if each is public or inside a CIDR rule."""

    internet: bool = False
    rules: tuple[EgressRule, ...] = ()

    @property
    def isolated(self) -> bool:
        return not self.internet and not self.rules

    @property
    def mode(self) -> str:
        """One of "isolated", "allowlist", "internet": the public `applied_egress_mode`."""
        if self.internet:
            return "internet"
        return "allowlist" if self.rules else "isolated"


@dataclass(frozen=True)
class DirectoryMount:
    """A host directory bound into the sandbox at `path` (absolute, validated).

    Either a named volume of the sandbox's owner (`volume` its name) or an operator-approved
    host directory (`host_path` as asked; always read-only). `source` is the host directory
    that is bound: the volume's directory, or the host path with every symlink resolved and
    re-checked against the allowed trees. The service fills it in at create (the request
    cannot name it); a runtime binds `source` and nothing else. Under Ray the node host of the
    sandbox's node fills it in from `volume_key` (the owner's key, runtime/volume_store.py) and
    `size_bytes` (the volume's enforced size; 0: a directory volume), or from `host_path`.
    `size_bytes` of a request: the size a new volume is made with (0: the service's default)."""

    path: str
    volume: str = ""
    host_path: str = ""
    read_only: bool = False
    source: str = ""
    volume_key: str = ""
    size_bytes: int = 0


@dataclass(frozen=True)
class SandboxConfig:
    """A validated sandbox spec with every default resolved, in the units the runtime needs.

    Limits: `memory_bytes`, `pids` and `disk_bytes` are what the sandbox gets; `cpu_millis`
    None means no cpu limit (it may use every core). `asked_limits` names those of "cpu",
    "memory", "pids", "disk" that the request asked for; the others are the service's
    defaults. A node that cannot enforce limits refuses a sandbox that asked for one, and runs
    one that asked for none without them (best effort, as the service's log says at start).
    """

    sandbox_id: str
    image: str
    command: tuple[str, ...]  # empty: keep-alive that exits 0 on SIGTERM
    env: dict[str, str]
    working_dir: str  # absolute; "" means the image's default
    cpu_millis: int | None = None
    memory_bytes: int = DEFAULT_MEMORY_BYTES
    pids: int = DEFAULT_PIDS
    disk_bytes: int = DEFAULT_DISK_BYTES
    asked_limits: frozenset[str] = frozenset()
    mounted_files: tuple[tuple[str, bytes], ...] = ()
    egress: EgressPolicy = EgressPolicy()
    # TCP ports of the sandbox's loopback that the service relays clients to (distinct).
    exposed_ports: tuple[int, ...] = ()
    # OCI images: credentials for pulling `image` (None: the service's Docker config or
    # anonymous), and whether an empty `command` runs the image's Entrypoint + Cmd instead of
    # the keep-alive.
    registry_credentials: RegistryCredentials | None = None
    image_command: bool = False
    # Labels a cluster placement must find on the node (SandboxSpec.node_selector).
    node_selector: tuple[tuple[str, str], ...] = ()
    # Stop the sandbox ("idle") after this many seconds without a command or file transfer
    # (0: never). The service's reaper enforces it; a runtime ignores it.
    idle_timeout_seconds: float = 0.0
    # Volumes and host directories bound into the sandbox (docs/volumes.md).
    mounts: tuple[DirectoryMount, ...] = ()
    # Where the writable layer lives: "memory" (a tmpfs) or "disk" (a filesystem of the disk
    # size under the node's state directory); and the snapshot it starts from ("" none).
    writable_layer: str = "memory"
    snapshot_id: str = ""
    # The owner's secrets it gets as environment variables (docs/secrets.md): their names,
    # and their values on the way to a runtime only (the service fills `secret_env` at create
    # from its encrypted store; a record never keeps it, and a runtime must never put it on a
    # command line or in a file).
    secrets: tuple[str, ...] = ()
    secret_env: dict[str, str] = field(default_factory=dict, repr=False)


@dataclass(frozen=True)
class ExecSpec:
    """A validated command: `cwd` "" is the sandbox's working directory, `timeout_seconds` 0
    no limit, (`rows`, `cols`) the terminal's size when `tty`."""

    argv: tuple[str, ...]
    cwd: str = ""
    env: dict[str, str] = field(default_factory=dict)
    timeout_seconds: float = 0.0
    stdin: bool = False
    tty: bool = False
    rows: int = 24
    cols: int = 80
    protected: bool = False  # nothing else in the sandbox can touch it (docs/security.md)
