"""`HostMounts`: the host directories an operator allows sandboxes to mount read-only
(`aviato server --allow-host-mount DIR`), checked on the machine that binds them.

The path asked for is resolved (every symlink followed) and the result must still lie under an
allowed tree, itself resolved; the resolved path is what is bound, so a symlink cannot lead out
of the allowed tree. Someone who can write inside the allowed tree can still swap a directory
for a symlink between the check and the bind: the allowed trees are the operator's, and
sandboxes only ever see them read-only. Under Ray each node host checks against the same list
on its own disk (the trees must exist there: docs/volumes.md).
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from aviato.runtime.base import PathRefused

__all__ = ["HostMounts"]


class HostMounts:
    """The host directories the operator allowed, and the check of a path asked for."""

    def __init__(self, allowed: Iterable[str]) -> None:
        self.allowed = tuple(os.path.realpath(path) for path in allowed)

    def refusal(self, host_path: str) -> str:
        """Why `host_path` may not be asked for at all (judged by its text, without the
        disk); "" when it may."""
        if not self.allowed:
            return (
                "this service allows no host directories to be mounted (the operator "
                "allows some with `aviato server --allow-host-mount DIR`)"
            )
        if not any(_under(host_path, root) for root in self.allowed):
            where = ", ".join(self.allowed)
            return f"{host_path!r} is not under a directory the operator allows to mount ({where})"
        return ""

    def resolve(self, host_path: str) -> str:
        """The real path to bind for `host_path`: it and every symlink in it resolved, and the
        result under an allowed tree. PathRefused says which rule, never what is there."""
        refused = self.refusal(host_path)
        if refused:
            raise PathRefused(refused)
        real = os.path.realpath(host_path)
        if not any(_under(real, root) for root in self.allowed):
            raise PathRefused(
                f"{host_path!r} leads through a symlink out of the allowed directories "
                f"({', '.join(self.allowed)})"
            )
        if not os.path.isdir(real):
            raise PathRefused(f"{host_path!r} is not a directory on the host")
        return real


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")
