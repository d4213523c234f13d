"""Host uid ranges for sandboxes: each sandbox of a root service gets a range no one else has.

Why: a sandbox whose processes were host uid 0 (even without any capability) shared root's
per-user kernel accounting with the host and with every other sandbox: inotify instances,
pipe buffer pages, RLIMIT_NPROC, keyrings. One sandbox could exhaust them for host root or
shrink another sandbox's pipes. With a user namespace of its own, mapped to a range of otherwise
unused host ids, every counter is the sandbox's own, and its uid 0 is nobody on the host.

Layout of the id space: slot `n` is host ids `BASE + n * STRIDE` and the `COUNT` ids after it;
inside the sandbox they are 0..COUNT-1: 0..65535 for the image's users, and 65536 for the
protected commands (`PROTECTED_ID`, an id no image uses). BASE is 2^30, far above the ids that
distributions hand out to users (and above the customary /etc/subuid ranges from 100000).

Claims are host-wide, so that two aviato services on one host (each with its own state
directory) never hand out the same range: a claim is a file `<CLAIMS>/<n>` created with
O_EXCL, holding the state directory and the sandbox id. A claim whose sandbox is gone is stale
and may be taken over: its sandbox directory no longer exists, or its bwrap process (from the
sandbox's runtime.json) is no longer alive, or it has no runtime.json two minutes after the
claim (a create that died half-way). All claim changes happen under an flock on the claims
directory, so two services cannot both take over one stale claim.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

__all__ = ["BASE", "COUNT", "PROTECTED_ID", "STRIDE", "IdRange", "IdRanges", "RangesExhausted"]

BASE = 1 << 30
STRIDE = 1 << 17
COUNT = 65537  # ids 0..65535 for the image's users, and PROTECTED_ID
PROTECTED_ID = 65536
SLOTS = ((1 << 32) - BASE) // STRIDE - 1  # the last id of the last slot stays below 2^32 - 1
CLAIMS = Path("/run/aviato/uid-ranges")
_CREATING_GRACE_S = 120.0


class RangesExhausted(OSError):
    """Every uid range is claimed (about 24,000 sandboxes on one host)."""


@dataclass(frozen=True)
class IdRange:
    slot: int

    @property
    def base(self) -> int:
        """The host uid (and gid) of the sandbox's uid 0."""
        return BASE + self.slot * STRIDE

    def launcher_args(self) -> list[str]:
        return ["--userns", f"{self.base}:{COUNT}"]


class IdRanges:
    """The host-wide claims of uid ranges, as seen by the service of `state_dir`.

    `running(directory)` tells whether the sandbox whose state directory that is still runs
    (None: it has no record yet); the runtime knows its records, of every service of the host.
    """

    def __init__(
        self,
        state_dir: Path,
        running: Callable[[Path], bool | None],
        claims: Path = CLAIMS,
    ) -> None:
        self._state = str(Path(state_dir).absolute())
        self._running = running
        self._claims = claims
        claims.mkdir(parents=True, exist_ok=True)
        os.chmod(claims, 0o700)
        self._next = secrets.randbelow(SLOTS)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[int]:
        fd = os.open(self._claims, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield fd
        finally:
            os.close(fd)

    def _owner(self, dirfd: int, slot: int) -> dict[str, object] | None:
        try:
            fd = os.open(str(slot), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dirfd)
        except FileNotFoundError:
            return None
        try:
            data = json.loads(os.read(fd, 4096) or b"{}")
            mtime = os.fstat(fd).st_mtime
        except (OSError, ValueError):
            data, mtime = {}, 0.0
        finally:
            os.close(fd)
        if not isinstance(data, dict):
            data = {}
        data["_mtime"] = mtime
        return data

    def _stale(self, owner: dict[str, object]) -> bool:
        directory = Path(str(owner.get("state_dir", ""))) / "sandboxes" / str(owner.get("id", ""))
        if not owner.get("state_dir") or not owner.get("id") or not directory.is_dir():
            return True
        running = self._running(directory)
        if running is None:  # no record yet: a create in progress, or one that died half-way
            mtime = owner.get("_mtime", 0.0)
            age = time.time() - (mtime if isinstance(mtime, float) else 0.0)
            return age > _CREATING_GRACE_S
        return not running

    def claim(self, sandbox_id: str) -> IdRange:
        """A range of its own for the sandbox `sandbox_id` of this service."""
        data = json.dumps({"state_dir": self._state, "id": sandbox_id}).encode()
        with self._locked() as dirfd:
            for _ in range(SLOTS):
                slot = self._next
                self._next = (self._next + 1) % SLOTS
                owner = self._owner(dirfd, slot)
                if owner is not None:
                    if not self._stale(owner):
                        continue
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(str(slot), dir_fd=dirfd)
                flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
                try:
                    fd = os.open(str(slot), flags, 0o600, dir_fd=dirfd)
                except FileExistsError:
                    continue
                try:
                    os.write(fd, data)
                finally:
                    os.close(fd)
                return IdRange(slot)
        raise RangesExhausted(errno.EUSERS, "every sandbox uid range of this host is in use")

    def adopt(self, sandbox_id: str, slot: int) -> IdRange | None:
        """The range of a sandbox found running after a restart, if the claim is still ours."""
        with self._locked() as dirfd:
            owner = self._owner(dirfd, slot)
        if owner and owner.get("state_dir") == self._state and owner.get("id") == sandbox_id:
            return IdRange(slot)
        return None

    def release(self, sandbox_id: str, ids: IdRange) -> None:
        """Gives the range back once none of the sandbox's processes is left."""
        with self._locked() as dirfd:
            owner = self._owner(dirfd, ids.slot)
            if owner and owner.get("state_dir") == self._state and owner.get("id") == sandbox_id:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(str(ids.slot), dir_fd=dirfd)
