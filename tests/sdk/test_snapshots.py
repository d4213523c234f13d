"""`Sandbox.snapshot`, `Sandbox.run(snapshot=...)`, `Sandbox.fork`, `Snapshot.list/delete` and
`writable_layer` through the SDK against the autostarted local service."""

from __future__ import annotations

import os

import pytest

from aviato import Sandbox, Snapshot
from aviato.exceptions import SandboxNotFoundError

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="snapshots need a root service")


def test_snapshot_run_from_it_fork_and_delete() -> None:
    sb = Sandbox.run(writable_layer="disk", resources={"disk": "64Mi"})
    try:
        sb.exec(["sh", "-c", "echo ready > /workspace/state"]).result()
        snap = sb.snapshot().result()
        assert snap.id in [s.id for s in Snapshot.list().result()]
        assert snap.image == "host" and snap.size_bytes >= 6
        from_snap = Sandbox.run(snapshot=snap)
        assert from_snap.exec(["cat", "/workspace/state"]).result().stdout == "ready\n"
        forks = sb.fork(2).result()
        forks[0].exec(["sh", "-c", "echo changed > /workspace/state"]).result()
        assert forks[1].exec(["cat", "/workspace/state"]).result().stdout == "ready\n"
        for other in (from_snap, *forks):
            other.stop().result()
            Sandbox.delete(other.sandbox_id).result()
        Snapshot.delete(snap).result()
        assert snap.id not in [s.id for s in Snapshot.list().result()]
        with pytest.raises(SandboxNotFoundError):
            Sandbox.run(snapshot=snap.id).wait()
        with pytest.raises(ValueError, match="writable_layer must be 'memory' or 'disk'"):
            Sandbox.run(writable_layer="ssd")
        with pytest.raises(ValueError, match="from 1 to 64"):
            sb.fork(0)
    finally:
        sb.stop().result()
