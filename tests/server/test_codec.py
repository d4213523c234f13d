"""The public proto <-> model codec (pure): statuses, answers, resolved defaults."""

from __future__ import annotations

import pytest

from aviato.server import codec
from aviato.server.errors import InvalidArgument
from aviato.server.records import SandboxRecord, SandboxStatus
from aviato.server.validation import SpecDefaults
from aviato.v1 import sandbox_pb2 as pb

MiB = 1 << 20


def test_every_status_round_trips() -> None:
    wire_values = [v for v in pb.SandboxStatus.values() if v != pb.SANDBOX_STATUS_UNSPECIFIED]
    assert sorted(codec.STATUS_TO_PROTO.values()) == sorted(wire_values)
    for status in SandboxStatus:
        wire = codec.STATUS_TO_PROTO[status]
        assert pb.SandboxStatus.Name(wire) == f"SANDBOX_STATUS_{status.name}"
        assert codec.decode_statuses([wire], "statuses") == [status]
    with pytest.raises(InvalidArgument, match=r"^statuses\[1\]: 0 is not a sandbox status"):
        codec.decode_statuses([pb.SANDBOX_STATUS_RUNNING, 0], "statuses")
    with pytest.raises(InvalidArgument, match=r"^statuses\[0\]"):
        codec.decode_statuses([99], "statuses")


def test_defaults_are_resolved_once_and_answered() -> None:
    defaults = SpecDefaults(image="host", memory_bytes=300 * MiB, pids=77, disk_bytes=2 * MiB,
                            max_lifetime_seconds=120)  # fmt: skip
    valid = codec.decode_spec(pb.SandboxSpec(tags=["x"]), defaults)
    c = valid.config
    assert (c.cpu_millis, c.memory_bytes, c.pids, c.disk_bytes) == (None, 300 * MiB, 77, 2 * MiB)
    assert c.asked_limits == frozenset() and valid.max_lifetime_seconds == 120
    rec = SandboxRecord(id="sbx-1", owner="local", request_id="r", status=SandboxStatus.RUNNING,
                        config=c, created_ns=5, tags=valid.tags,
                        max_lifetime_seconds=valid.max_lifetime_seconds)  # fmt: skip
    msg = codec.encode_sandbox(rec)
    assert msg.status == pb.SANDBOX_STATUS_RUNNING and list(msg.spec.tags) == ["x"]
    res = msg.spec.resources
    assert (res.cpu, res.memory, res.pids, res.disk) == ("", "300Mi", 77, "2Mi")
    assert msg.spec.max_lifetime_seconds == 120 and msg.spec.image == "host"
    # What the answer says decodes to the same model (no default applied twice).
    again = codec.decode_spec(msg.spec, SpecDefaults(memory_bytes=1, pids=1, disk_bytes=1))
    assert (again.config.memory_bytes, again.config.pids, again.config.disk_bytes) == (
        300 * MiB, 77, 2 * MiB
    )  # fmt: skip


def test_the_spec_decoder_answers_as_decode_spec_and_keeps_only_small_specs() -> None:
    defaults = SpecDefaults(image="host", memory_bytes=300 * MiB, pids=77, disk_bytes=2 * MiB)
    specs = codec.SpecDecoder(defaults, size=2, max_bytes=256)
    plain = pb.SandboxSpec()
    other = pb.SandboxSpec(env={"A": "1", "B": "2"}, tags=["t"], resources=pb.Resources(pids=5))
    for spec in (plain, other, plain, other):
        assert specs.decode(spec) == codec.decode_spec(spec, defaults)
    assert specs.decode(plain) is specs.decode(plain)  # remembered
    assert specs.decode(other).config.env == {"A": "1", "B": "2"}
    assert specs.decode(other).config.pids == 5 and specs.decode(plain).config.pids == 77
    # A map's order on the wire does not make two specs of one meaning two answers.
    reordered = pb.SandboxSpec(env={"B": "2", "A": "1"}, tags=["t"], resources=pb.Resources(pids=5))
    assert specs.decode(reordered) is specs.decode(other)
    # At most `size` kept: the oldest goes.
    third = pb.SandboxSpec(tags=["x"])
    kept = specs.decode(plain)
    specs.decode(other), specs.decode(third)
    assert specs.decode(plain) is not kept and specs.decode(plain) == kept
    # An invalid spec raises every time (nothing is kept of it).
    for _ in range(2):
        with pytest.raises(InvalidArgument, match=r"spec\.resources"):
            specs.decode(pb.SandboxSpec(resources=pb.Resources(memory="lots")))
    # A spec larger than `max_bytes` (a mounted file's content) is decoded each time.
    big = pb.SandboxSpec(mounted_files=[pb.MountedFile(path="/f", content=b"x" * 1000)])
    assert specs.decode(big) is not specs.decode(big)
    assert specs.decode(big) == codec.decode_spec(big, defaults)
