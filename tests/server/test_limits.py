"""Leases, lifetimes, memory and pids limits, capacity."""

from __future__ import annotations

import time
import uuid

import grpc
import pytest
from server_helpers import S, ServerProcess, code_of

from aviato.v1 import sandbox_pb2 as pb


@pytest.mark.slow
def test_lease_expiry_stops_sandboxes(server: ServerProcess) -> None:
    c = server.client()
    lease = f"lease-{uuid.uuid4()}"
    a = c.running(lease_id=lease, lease_ttl=1.0)
    b = c.running(lease_id=lease, lease_ttl=1.0)
    other = c.running()
    renewed = c.stub.RenewLease(pb.RenewLeaseRequest(lease_id=lease, ttl_seconds=1.0))
    assert renewed.sandbox_count == 2 and renewed.id == lease
    # Renewals keep them alive past the TTL.
    for _ in range(4):
        time.sleep(0.5)
        c.stub.RenewLease(pb.RenewLeaseRequest(lease_id=lease, ttl_seconds=1.0))
    assert c.get(a.id).status == S.SANDBOX_STATUS_RUNNING
    # Then renewals stop.
    end_a = c.wait(a.id, terminal=True, timeout=10)
    end_b = c.wait(b.id, terminal=True, timeout=10)
    for end in (end_a, end_b):
        assert end.status == S.SANDBOX_STATUS_TERMINATED and end.status_reason == "lease expired"
    assert c.get(other.id).status == S.SANDBOX_STATUS_RUNNING
    for sb in (a, b, other):
        c.delete(sb.id)


def test_release_lease(server: ServerProcess) -> None:
    c = server.client()
    lease = f"lease-{uuid.uuid4()}"
    keep = c.running(lease_id=lease, lease_ttl=60)
    released = c.stub.ReleaseLease(pb.ReleaseLeaseRequest(lease_id=lease, stop_sandboxes=False))
    assert released.sandbox_count == 1
    assert c.get(keep.id).status == S.SANDBOX_STATUS_RUNNING
    lease2 = f"lease-{uuid.uuid4()}"
    gone = c.running(lease_id=lease2, lease_ttl=60)
    c.stub.ReleaseLease(pb.ReleaseLeaseRequest(lease_id=lease2, stop_sandboxes=True))
    assert c.get(gone.id).status == S.SANDBOX_STATUS_TERMINATED
    with pytest.raises(grpc.RpcError) as err:
        c.stub.ReleaseLease(pb.ReleaseLeaseRequest(lease_id=lease2))
    assert code_of(err.value) == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as err:
        c.stub.RenewLease(pb.RenewLeaseRequest(lease_id=lease2, ttl_seconds=0.5))
    assert code_of(err.value) == grpc.StatusCode.INVALID_ARGUMENT
    assert "ttl_seconds" in err.value.details()  # type: ignore[attr-defined]
    for sb in (keep, gone):
        c.delete(sb.id)


@pytest.mark.slow
def test_max_lifetime(server: ServerProcess) -> None:
    c = server.client()
    sb = c.running(max_lifetime_seconds=1.0)
    assert sb.expires_at.ToNanoseconds() - sb.created_at.ToNanoseconds() == 1_000_000_000
    end = c.wait(sb.id, terminal=True, timeout=15)
    assert end.status == S.SANDBOX_STATUS_TERMINATED
    assert end.status_reason == "max lifetime exceeded"
    lived = (end.ended_at.ToNanoseconds() - end.created_at.ToNanoseconds()) / 1e9
    assert 0.9 < lived < 5, lived
    c.delete(sb.id)


def test_oom_is_failed_oomkilled_137(server: ServerProcess) -> None:
    c = server.client()
    info = c.stub.GetServerInfo(pb.GetServerInfoRequest())
    if info.cgroups == "none":
        pytest.skip("no cgroups on this host")
    sb = c.create(
        command=["/usr/bin/python3", "-c", "b = bytearray(512 * 1024 * 1024); print(len(b))"],
        resources={"memory": "64Mi"},
    )
    end = c.wait(sb.id, terminal=True, timeout=60)
    assert end.status == S.SANDBOX_STATUS_FAILED, end
    assert end.status_reason == "OOMKilled" and end.exit_code == 137
    c.delete(sb.id)


def test_oom_in_exec_leaves_sandbox_running(server: ServerProcess) -> None:
    c = server.client()
    info = c.stub.GetServerInfo(pb.GetServerInfoRequest())
    if info.cgroups == "none":
        pytest.skip("no cgroups on this host")
    sb = c.running(resources={"memory": "64Mi"})
    r = c.exec(sb.id, ["/usr/bin/python3", "-c", "b = bytearray(512 * 1024 * 1024)"])
    assert r.exit_code == 137
    assert c.get(sb.id).status == S.SANDBOX_STATUS_RUNNING
    assert c.exec(sb.id, ["/bin/echo", "alive"]).stdout == b"alive\n"
    c.delete(sb.id)


@pytest.mark.slow
def test_fork_bomb_is_capped(server: ServerProcess) -> None:
    c = server.client()
    info = c.stub.GetServerInfo(pb.GetServerInfoRequest())
    if info.cgroups == "none":
        pytest.skip("no cgroups on this host")
    sb = c.running(resources={"pids": 64})
    t0 = time.monotonic()
    r = c.exec(sb.id, ["/bin/sh", "-c", "bomb() { bomb | bomb & }; bomb; sleep 2; echo survived"],
               timeout=10)  # fmt: skip
    assert time.monotonic() - t0 < 20
    assert r.terminal.WhichOneof("msg") == "exit"
    n = c.sh(sb.id, "ls /proc | grep -c '^[0-9]'")
    if n.terminal.WhichOneof("msg") == "exit" and n.exit_code == 0:
        assert int(n.stdout) <= 64
    # The host is fine and the service answers.
    assert c.get(sb.id).id == sb.id
    c.delete(sb.id)


def test_capacity_count_and_memory(fresh_server: ServerProcess) -> None:
    # Sandboxes without a memory limit count as the default limit (1 GiB).
    fresh_server.args += ["--max-sandboxes", "2", "--max-memory", "3Gi"]
    c = fresh_server.start().client()
    a = c.create()
    b = c.create()
    with pytest.raises(grpc.RpcError) as err:
        c.create()
    assert code_of(err.value) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "max-sandboxes" in err.value.details()  # type: ignore[attr-defined]
    c.delete(b.id)
    with pytest.raises(grpc.RpcError) as err:
        c.create(resources={"memory": "4Gi"})
    assert code_of(err.value) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "memory capacity exhausted" in err.value.details()  # type: ignore[attr-defined]
    ok = c.create(resources={"memory": "256Mi"})
    c.delete(a.id)
    c.delete(ok.id)
