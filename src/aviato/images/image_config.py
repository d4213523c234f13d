"""The parts of an image's config that aviato honours, and resolving its User.

From the OCI image config's `config` object: `Env`, `WorkingDir`, `User`, `Entrypoint`, `Cmd`.
Ignored: `ExposedPorts`, `Volumes`, `StopSignal`, `Healthcheck`, `Labels` (no meaning for a
sandbox without network or volumes; a stop is SIGTERM then SIGKILL as for every sandbox).

`User` is `name`, `uid`, `name:group` or `uid:gid`, as in Docker. Names are looked up in the
image's own `/etc/passwd` and `/etc/group`, read through the root's descriptor (`beneath.py`):
symlinks are followed inside the root only, and only a regular file of at most 4 MiB is read (a
fifo is never opened for reading, a huge sparse file is not read). A numeric uid without a group
gets its passwd entry's gid, else 0. The sandbox then runs as that uid/gid inside its user
namespace.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aviato.images import beneath
from aviato.images.errors import ImageError, PullFailed

__all__ = ["ImageConfig", "ResolvedUser", "resolve_user"]

_MAX_DB_BYTES = 4 << 20


def _strings(value: Any, what: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise PullFailed(f"image config: {what} is not a list of strings")
    return tuple(value)


@dataclass(frozen=True)
class ImageConfig:
    env: tuple[tuple[str, str], ...] = ()
    working_dir: str = ""
    user: str = ""
    entrypoint: tuple[str, ...] = ()
    cmd: tuple[str, ...] = ()
    diff_ids: tuple[str, ...] = ()
    architecture: str = ""
    os: str = ""

    @classmethod
    def parse(cls, data: bytes) -> ImageConfig:
        try:
            doc = json.loads(data)
        except ValueError as exc:
            raise PullFailed("image config is not JSON") from exc
        if not isinstance(doc, dict):
            raise PullFailed("image config is not a JSON object")
        conf = doc.get("config") or {}
        if not isinstance(conf, dict):
            raise PullFailed("image config: 'config' is not an object")
        env: list[tuple[str, str]] = []
        for item in _strings(conf.get("Env"), "Env"):
            key, sep, value = item.partition("=")
            if key and sep and "\0" not in item:
                env.append((key, value))
        rootfs = doc.get("rootfs") or {}
        diff_ids = _strings(rootfs.get("diff_ids") if isinstance(rootfs, dict) else None,
                            "rootfs.diff_ids")  # fmt: skip
        working_dir = conf.get("WorkingDir") or ""
        user = conf.get("User") or ""
        if not isinstance(working_dir, str) or not isinstance(user, str):
            raise PullFailed("image config: WorkingDir and User must be strings")
        if working_dir and not working_dir.startswith("/"):
            working_dir = "/" + working_dir
        return cls(
            env=tuple(env),
            working_dir=os.path.normpath(working_dir) if working_dir else "",
            user=user,
            entrypoint=_strings(conf.get("Entrypoint"), "Entrypoint"),
            cmd=_strings(conf.get("Cmd"), "Cmd"),
            diff_ids=diff_ids,
            architecture=str(doc.get("architecture", "")),
            os=str(doc.get("os", "")),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "env": [list(p) for p in self.env], "working_dir": self.working_dir,
            "user": self.user, "entrypoint": list(self.entrypoint), "cmd": list(self.cmd),
            "diff_ids": list(self.diff_ids), "architecture": self.architecture, "os": self.os,
        }  # fmt: skip

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ImageConfig:
        return cls(
            env=tuple((str(k), str(v)) for k, v in data.get("env", [])),
            working_dir=str(data.get("working_dir", "")),
            user=str(data.get("user", "")),
            entrypoint=tuple(data.get("entrypoint", [])),
            cmd=tuple(data.get("cmd", [])),
            diff_ids=tuple(data.get("diff_ids", [])),
            architecture=str(data.get("architecture", "")),
            os=str(data.get("os", "")),
        )


@dataclass(frozen=True)
class ResolvedUser:
    uid: int
    gid: int
    home: str


def _read_db(root_fd: int, path: str) -> list[list[str]]:
    """Lines of a colon-separated database inside the image (empty when missing or odd)."""
    data = beneath.read_small_file(root_fd, path, _MAX_DB_BYTES)
    if data is None:
        return []
    text = data.decode("utf-8", errors="replace")
    return [line.split(":") for line in text.splitlines() if not line.startswith("#")]


def _number(text: str) -> int | None:
    return int(text) if text.isdigit() and int(text) < 2**32 - 1 else None


def resolve_user(root: Path, user: str) -> ResolvedUser:
    """The uid, gid and home for a config's `User`. Raises ImageError naming what is missing."""
    if not user:
        return ResolvedUser(0, 0, "/root")
    root_fd = beneath.open_root(root)
    try:
        return _resolve_user(root_fd, user)
    finally:
        os.close(root_fd)


def _resolve_user(root: int, user: str) -> ResolvedUser:
    name, _, group = user.partition(":")
    passwd = _read_db(root, "/etc/passwd")
    uid = _number(name)
    gid: int | None = None
    home = "/"
    entry = next(
        (e for e in passwd if len(e) >= 6 and (e[0] == name or (uid is not None and e[2] == name))),
        None,
    )
    if uid is None:
        if entry is None:
            raise ImageError(f"image user {name!r} is not in the image's /etc/passwd")
        uid = _number(entry[2])
        if uid is None:
            raise ImageError(f"image user {name!r} has an invalid uid in /etc/passwd")
    if entry is not None:
        gid = _number(entry[3])
        home = entry[5] or "/"
    elif uid == 0:
        home = "/root"
    if group:
        gid = _number(group)
        if gid is None:
            groups = _read_db(root, "/etc/group")
            found = next((e for e in groups if len(e) >= 3 and e[0] == group), None)
            if found is None or _number(found[2]) is None:
                raise ImageError(f"image group {group!r} is not in the image's /etc/group")
            gid = _number(found[2])
    return ResolvedUser(uid, gid if gid is not None else 0, home)
