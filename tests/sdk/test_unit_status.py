"""SandboxStatus (no service)."""

from __future__ import annotations

import pytest

from aviato import SandboxStatus
from aviato.v1 import sandbox_pb2 as pb


def test_values_are_lowercase_strings() -> None:
    assert SandboxStatus.RUNNING == "running"
    assert f"{SandboxStatus.COMPLETED}" == "completed"
    assert {s.value for s in SandboxStatus} == {
        "pending",
        "creating",
        "running",
        "paused",
        "completed",
        "failed",
        "terminated",
        "unspecified",
    }


def test_proto_round_trip() -> None:
    for status in SandboxStatus:
        if status is SandboxStatus.PAUSED:
            continue
        assert SandboxStatus.from_proto(status.to_proto()) is status
    assert SandboxStatus.from_proto(pb.SANDBOX_STATUS_TERMINATED) is SandboxStatus.TERMINATED
    assert SandboxStatus.from_proto(99) is SandboxStatus.UNSPECIFIED


def test_classes() -> None:
    assert [s for s in SandboxStatus if s.is_terminal] == [
        SandboxStatus.COMPLETED,
        SandboxStatus.FAILED,
        SandboxStatus.TERMINATED,
    ]
    assert SandboxStatus.RUNNING.is_running and SandboxStatus.PAUSED.is_running
    assert SandboxStatus.PENDING.is_starting and not SandboxStatus.RUNNING.is_starting


def test_parse() -> None:
    assert SandboxStatus.parse("Running") is SandboxStatus.RUNNING
    assert SandboxStatus.parse(SandboxStatus.FAILED) is SandboxStatus.FAILED
    with pytest.raises(ValueError, match="expected one of"):
        SandboxStatus.parse("sleeping")
