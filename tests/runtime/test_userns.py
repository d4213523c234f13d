"""Host-wide claims of sandbox uid ranges (runtime/userns.py), as pure logic on a temporary
claims directory; the ranges at work in real sandboxes are attacked in
tests/security/test_protected.py."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

from aviato.runtime import userns
from aviato.runtime.userns import IdRanges

# What the runtime would read from each sandbox's runtime.json (any service's): True running,
# False ended, absent: no record yet.
WORLD: dict[str, bool] = {}


def _running(directory: Path) -> bool | None:
    return WORLD.get(f"{directory.parent.parent.name}/{directory.name}")


def _state(tmp: Path, name: str, *sandboxes: str) -> Path:
    state = tmp / name
    for sid in sandboxes:
        (state / "sandboxes" / sid).mkdir(parents=True)
    return state


def test_two_services_never_share_a_range(tmp_path: Path) -> None:
    claims = tmp_path / "claims"
    a = _state(tmp_path, "a", *(f"s{i}" for i in range(40)))
    b = _state(tmp_path, "b", *(f"s{i}" for i in range(40)))
    WORLD.update({f"{n}/s{i}": True for n in "ab" for i in range(40)})
    ranges_a = IdRanges(a, _running, claims)
    ranges_b = IdRanges(b, _running, claims)
    ranges_b._next = ranges_a._next  # the worst case: both start from the same slot
    got: list[int] = []
    lock = threading.Lock()

    def claim(ranges: IdRanges) -> None:
        for i in range(40):
            slot = ranges.claim(f"s{i}").slot
            with lock:
                got.append(slot)

    threads = [threading.Thread(target=claim, args=(r,)) for r in (ranges_a, ranges_b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == len(set(got)) == 80
    assert oct(os.stat(claims).st_mode & 0o777) == "0o700"


def test_a_claim_whose_sandbox_is_gone_is_taken_over(tmp_path: Path) -> None:
    claims = tmp_path / "claims"
    old = _state(tmp_path, "old", "gone", "ended", "creating")
    WORLD.update({"old/gone": True, "old/ended": False})
    ranges_old = IdRanges(old, _running, claims)
    slots = {sid: ranges_old.claim(sid).slot for sid in ("gone", "ended", "creating")}
    (old / "sandboxes" / "gone").rmdir()  # deleted while its service was away
    new = _state(tmp_path, "new", "x", "y", "z")
    ranges_new = IdRanges(new, _running, claims)
    ranges_new._next = min(slots.values())
    taken = {ranges_new.claim(sid).slot for sid in ("x", "y", "z")}
    assert slots["gone"] in taken and slots["ended"] in taken
    assert slots["creating"] not in taken  # no record yet, claimed just now: still its own


def test_a_create_that_died_half_way_frees_its_range_after_the_grace(tmp_path: Path) -> None:
    claims = tmp_path / "claims"
    old = _state(tmp_path, "half-way", "half")
    slot = IdRanges(old, _running, claims).claim("half").slot
    past = time.time() - userns._CREATING_GRACE_S - 1
    os.utime(claims / str(slot), (past, past))
    ranges_new = IdRanges(_state(tmp_path, "new", "n"), _running, claims)
    ranges_new._next = slot
    assert ranges_new.claim("n").slot == slot


def test_release_and_adopt_touch_only_ones_own_claim(tmp_path: Path) -> None:
    claims = tmp_path / "claims"
    WORLD.update({"mine/s": True, "other/s": True})
    mine = IdRanges(_state(tmp_path, "mine", "s"), _running, claims)
    other = IdRanges(_state(tmp_path, "other", "s"), _running, claims)
    ids = mine.claim("s")
    assert other.adopt("s", ids.slot) is None  # same sandbox id, another service
    other.release("s", ids)
    assert (claims / str(ids.slot)).exists()
    assert mine.adopt("s", ids.slot) == ids
    mine.release("s", ids)
    assert not (claims / str(ids.slot)).exists()


def test_ranges_stay_inside_the_id_space() -> None:
    last = userns.IdRange(userns.SLOTS - 1)
    assert last.base >= userns.BASE
    assert last.base + userns.COUNT - 1 < (1 << 32) - 1  # uid -1 is "no change" to the kernel
    assert userns.PROTECTED_ID == userns.COUNT - 1 >= 65536
