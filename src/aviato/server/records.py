"""The service's model of a sandbox: what it keeps beside the runtime's `SandboxConfig`.

`ValidSpec` is a validated create (the config with every default resolved, its tags and its
lifetime), built by `codec.decode_spec`. `SandboxRecord` is one sandbox as the service knows it
(owner, request id, status, lease, node, times) around the config it was created with; the
registry persists it, the lifecycle mutates it, `codec.encode_sandbox` answers with it.

`SandboxStatus` values are the registry's, stored as integers: they are this service's own and
never assumed equal to the public proto's enum (the codec maps between the two explicitly).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, replace

from aviato.egress.gateway import EgressUsage
from aviato.runtime.model import SandboxConfig

__all__ = [
    "ALL_STATUSES",
    "LIVE_STATUSES",
    "TERMINAL_STATUSES",
    "SandboxRecord",
    "SandboxStatus",
    "ValidSpec",
    "kept_config",
]


class SandboxStatus(enum.IntEnum):
    """The states of a sandbox: PENDING → CREATING → RUNNING → COMPLETED | FAILED | TERMINATED,
    and RUNNING ⇄ PAUSED (frozen by PauseSandbox; it ends from PAUSED as from RUNNING).
    The integers are what the registry stores: never renumber them."""

    PENDING = 1
    CREATING = 2
    RUNNING = 3
    COMPLETED = 4
    FAILED = 5
    TERMINATED = 6
    PAUSED = 7


TERMINAL_STATUSES = frozenset(
    {SandboxStatus.COMPLETED, SandboxStatus.FAILED, SandboxStatus.TERMINATED}
)
LIVE_STATUSES = frozenset(
    {SandboxStatus.PENDING, SandboxStatus.CREATING, SandboxStatus.RUNNING, SandboxStatus.PAUSED}
)
ALL_STATUSES = frozenset(SandboxStatus)


@dataclass(frozen=True)
class SnapshotRecord:
    """A snapshot of a sandbox's writable layer, kept on `node` (server/snapshots.py)."""

    id: str
    owner: str
    source_sandbox_id: str
    image: str
    node: str
    size_bytes: int
    entries: int
    skipped: int
    created_ns: int
    internal: bool = False


@dataclass(frozen=True)
class ValidSpec:
    """A validated create: the runtime config (sandbox_id still ""), its tags in the given
    order without duplicates, and its lifetime in seconds (the service's default when the
    request named none; 0: no lifetime)."""

    config: SandboxConfig
    tags: tuple[str, ...]
    max_lifetime_seconds: float


def kept_config(config: SandboxConfig) -> SandboxConfig:
    """What a record keeps of a config: no mounted file contents (a record must stay small;
    the paths are kept), never the registry credentials nor the secrets' values (their names
    are kept). The config itself when it holds none of these (no copy per create)."""
    if (
        config.registry_credentials is None
        and not config.secret_env
        and not any(content for _, content in config.mounted_files)
    ):
        return config
    return replace(
        config,
        mounted_files=tuple((path, b"") for path, _ in config.mounted_files),
        registry_credentials=None,
        secret_env={},
    )


@dataclass(slots=True)
class SandboxRecord:
    """One sandbox. Mutable: the lifecycle updates it, then calls `Registry.update_sandbox`.

    `config` is the resolved config it was created with, as `kept_config` keeps it.
    """

    id: str
    owner: str
    request_id: str
    status: SandboxStatus
    config: SandboxConfig
    created_ns: int
    tags: tuple[str, ...] = ()
    max_lifetime_seconds: float = 0.0
    reason: str = ""
    exit_code: int | None = None
    lease_id: str = ""
    node: str = ""
    started_ns: int | None = None
    ended_ns: int | None = None
    expires_ns: int | None = None
    # Where clients reach config.exposed_ports while RUNNING: (port, "127.0.0.1:N") pairs set
    # by the port forwarder (kept in the registry's sandbox_ports table, not in the model).
    port_addresses: tuple[tuple[int, str], ...] = ()
    # Through its egress: live while it runs (from the egress gateway), final once it ended.
    network_usage: EgressUsage = field(default_factory=EgressUsage)
    # The sandbox has an egress proxy listener (opened at create or by SetNetwork), which the
    # service serves for the rest of its life, even while its policy refuses everything.
    egress_listener: bool = False

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL_STATUSES
