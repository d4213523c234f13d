"""The cgroup filesystems: which hierarchies this process sees (`parse_mountinfo`), and reading
and writing their files (no buffering, close-on-exec)."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

V1_CONTROLLERS = ("memory", "pids", "cpu", "cpuacct", "freezer")
V1_REQUIRED = ("memory", "pids")
V2_CONTROLLERS = ("memory", "pids", "cpu")
CPU_PERIOD_US = 100_000


class CgroupError(Exception):
    """A cgroup operation failed in a way the caller should report (wraps the OSError)."""


def read_int(path: str, prefix: str = "", scale: int = 1) -> int | None:
    """The integer in `path` (or on its line starting with `prefix`), times `scale`."""
    try:
        with open(path, encoding="ascii") as f:
            for line in f:
                if line.startswith(prefix):
                    return int(line[len(prefix) :].split()[0]) * scale
    except (OSError, ValueError, IndexError):
        pass
    return None


@dataclass(frozen=True)
class Mount:
    """A cgroup hierarchy as this process sees it."""

    path: str
    version: int  # 1 or 2
    controllers: frozenset[str]


def parse_mountinfo(text: str) -> list[Mount]:
    """The cgroup and cgroup2 mounts listed in a /proc/<pid>/mountinfo text."""
    mounts: list[Mount] = []
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        fields = left.split()
        rest = right.split()
        if len(fields) < 5 or len(rest) < 3:
            continue
        fstype, superopts = rest[0], rest[2]
        mountpoint = fields[4].replace("\\040", " ")
        if fstype == "cgroup":
            opts = set(superopts.split(","))
            mounts.append(Mount(mountpoint, 1, frozenset(opts & set(V1_CONTROLLERS))))
        elif fstype == "cgroup2":
            controllers: frozenset[str] = frozenset()
            with contextlib.suppress(OSError):
                controllers = frozenset(Path(mountpoint, "cgroup.controllers").read_text().split())
            mounts.append(Mount(mountpoint, 2, controllers))
    return mounts


def write_file(path: str, value: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


def read_file(path: str) -> str:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        chunks = []
        while True:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks).decode()
    finally:
        os.close(fd)


def read_key(path: str, key: str) -> int:
    """The integer after `key` in a flat-keyed file (memory.events, memory.oom_control)."""
    with contextlib.suppress(OSError, ValueError):
        for line in read_file(path).splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    return 0
