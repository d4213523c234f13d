"""The host's free memory and disk as admission reads them (`admission.HostReading`): read
again only when it matters, and never a create admitted that a fresh reading would refuse
unless a reading at most `max_age` old left room for it and for every create admitted on it.
Pure logic with a host figure and a clock of the test's own; the real service's refusal is
tests/reliability/test_capacity.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from aviato.server.admission import HOST_READING_SECONDS, Admission, HostReading
from aviato.server.config import ServerConfig
from aviato.server.errors import CapacityExceeded
from aviato.server.quotas import Charge
from aviato.server.registry import Registry

GiB = 1 << 30


class Host:
    """A host figure and a clock the test moves."""

    def __init__(self, value: int | None) -> None:
        self.value = value
        self.now = 100.0
        self.reads = 0

    def read(self) -> int | None:
        self.reads += 1
        return self.value

    def clock(self) -> float:
        return self.now


def reading(host: Host, floor: int = 1 * GiB, max_age: float = 1.0) -> HostReading:
    return HostReading(host.read, floor, max_age, clock=host.clock)


def test_a_reading_with_room_admits_without_reading_again() -> None:
    host = Host(10 * GiB)
    room = reading(host)
    for _ in range(8):  # 8 x 1 GiB taken on a 10 GiB reading leaves the 1 GiB floor
        assert room.below_floor(GiB) is None
    assert host.reads == 1


def test_what_the_admitted_creates_may_take_makes_it_read_again() -> None:
    host = Host(10 * GiB)
    room = reading(host)
    for _ in range(9):  # 10 GiB less 9 x 1 GiB: at the floor
        assert room.below_floor(GiB) is None
    assert host.reads == 1
    assert room.below_floor(GiB) is None  # the 10th would pass it on the kept reading: read again
    assert host.reads == 2
    host.value = GiB // 2  # and the host has no room now: the next create is refused
    host.now += 0.01
    for _ in range(9):
        if room.below_floor(GiB) is not None:
            break
    else:
        pytest.fail("a host below its floor admitted creates on an old reading")


def test_a_host_that_fell_below_its_floor_refuses_once_the_reading_is_old() -> None:
    host = Host(100 * GiB)
    room = reading(host, max_age=1.0)
    assert room.below_floor(GiB) is None
    host.value = GiB // 2  # something outside the sandboxes took the memory
    host.now += 1.0
    assert room.below_floor(GiB) == GiB // 2
    assert host.reads == 2


def test_a_refusal_is_never_reused() -> None:
    host = Host(GiB // 2)
    room = reading(host)
    assert room.below_floor(1) == GiB // 2
    host.value = 50 * GiB  # room again (sandboxes stopped): the very next create reads it
    assert room.below_floor(1) is None
    assert host.reads == 2


def test_an_unknown_figure_refuses_nothing_and_is_read_again() -> None:
    host = Host(None)
    room = reading(host)
    assert room.below_floor(GiB) is None
    assert room.below_floor(GiB) is None
    assert host.reads == 2


def test_admission_refuses_a_create_the_host_cannot_hold(tmp_path: Path) -> None:
    """Through `Admission.check`, with the service's own reading of the host replaced: a
    reading that admitted earlier creates does not admit one once the host is low and the
    reading is `HOST_READING_SECONDS` old, nor one that would pass the floor on it."""
    config = ServerConfig(state_dir=tmp_path, min_free_memory_bytes=GiB, min_free_disk_bytes=0)
    admission = Admission(config, Registry(tmp_path / "registry.db"))
    host = Host(3 * GiB)
    admission.host_memory = reading(host, max_age=HOST_READING_SECONDS)
    charge = Charge(cpu_millis=1000, memory_bytes=GiB, disk_bytes=0)
    admission.check("local", charge, 0)
    admission.check("local", charge, 1)  # 3 GiB - 2 x 1 GiB: at the floor, admitted
    assert host.reads == 1
    host.value = GiB - 1
    with pytest.raises(CapacityExceeded, match="host memory low"):
        admission.check("local", charge, 2)  # would pass the floor on the kept reading
    assert host.reads == 2
