"""Files and directories private to the service's user: the state directory and all it holds.

Everything the service (or the SDK starting it) creates under its state directory goes through
here: directories are 0700, files 0600, whatever the umask. `secure_tree` runs at every start
and brings back to those modes what an older version, an operator or a crash left looser
(`registry.db` holds sandboxes' environments; the image store held set-id files). One module, so
that the modes of the state directory can be changed in one place.

Never following symlinks: below the state directory, every chmod and open is made relative to a
directory descriptor with O_NOFOLLOW, so a symlink planted in the state directory cannot turn a
chmod or a create onto another file. The state directory itself may be a symlink the operator
made, but at start it must belong to the service's user (`DirectoryNotOurs` otherwise): the
service never takes over another user's directory.

What this cannot do: change the mode of an entry that belongs to another user when the service
is not root (`secure_tree` leaves it, logged; the 0700 directory above it still keeps others
out), or reach file systems that ignore modes (some network and FUSE mounts).
"""

from __future__ import annotations

import contextlib
import fnmatch
import logging
import os
import secrets
import stat
from pathlib import Path

__all__ = [
    "DIR_MODE",
    "FILE_MODE",
    "KEEP_MODES_BELOW",
    "MOUNTED_FILE_MODE",
    "SANDBOX_BINARY_MODE",
    "DirectoryNotOurs",
    "open_private",
    "private_dir",
    "secure_tree",
    "write_private",
]

log = logging.getLogger("aviato.private")

DIR_MODE = 0o700
FILE_MODE = 0o600
# Directories (relative to the state directory, fnmatch patterns) whose *contents* keep the
# modes they have: an unpacked image root must keep its files' modes (a sandbox runs them).
# Volumes keep their files' modes (docs/volumes.md): their owners' directories are made
# private, never what sandboxes put in them.
KEEP_MODES_BELOW = (
    "images/roots/*/rootfs", "images/tmp/*/rootfs", "volumes/*", "volumes-deleted",
    "volume-mounts/*",
)  # fmt: skip
# Files that sandboxes use, through the launcher's id-mapped view of the state directory (a root
# service; see runtime/native/privileges.c), in which host root's files belong to the sandbox's
# uid 0 and every other uid of the sandbox is "other": the supervisor binary it runs (as its
# uid 0, the owner) and mounted files, which the sandbox's own user (the image's `User`, not
# always uid 0) must read. The 0700 directories above them keep every other host user out.
SANDBOX_BINARY_MODE = 0o700
MOUNTED_FILE_MODE = 0o644
_FILE_MODES = (("bin/*", SANDBOX_BINARY_MODE), ("sandboxes/*/files/*", MOUNTED_FILE_MODE))

_NOFOLLOW_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class DirectoryNotOurs(PermissionError):
    """The state directory (or a directory in it) belongs to another user."""


def _chmod_fd(fd: int, mode: int) -> None:
    """chmod of what `fd` is (an O_PATH descriptor too, through its /proc magic link)."""
    try:
        os.fchmod(fd, mode)
    except OSError:
        os.chmod(f"/proc/self/fd/{fd}", mode)


def _own(fd: int, path: Path) -> os.stat_result:
    st = os.fstat(fd)
    if st.st_uid != os.geteuid():
        raise DirectoryNotOurs(
            f"{path} belongs to uid {st.st_uid}, not to the service's user (uid {os.geteuid()}); "
            "give the service a state directory of its own (or chown this one)"
        )
    return st


def private_dir(path: Path, *, ours: bool = False) -> Path:
    """Makes `path` (and missing parents) a directory of mode 0700, or brings an existing one
    to 0700. With `ours`, raises DirectoryNotOurs when it belongs to another user. Raises
    NotADirectoryError when it is something else."""
    path = Path(path)
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=DIR_MODE, parents=True)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        st = _own(fd, path) if ours else os.fstat(fd)
        if stat.S_IMODE(st.st_mode) != DIR_MODE:
            os.fchmod(fd, DIR_MODE)
    finally:
        os.close(fd)
    return path


def open_private(path: Path, flags: int = os.O_RDWR) -> int:
    """Opens (creating it 0600) the file `path` whose last component must not be a symlink;
    an existing file is brought to 0600. Returns the descriptor (close-on-exec)."""
    fd = os.open(path, flags | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, FILE_MODE)
    try:
        if stat.S_IMODE(os.fstat(fd).st_mode) != FILE_MODE:
            os.fchmod(fd, FILE_MODE)
    except BaseException:
        os.close(fd)
        raise
    return fd


def write_private(path: Path, data: bytes, tmp_dir: Path | None = None) -> None:
    """Replaces `path` atomically with `data` (0600), through a new file in `tmp_dir` (default:
    `path`'s directory, which must be on the same file system)."""
    directory = tmp_dir or path.parent
    tmp = directory / f".{path.name}.{secrets.token_hex(4)}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 FILE_MODE)  # fmt: skip
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _file_mode(rel: str) -> int:
    for pattern, mode in _FILE_MODES:
        if fnmatch.fnmatchcase(rel, pattern):
            return mode
    return FILE_MODE


def _fix_at(dir_fd: int, name: str, rel: str) -> int | None:
    """Brings the entry `name` of `dir_fd` (`rel` below the state directory) to its private
    mode without following it; returns an open descriptor of it when it is a directory (the
    caller closes it), else None."""
    try:
        fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    except FileNotFoundError:
        return None
    try:
        st = os.fstat(fd)
        if stat.S_ISLNK(st.st_mode):
            return None  # a symlink's own mode means nothing; never followed
        want = DIR_MODE if stat.S_ISDIR(st.st_mode) else _file_mode(rel)
        if stat.S_IMODE(st.st_mode) != want:
            _chmod_fd(fd, want)
        if not stat.S_ISDIR(st.st_mode):
            return None
        sub = os.open(name, _NOFOLLOW_DIR, dir_fd=dir_fd)
        if not os.path.samestat(st, os.fstat(sub)):
            os.close(sub)  # replaced meanwhile: left for the next start
            return None
        return sub
    finally:
        os.close(fd)


def secure_tree(root: Path, keep_below: tuple[str, ...] = KEEP_MODES_BELOW) -> None:
    """Makes `root` and everything below it private (directories 0700, other files 0600),
    without following any symlink and without descending below the `keep_below` patterns
    (relative paths). Depth first: as many descriptors open as the tree is deep. Raises
    DirectoryNotOurs when `root` belongs to another user."""
    root = private_dir(root, ours=True)
    top = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    stack: list[tuple[int, str, list[str]]] = [(top, "", os.listdir(top))]
    try:
        while stack:
            dir_fd, rel, names = stack[-1]
            if not names:
                os.close(dir_fd)
                stack.pop()
                continue
            name = names.pop()
            try:
                sub = _fix_at(dir_fd, name, f"{rel}/{name}" if rel else name)
            except PermissionError as e:  # another user's entry: the directory still guards it
                log.warning("cannot make %s/%s private: %s", rel or ".", name, e)
                continue
            if sub is None:
                continue
            sub_rel = f"{rel}/{name}" if rel else name
            if any(fnmatch.fnmatchcase(sub_rel, pattern) for pattern in keep_below):
                os.close(sub)
                continue
            try:
                stack.append((sub, sub_rel, os.listdir(sub)))
            except BaseException:
                os.close(sub)
                raise
    finally:
        for dir_fd, _, _ in stack:
            os.close(dir_fd)
