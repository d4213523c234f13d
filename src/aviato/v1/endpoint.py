"""Where the local service lives: a contract shared by the SDK, the CLI and the service.

The state directory is `AVIATO_STATE_DIR`, else ``$XDG_STATE_HOME/aviato``, else
``~/.local/state/aviato``; the service listens on the unix socket `SOCKET_NAME` in it, and
whoever starts the service takes the flock of `LOCK_NAME` and appends its output to `LOG_NAME`
(docs/internals/layout.md lists the rest of the directory). Nothing here creates anything.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["ENV_STATE_DIR", "LOCK_NAME", "LOG_NAME", "SOCKET_NAME", "socket_path", "state_dir"]

ENV_STATE_DIR = "AVIATO_STATE_DIR"
SOCKET_NAME = "aviato.sock"
LOCK_NAME = "server.lock"
LOG_NAME = "server.log"


def state_dir(explicit: str | os.PathLike[str] | None = None) -> Path:
    """The state directory, absolute: `explicit` if given, else from the environment."""
    if explicit:
        return Path(explicit).expanduser().absolute()
    env = os.environ.get(ENV_STATE_DIR)
    if env:
        return Path(env).expanduser().absolute()
    xdg = os.environ.get("XDG_STATE_HOME")
    if xdg:
        return Path(xdg).expanduser().absolute() / "aviato"
    return Path.home().absolute() / ".local" / "state" / "aviato"


def socket_path(directory: str | os.PathLike[str] | None = None) -> Path:
    """The local service's unix socket in `directory` (default: `state_dir()`)."""
    return state_dir(directory) / SOCKET_NAME
