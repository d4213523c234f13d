"""A stored OCI image as a sandbox root (`ImageRoot`), mirroring the `host` image's layout.

- `/` is a tmpfs of the sandbox's disk size: its private writable layer, as for `host`.
- Every top-level directory of the unpacked image is bound read-only at its place (`/usr`,
  `/etc`, `/bin`, `/opt`, `/app`, ...); top-level symlinks (`/bin -> usr/bin`) are recreated.
  The image root itself is shared by every sandbox of the image and never written.
- On the writable layer, as for `host`: `/tmp` (1777), `/root` (0700), `/workspace`; and
  `/var/tmp` (1777): a tmpfs over the image's, or a directory when the image has no `/var`.
  The image's own `/root`, `/tmp`, `/proc`, `/dev`, `/sys` are not used.
- `/dev` and `/proc` exactly as for `host` (bubblewrap's minimal /dev, masked /proc).
- Environment: the image's `Env`, with `PATH` defaulting to the usual directories and `HOME`
  to the image user's home. Working directory: the image's `WorkingDir`, else `/workspace`.
- `User`: the sandbox runs as that uid/gid inside its user namespace (see bubblewrap/command.py).

Writes into the image's read-only trees fail with EROFS; files that must change belong under
`/workspace`, `/tmp` or `/root` (docs/images.md).
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from aviato.images.image_config import resolve_user
from aviato.images.store import StoredImage
from aviato.runtime.image_roots import AVIATO_BIN, DEFAULT_WORKDIR, ImageRoot, proc_args

__all__ = ["image_root"]

IMAGE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Top-level entries of an image that a sandbox gets from elsewhere (or on its writable layer).
_NOT_BOUND = frozenset({"proc", "dev", "sys", "tmp", "root", "workspace", ".aviato"})


@dataclass(frozen=True)
class _Static:
    bind_args: tuple[str, ...]
    trees: tuple[str, ...]
    symlinks: frozenset[str]
    var_tmp_args: tuple[str, ...]


@lru_cache(maxsize=256)
def _static(rootfs: str) -> _Static:
    args: list[str] = []
    trees: list[str] = []
    links: set[str] = set()
    for entry in sorted(os.scandir(rootfs), key=lambda e: e.name):
        if entry.name in _NOT_BOUND:
            continue
        target = "/" + entry.name
        if entry.is_symlink():
            args += ["--symlink", os.readlink(entry.path), target]
            links.add(target)
        elif entry.is_dir(follow_symlinks=False):
            args += ["--ro-bind", entry.path, target]
            trees.append(target)
        elif entry.is_file(follow_symlinks=False):
            args += ["--ro-bind", entry.path, target]  # e.g. /.dockerenv
    try:  # lstat: the image's /var/tmp itself, never what a symlink there points to
        var_tmp_is_dir = stat.S_ISDIR(os.lstat(os.path.join(rootfs, "var", "tmp")).st_mode)
    except OSError:
        var_tmp_is_dir = False
    if "/var" in trees and var_tmp_is_dir:
        var_tmp_args: tuple[str, ...] = ("--perms", "1777", "--tmpfs", "/var/tmp")
    elif "/var" in trees or "/var" in links:
        var_tmp_args = ()  # the image's /var has no /var/tmp: nothing can be mounted there
    else:
        var_tmp_args = ("--perms", "1777", "--dir", "/var/tmp")
    return _Static(tuple(args), tuple(trees), frozenset(links), var_tmp_args)


def image_root(image: StoredImage, disk_bytes: int) -> ImageRoot:
    """The root for a sandbox of `image` with a writable layer of `disk_bytes`.

    Raises ImageError when the config's `User` cannot be resolved in the image.
    """
    static = _static(str(image.rootfs))
    user = resolve_user(Path(image.rootfs), image.config.user)
    size = str(disk_bytes)
    working_dir = image.config.working_dir or DEFAULT_WORKDIR
    var_tmp = static.var_tmp_args
    if var_tmp and var_tmp[2] == "--tmpfs":
        var_tmp = ("--size", size, *var_tmp)
    args = (
        "--size", size, "--perms", "0755", "--tmpfs", "/",
        *static.bind_args,
        "--dev", "/dev",
        "--size", size, "--perms", "1777", "--tmpfs", "/dev/shm",
        *proc_args(),
        "--perms", "1777", "--dir", "/tmp",
        *var_tmp,
        "--perms", "0700", "--dir", "/root",
        "--perms", "0755", "--dir", DEFAULT_WORKDIR,
        "--perms", "0755", "--dir", AVIATO_BIN,
    )  # fmt: skip
    if not any(working_dir == t or working_dir.startswith(t + "/") for t in static.trees):
        args = (*args, "--perms", "0755", "--dir", working_dir)
    env = dict(image.config.env)
    env.setdefault("PATH", IMAGE_PATH)
    env.setdefault("HOME", user.home)
    return ImageRoot(
        name=image.names[0] if image.names else image.digest,
        mount_args=args,
        env=tuple(env.items()),
        working_dir=working_dir,
        source_root=str(image.rootfs),
        readonly_trees=static.trees,
        masked=frozenset(),
        symlinks=static.symlinks,
        uid=user.uid if image.config.user else None,
        gid=user.gid if image.config.user else None,
    )
