"""Registry credentials: given per sandbox in its spec, else read from the Docker config file.

The Docker config is `$DOCKER_CONFIG/config.json`, else `~/.docker/config.json` of the user the
*service* runs as (the sandbox's creator may be another user; per-sandbox credentials are how a
client passes its own). Only the `auths` section is read: `auth` (base64 `user:password`),
`username`/`password`, `identitytoken` (a refresh token, sent as the password of the token
request with the username `<token>`) and `registrytoken` (a bearer token used as is). Credential
helpers (`credsStore`, `credHelpers`) run arbitrary programs and are not supported.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from dataclasses import dataclass
from pathlib import Path

__all__ = ["RegistryCredentials", "docker_config_path", "from_docker_config"]


@dataclass(frozen=True)
class RegistryCredentials:
    """How to log in to an image registry: a username and password, or a bearer token."""

    username: str = ""
    password: str = ""
    token: str = ""

    def __repr__(self) -> str:  # never print secrets in logs or tracebacks
        return f"RegistryCredentials(username={self.username!r}, ...)"


_HUB_KEYS = ("https://index.docker.io/v1/", "index.docker.io", "docker.io", "registry-1.docker.io")


def docker_config_path() -> Path:
    directory = os.environ.get("DOCKER_CONFIG")
    if directory:
        return Path(directory) / "config.json"
    return Path.home() / ".docker" / "config.json"


def _keys_for(registry: str) -> list[str]:
    if registry == "docker.io":
        return list(_HUB_KEYS)
    return [registry, f"https://{registry}", f"http://{registry}", f"https://{registry}/v2/"]


def from_docker_config(registry: str, path: Path | None = None) -> RegistryCredentials | None:
    """Credentials for `registry` in the Docker config, or None (also when it is unreadable)."""
    try:
        data = json.loads((path or docker_config_path()).read_text())
    except (OSError, ValueError):
        return None
    auths = data.get("auths") if isinstance(data, dict) else None
    if not isinstance(auths, dict):
        return None
    for key in _keys_for(registry):
        entry = auths.get(key)
        if not isinstance(entry, dict):
            continue
        if entry.get("registrytoken"):
            return RegistryCredentials(token=str(entry["registrytoken"]))
        if entry.get("identitytoken"):
            return RegistryCredentials(username="<token>", password=str(entry["identitytoken"]))
        if entry.get("auth"):
            try:
                user, _, password = base64.b64decode(entry["auth"]).decode().partition(":")
            except (binascii.Error, UnicodeDecodeError, ValueError):
                continue
            return RegistryCredentials(username=user, password=password)
        if entry.get("username"):
            return RegistryCredentials(
                username=str(entry["username"]), password=str(entry.get("password", ""))
            )
    return None
