"""The service's configuration and where its state lives.

State directory resolution follows docs/internals/layout.md: an explicit path, else
`$AVIATO_STATE_DIR`, else `$XDG_STATE_HOME/aviato`, else `~/.local/state/aviato`.

This module only describes; it does not create directories or check that a TLS file exists
(`app` does that when it starts, where the error can be reported).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "DEFAULT_MAX_LIFETIME_SECONDS",
    "DEFAULT_MAX_SANDBOXES",
    "ServerConfig",
    "host_memory_bytes",
    "parse_listen",
    "resolve_state_dir",
]

DEFAULT_MAX_LIFETIME_SECONDS = 3600.0
DEFAULT_MAX_SANDBOXES = 1000


def resolve_state_dir(explicit: str | os.PathLike[str] | None = None) -> Path:
    """The state directory, absolute; never created here."""
    if explicit:
        return Path(explicit).expanduser().absolute()
    env = os.environ.get("AVIATO_STATE_DIR")
    if env:
        return Path(env).expanduser().absolute()
    xdg = os.environ.get("XDG_STATE_HOME")
    if xdg:
        return (Path(xdg).expanduser() / "aviato").absolute()
    return (Path.home() / ".local" / "state" / "aviato").absolute()


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


def host_memory_bytes() -> int:
    """MemTotal of this machine (0 when /proc/meminfo cannot be read)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


@dataclass(frozen=True)
class ServerConfig:
    """Everything `app.serve` needs. Paths are absolute.

    Capacity: `max_sandboxes` counts non-terminal sandboxes; `max_memory_bytes` bounds the sum of
    the memory limits of non-terminal sandboxes, where a sandbox that asks for none counts as
    `default_memory_bytes` (the limit the runtime gives it). 0 means no bound. The bound is on
    limits, not on use: it cannot see memory that processes outside sandboxes take.
    """

    state_dir: Path
    listen: str | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    placement: str = "local"
    max_sandboxes: int = DEFAULT_MAX_SANDBOXES
    max_memory_bytes: int = 0
    default_memory_bytes: int = 1 << 30
    default_max_lifetime_seconds: float = DEFAULT_MAX_LIFETIME_SECONDS
    default_stop_grace_seconds: float = 10.0
    reaper_interval_seconds: float = 0.5
    log_level: str = "INFO"

    @property
    def socket_path(self) -> Path:
        return self.state_dir / "aviato.sock"

    @property
    def registry_path(self) -> Path:
        return self.state_dir / "registry.db"

    @property
    def pid_path(self) -> Path:
        return self.state_dir / "server.pid"

    @property
    def logs_dir(self) -> Path:
        """Where the service keeps main logs of terminal sandboxes until they are deleted."""
        return self.state_dir / "logs"
