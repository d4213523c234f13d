"""Image root profiles: what a sandbox's filesystem is made of, as bubblewrap arguments.

An image is resolved by name into an `ImageRoot`: the bwrap mount arguments that build the
sandbox's root, its default environment and working directory, and the rules for where mounted
files may go. Images are pluggable (`register_image`); `host` is the only registered one.

OCI images (`python:3.11`) are not registered names: the runtime finds them in its image store and
builds their `ImageRoot` with `aviato.runtime.oci_image_root.image_root` (docs/images.md).

The `host` image is this machine's own system, read-only, with its secrets hidden:

- `/` is a tmpfs of the sandbox's disk size: its private writable layer. Everything written
  outside the read-only trees lands there, and writes beyond the size fail with ENOSPC. It lives
  in RAM, so its pages also count against the sandbox's memory limit.
- `/usr` and `/etc` are read-only binds of the host's; `/bin`, `/sbin`, `/lib*` are the same
  symlinks as on the host (usr-merged hosts) or read-only binds (older layouts).
- `/dev` is bubblewrap's minimal device tree, with its own size-limited `/dev/shm`; `/proc` is
  the sandbox pid namespace's, with `/proc/sys` read-only and kernel-introspection files masked
  (bubblewrap leaves `/proc/sys` writable when run as root, and root without capabilities may
  still write many sysctls, `kernel.core_pattern` among them, which is a host root escape).
- `/tmp` and `/var/tmp` (mode 1777), `/workspace` (the default working directory) and `/root`
  (HOME, mode 0700) are empty directories on the writable layer.
- Not present at all: the host's `/home`, `/root`, `/var`, `/srv`, `/opt`, `/mnt`, `/media`,
  `/run`, `/sys` and the service's state directory.
- Hidden inside the read-only `/etc`: every file or directory that is not world-readable (scanned
  once per process), plus the well-known secrets by name (`shadow`, `gshadow`, their backups,
  `sudoers*`, `ssh/*_key`) whatever their mode. The sandbox's uid 0 owns the host's root-owned
  files, so "readable only by root" would otherwise mean "readable by the sandbox".
- `python` exists even where the host has only `python3`: `/.aviato/bin/python` links to it and
  `/.aviato/bin` ends the default PATH.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from functools import cache

from aviato.runtime.base import PathRefused
from aviato.runtime.model import DirectoryMount

SUPERVISOR_PATH = "/.aviato/supervisor"
AVIATO_BIN = "/.aviato/bin"
DEFAULT_WORKDIR = "/workspace"
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:" + AVIATO_BIN

# Places no mounted file or working directory may be put: kernel filesystems and our own.
FORBIDDEN_PREFIXES = ("/proc", "/dev", "/sys", "/.aviato")
SECRET_NAMES = ("shadow", "gshadow", "shadow-", "gshadow-", "sudoers", "sudoers.d")
# Kernel introspection and control files of /proc that a sandbox has no business with, and that
# its uid 0 could otherwise read (mode 0400, owned by root). Masked only when present on this
# kernel (bwrap refuses to mount onto a missing path). Each mask is a mount (about 0.13 ms of
# sandbox start here), so files already closed to a capability-less root are not listed (kmsg
# needs CAP_SYSLOG; bwrap itself covers sysrq-trigger, irq and bus when they are writable).
PROC_MASK_FILES = (
    "kcore", "keys", "timer_list", "timer_stats", "sched_debug", "latency_stats",
    "kpagecount", "kpageflags", "kpagecgroup", "slabinfo", "vmallocinfo", "sysrq-trigger",
)  # fmt: skip
PROC_MASK_DIRS = ("acpi", "asound", "scsi")
# bwrap covers only writable entries and sees /proc/sys (a 0555 directory) as not writable, yet
# root may write most files inside it: kernel.core_pattern is a host root escape.
PROC_READONLY = ("sys",)


# Every image's mount arguments begin with `--size N --perms 0755 --tmpfs /`: its writable layer.
_ROOT_TMPFS_ARGS = 6


class ImageNotFound(PathRefused):
    """The sandbox names an image this node does not know."""


@dataclass(frozen=True)
class ImageRoot:
    """A resolved image: bwrap mount arguments plus the facts needed to place things in it.

    `mount_args` build the whole filesystem and must come before any mount that goes on top
    (mounted files, the supervisor). `readonly_trees` are the sandbox paths whose contents come
    from `source_root` on the host and cannot be created at sandbox start; `masked` are paths
    hidden inside them.
    """

    name: str
    mount_args: tuple[str, ...]
    env: tuple[tuple[str, str], ...]
    working_dir: str
    source_root: str
    readonly_trees: tuple[str, ...]
    masked: frozenset[str]
    symlinks: frozenset[str]
    # The sandbox's uid and gid inside its user namespace (OCI images with a `User`); None: 0.
    uid: int | None = None
    gid: int | None = None

    def on_layer(self, root_args: Sequence[str]) -> ImageRoot:
        """This root with its writable layer made by `root_args` instead of the tmpfs at `/`
        (a disk layer or an overlay on a snapshot: runtime/writable_layers.py)."""
        head = self.mount_args[:_ROOT_TMPFS_ARGS]
        if head[-2:] != ("--tmpfs", "/"):
            raise PathRefused(f"image {self.name!r} has no writable layer at / to replace")
        return replace(self, mount_args=(*root_args, *self.mount_args[_ROOT_TMPFS_ARGS:]))

    def _tree_of(self, path: str) -> str | None:
        for tree in self.readonly_trees:
            if path == tree or path.startswith(tree + "/"):
                return tree
        return None

    def _host_path(self, path: str) -> str:
        return os.path.join(self.source_root, path.lstrip("/"))

    def check_path(self, path: str, what: str) -> str:
        """Validates a sandbox path given by the user; returns it. Raises PathRefused."""
        if not path.startswith("/") or "\0" in path:
            raise PathRefused(f"{what} {path!r} must be an absolute path")
        if os.path.normpath(path) != path or path.startswith("//"):
            raise PathRefused(f"{what} {path!r} is not normalized (no '..', '.', '//' or '/' end)")
        if path == "/":
            raise PathRefused(f"{what} cannot be '/'")
        for prefix in FORBIDDEN_PREFIXES:
            if path == prefix or path.startswith(prefix + "/"):
                raise PathRefused(f"{what} {path!r} is inside {prefix}, which is reserved")
        first = "/" + path.split("/")[1]
        if first in self.symlinks:
            target = os.readlink(self._host_path(first))
            raise PathRefused(
                f"{what} {path!r} goes through the symlink {first} -> {target}; use the real path"
            )
        for masked in self.masked:
            if path == masked or path.startswith(masked + "/"):
                raise PathRefused(f"{what} {path!r} is inside a hidden path ({masked})")
        return path

    def _readonly_ancestor_ok(self, path: str, what: str, *, want_dir: bool) -> None:
        """A path inside a read-only tree must already exist there, with no symlink on the way.

        Looked at from the root's descriptor one component at a time, following no symlink:
        where an image's symlink points on the host is never looked at (that would tell a
        caller whether a host path exists)."""
        st = _lstat_beneath(self.source_root, path)
        if st is None:
            raise PathRefused(
                f"{what} {path!r} does not exist in the read-only {self._tree_of(path)} of image "
                f"{self.name!r}; put it on the writable layer instead (e.g. under /workspace)"
            )
        if stat.S_ISLNK(st.st_mode):
            raise PathRefused(f"{what} {path!r} goes through a symlink in image {self.name!r}")
        if want_dir != stat.S_ISDIR(st.st_mode):
            kind = "a directory" if want_dir else "a regular file"
            raise PathRefused(f"{what} {path!r} is not {kind} in image {self.name!r}")

    def _dir_args(self, directory: str) -> list[str]:
        """`--dir` for every ancestor (and `directory` itself) on the writable layer."""
        args: list[str] = []
        parts = directory.strip("/").split("/")
        for i in range(1, len(parts) + 1):
            sub = "/" + "/".join(parts[:i])
            if self._tree_of(sub) is None:
                args += ["--dir", sub]
        return args

    def workdir_args(self, working_dir: str) -> list[str]:
        """Arguments that make `working_dir` exist (validated); empty for the image default."""
        if not working_dir or working_dir == self.working_dir:
            return []
        self.check_path(working_dir, "working directory")
        if self._tree_of(working_dir) is not None:
            self._readonly_ancestor_ok(working_dir, "working directory", want_dir=True)
            return []
        return self._dir_args(working_dir)

    def file_mount_args(self, files: Sequence[tuple[str, str]]) -> list[str]:
        """Read-only binds of host files (second item) at sandbox paths (first item)."""
        seen: set[str] = set()
        for path, _ in files:
            self.check_path(path, "mounted file")
            if path in seen:
                raise PathRefused(f"mounted file {path!r} is given twice")
            seen.add(path)
        for path in seen:
            for other in seen:
                if other.startswith(path + "/"):
                    raise PathRefused(f"mounted file {path!r} is a parent of {other!r}")
        args: list[str] = []
        for path, host_file in files:
            if path in (self.working_dir, "/tmp", "/var/tmp", "/root"):
                raise PathRefused(f"mounted file {path!r} would replace a directory")
            if self._tree_of(path) is not None:
                self._readonly_ancestor_ok(path, "mounted file", want_dir=False)
            else:
                args += self._dir_args(os.path.dirname(path))
            args += ["--ro-bind", host_file, path]
        return args

    def directory_mount_args(
        self, mounts: Sequence[DirectoryMount], mounted_files: Sequence[str] = ()
    ) -> list[str]:
        """Binds of host directories (each mount's `source`) at sandbox paths: `--bind` for a
        read-write volume, `--ro-bind` otherwise. bubblewrap makes every bind nosuid and
        nodev. A path may not be '/', reserved, hidden, behind an image symlink, inside or
        around another mount or a mounted file, nor new inside a read-only tree of the image
        (an existing directory there may be covered)."""
        args: list[str] = []
        taken = [*mounted_files]
        for mount in mounts:
            path = self.check_path(mount.path, "mount")
            if not mount.source:
                raise PathRefused(f"mount {path!r} has no host directory (not resolved)")
            for other in taken:
                if other == path or other.startswith(path + "/") or path.startswith(other + "/"):
                    raise PathRefused(f"mount {path!r} overlaps {other!r}; keep them apart")
            taken.append(path)
            if self._tree_of(path) is not None:
                self._readonly_ancestor_ok(path, "mount", want_dir=True)
            else:
                args += self._dir_args(path)
            args += ["--ro-bind" if mount.read_only else "--bind", mount.source, path]
        return args


def _lstat_beneath(root: str, path: str) -> os.stat_result | None:
    """The lstat of `path` below `root`, reached without following any symlink: a symlink on
    the way is itself the answer (S_ISLNK); None when something on the way is missing or not a
    directory."""
    flags = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
    parts = [p for p in path.split("/") if p]
    try:
        fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        for index, part in enumerate(parts):
            try:
                nxt = os.open(part, flags, dir_fd=fd)
            except OSError:
                return None
            os.close(fd)
            fd = nxt
            st = os.fstat(fd)
            if stat.S_ISLNK(st.st_mode) or index == len(parts) - 1:
                return st
            if not stat.S_ISDIR(st.st_mode):
                return None
        return os.fstat(fd)
    finally:
        os.close(fd)


ImageFactory = Callable[[int], ImageRoot]
_IMAGES: dict[str, ImageFactory] = {}


def register_image(name: str, factory: ImageFactory) -> None:
    """Makes `name` resolvable; the factory receives the sandbox's disk size in bytes."""
    _IMAGES[name] = factory


def known_images() -> list[str]:
    return sorted(_IMAGES)


def resolve_image(name: str, disk_bytes: int) -> ImageRoot:
    """The root for image `name` ("" means "host"). Raises ImageNotFound for unknown names."""
    factory = _IMAGES.get(name or "host")
    if factory is None:
        raise ImageNotFound(
            f"unknown image {name!r}: this node provides only "
            f"{', '.join(map(repr, known_images()))} (OCI images such as 'python:3.11' are not "
            "pulled by this runtime)"
        )
    if disk_bytes <= 0:
        raise PathRefused(f"disk size must be positive, got {disk_bytes}")
    return factory(disk_bytes)


# --- the host image --------------------------------------------------------------------------


def scan_secrets(etc: str = "/etc") -> list[str]:
    """Paths under `etc` to hide: not world-readable (dirs: not world-searchable) or secret by name.

    Does not descend into hidden directories or follow symlinks. Sorted, parents first.
    """
    hidden: list[str] = []

    def walk(directory: str) -> None:
        try:
            entries = sorted(os.scandir(directory), key=lambda e: e.name)
        except OSError:
            return
        for entry in entries:
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            if stat.S_ISLNK(st.st_mode):
                continue
            named = entry.name in SECRET_NAMES or (
                os.path.basename(directory) == "ssh" and entry.name.endswith("_key")
            )
            if stat.S_ISDIR(st.st_mode):
                if named or (st.st_mode & 0o005) != 0o005:
                    hidden.append(entry.path)
                else:
                    walk(entry.path)
            elif named or not st.st_mode & stat.S_IROTH:
                hidden.append(entry.path)

    walk(etc)
    return hidden


def _mask_args(paths: Sequence[str], source_root: str) -> list[str]:
    args: list[str] = []
    for path in paths:
        host = os.path.join(source_root, path.lstrip("/"))
        if os.path.isdir(host) and not os.path.islink(host):
            args += ["--perms", "0555", "--tmpfs", path, "--remount-ro", path]
        else:
            args += ["--ro-bind", "/dev/null", path]
    return args


@cache
def proc_args() -> tuple[str, ...]:
    """`/proc` with /proc/sys read-only and kernel-introspection files masked (every image)."""
    tail_proc: list[str] = ["--proc", "/proc"]
    for name in PROC_READONLY:
        if os.path.exists(f"/proc/{name}"):
            tail_proc += ["--ro-bind", f"/proc/{name}", f"/proc/{name}"]
    for name in PROC_MASK_FILES:
        if os.path.exists(f"/proc/{name}"):
            tail_proc += ["--ro-bind", "/dev/null", f"/proc/{name}"]
    for name in PROC_MASK_DIRS:
        if os.path.isdir(f"/proc/{name}"):
            tail_proc += ["--perms", "0555", "--tmpfs", f"/proc/{name}", "--remount-ro",
                          f"/proc/{name}"]  # fmt: skip
    return tuple(tail_proc)


@dataclass(frozen=True)
class _HostStatic:
    """The parts of the host image that do not depend on the sandbox (computed once)."""

    usr_args: tuple[str, ...]
    tail_args: tuple[str, ...]
    symlinks: frozenset[str]
    readonly_trees: tuple[str, ...]
    masked: frozenset[str]


@cache
def _host_static() -> _HostStatic:
    usr_args: list[str] = ["--ro-bind", "/usr", "/usr"]
    symlinks: set[str] = set()
    trees = ["/usr", "/etc"]
    for name in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
        host = "/" + name
        if os.path.islink(host):
            usr_args += ["--symlink", os.readlink(host), host]
            symlinks.add(host)
        elif os.path.isdir(host):
            usr_args += ["--ro-bind", host, host]
            trees.append(host)
    usr_args += ["--ro-bind", "/etc", "/etc"]
    secrets = scan_secrets("/etc")
    usr_args += _mask_args(secrets, "/")

    tail: list[str] = ["--dev", "/dev"]
    tail_proc = list(proc_args())
    layer = [
        "--perms", "1777", "--dir", "/tmp",
        "--perms", "1777", "--dir", "/var/tmp",
        "--perms", "0700", "--dir", "/root",
        "--perms", "0755", "--dir", DEFAULT_WORKDIR,
        "--perms", "0755", "--dir", AVIATO_BIN,
    ]  # fmt: skip
    if not any(os.path.exists(p) for p in ("/usr/bin/python", "/usr/local/bin/python")):
        for candidate in ("/usr/bin/python3", "/usr/local/bin/python3"):
            if os.path.exists(candidate):
                layer += ["--symlink", candidate, f"{AVIATO_BIN}/python"]
                break
    return _HostStatic(
        usr_args=tuple(usr_args),
        tail_args=(*tail, *tail_proc, *layer),
        symlinks=frozenset(symlinks),
        readonly_trees=tuple(trees),
        masked=frozenset(secrets),
    )


def host_image(disk_bytes: int) -> ImageRoot:
    """The `host` image with a writable layer (and /dev/shm) of `disk_bytes` each."""
    static = _host_static()
    size = str(disk_bytes)
    args = (
        "--size", size, "--perms", "0755", "--tmpfs", "/",
        *static.usr_args,
        *static.tail_args[:2],  # --dev /dev
        "--size", size, "--perms", "1777", "--tmpfs", "/dev/shm",
        *static.tail_args[2:],
    )  # fmt: skip
    return ImageRoot(
        name="host",
        mount_args=args,
        env=(("PATH", DEFAULT_PATH), ("HOME", "/root"), ("LANG", "C.UTF-8")),
        working_dir=DEFAULT_WORKDIR,
        source_root="/",
        readonly_trees=static.readonly_trees,
        masked=static.masked,
        symlinks=static.symlinks,
    )


def host_image_facts() -> dict[str, str]:
    """What the host image hides, for `aviato server status` and debugging."""
    static = _host_static()
    return {
        "host_image_hidden": ", ".join(sorted(static.masked)) or "(nothing)",
        "host_image_trees": ", ".join(static.readonly_trees),
    }


def warm_up() -> None:
    """Does the one-time scans now (at service start) rather than in the first create."""
    with contextlib.suppress(OSError):
        _host_static()


register_image("host", host_image)
