"""Snapshots and forks through the real service (docs/state.md): owned, listed, kept
across a restart, refused while in use, never half-listed after a kill mid-copy; forks that share
a prepared state and nothing else."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable

import grpc
import pytest
from server_helpers import Client, ServerProcess, code_of, free_port

from aviato.server import auth
from aviato.server.registry import Registry
from aviato.v1 import sandbox_pb2 as pb
from aviato.v1 import sandbox_pb2_grpc as pbg

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="snapshots need a root service")


def rpc_error(call: Callable[..., object], *args: object, **kw: object) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        call(*args, **kw)
    return err.value


def test_snapshot_survives_a_restart_and_starts_sandboxes(fresh_server: ServerProcess) -> None:
    c = fresh_server.start().client()
    stub = fresh_server.stub()
    src = c.running(resources={"disk": "64Mi"})
    c.sh(src.id, "mkdir -p /workspace/repo && echo prepared > /workspace/repo/state")
    snap = stub.CreateSnapshot(pb.CreateSnapshotRequest(sandbox_id=src.id), timeout=60)
    assert snap.id.startswith("snap-") and snap.image == "host" and snap.source_sandbox_id == src.id
    fresh_server.kill9()
    c = fresh_server.start().client()
    stub = fresh_server.stub()
    listed = stub.ListSnapshots(pb.ListSnapshotsRequest(), timeout=30).snapshots
    assert [s.id for s in listed] == [snap.id]
    for layer in ("memory", "disk"):
        sb = c.running(snapshot_id=snap.id, writable_layer=layer, resources={"disk": "32Mi"})
        assert c.sh(sb.id, "cat /workspace/repo/state").stdout == b"prepared\n"
    # in use: refused in words; an image other than the snapshot's: refused in words
    err = rpc_error(stub.DeleteSnapshot, pb.DeleteSnapshotRequest(snapshot_id=snap.id))
    assert code_of(err) == grpc.StatusCode.FAILED_PRECONDITION and "in use" in err.details()
    err = rpc_error(c.create, snapshot_id=snap.id, image="busybox:1")
    assert code_of(err) == grpc.StatusCode.FAILED_PRECONDITION and "image" in err.details()
    err = rpc_error(c.create, snapshot_id="snap-0123456789abcdef")
    assert code_of(err) == grpc.StatusCode.NOT_FOUND
    for sb in c.list_all(include_terminated=False):
        if sb.id != src.id:
            c.delete(sb.id)
    stub.DeleteSnapshot(pb.DeleteSnapshotRequest(snapshot_id=snap.id), timeout=30)
    assert not stub.ListSnapshots(pb.ListSnapshotsRequest(), timeout=30).snapshots
    assert not (fresh_server.state_dir / "snapshots" / snap.id).exists()


def test_eight_forks_see_the_state_and_not_each_other(fresh_server: ServerProcess) -> None:
    c = fresh_server.start().client()
    stub = fresh_server.stub()
    src = c.running(resources={"disk": "64Mi"})
    c.sh(src.id, "echo prepared > /workspace/shared; echo keep > /workspace/gone")
    forks = stub.ForkSandbox(pb.ForkSandboxRequest(sandbox_id=src.id, count=8), timeout=120)
    ids = [f.id for f in forks.sandboxes]
    assert len(set(ids)) == 8
    for i, sid in enumerate(ids):
        assert c.get(sid).status == pb.SANDBOX_STATUS_RUNNING
        c.sh(
            sid, f"echo fork{i} > /workspace/shared; rm /workspace/gone; echo {i} > /workspace/own"
        )
    for i, sid in enumerate(ids):
        assert (
            c.sh(sid, "cat /workspace/shared; ls /workspace").stdout
            == f"fork{i}\nown\nshared\n".encode()
        )
    assert c.sh(src.id, "cat /workspace/shared /workspace/gone").stdout == b"prepared\nkeep\n"
    # the fork's snapshot is not listed, and goes with the last fork
    assert not stub.ListSnapshots(pb.ListSnapshotsRequest(), timeout=30).snapshots
    trees = fresh_server.state_dir / "snapshots"
    assert len([p for p in trees.iterdir() if p.name.startswith("snap-")]) == 1
    for sid in ids:
        c.delete(sid)
    fresh_server.stop()
    fresh_server.start()  # collects at start
    stub = fresh_server.stub()
    assert not [p for p in trees.iterdir() if p.name.startswith("snap-")]
    err = rpc_error(stub.ForkSandbox, pb.ForkSandboxRequest(sandbox_id=src.id, count=65))
    assert code_of(err) == grpc.StatusCode.INVALID_ARGUMENT and "64" in err.details()


def test_forks_count_against_quotas_all_or_none(fresh_server: ServerProcess) -> None:
    fresh_server.args += ["--owner-max-sandboxes", "4"]
    c = fresh_server.start().client()
    stub = fresh_server.stub()
    src = c.running()
    err = rpc_error(stub.ForkSandbox, pb.ForkSandboxRequest(sandbox_id=src.id, count=4))
    assert code_of(err) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert [s.id for s in c.list_all(include_terminated=False)] == [src.id]


def test_another_owners_snapshot_is_not_found(fresh_server: ServerProcess) -> None:
    port = free_port()
    fresh_server.state_dir.mkdir(parents=True)
    reg = Registry(fresh_server.state_dir / "registry.db")
    _, alice_key = auth.create_key(reg, "alice", "a")
    _, bob_key = auth.create_key(reg, "bob", "b")
    reg.close()
    fresh_server.args += ["--listen", f"127.0.0.1:{port}"]
    fresh_server.start()
    stub = pbg.SandboxServiceStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
    alice_md = [("authorization", f"Bearer {alice_key}")]
    bob_md = [("authorization", f"Bearer {bob_key}")]
    alice, bob = Client(stub, alice_md), Client(stub, bob_md)
    src = alice.running()
    snap = stub.CreateSnapshot(pb.CreateSnapshotRequest(sandbox_id=src.id), metadata=alice_md)
    assert not stub.ListSnapshots(pb.ListSnapshotsRequest(), metadata=bob_md).snapshots
    err = rpc_error(bob.create, snapshot_id=snap.id)
    assert code_of(err) == grpc.StatusCode.NOT_FOUND
    for call, req in (
        (stub.DeleteSnapshot, pb.DeleteSnapshotRequest(snapshot_id=snap.id)),
        (stub.CreateSnapshot, pb.CreateSnapshotRequest(sandbox_id=src.id)),
        (stub.ForkSandbox, pb.ForkSandboxRequest(sandbox_id=src.id, count=1)),
    ):
        with pytest.raises(grpc.RpcError) as err_info:
            call(req, metadata=bob_md)
        assert code_of(err_info.value) == grpc.StatusCode.NOT_FOUND


def test_service_killed_mid_snapshot_lists_no_half_snapshot(fresh_server: ServerProcess) -> None:
    c = fresh_server.start().client()
    stub = fresh_server.stub()
    src = c.running(resources={"disk": "512Mi", "memory": "1Gi"})
    c.sh(src.id, "for i in $(seq 1 300); do head -c 1M /dev/urandom > /workspace/f$i; done")
    future = stub.CreateSnapshot.future(pb.CreateSnapshotRequest(sandbox_id=src.id), timeout=60)
    partial = fresh_server.state_dir / "snapshots"
    deadline = time.monotonic() + 20
    while not any(p.name.startswith(".partial-") for p in partial.iterdir()):
        assert time.monotonic() < deadline, "the copy did not start"
        time.sleep(0.005)
    assert fresh_server.proc is not None
    os.kill(fresh_server.proc.pid, signal.SIGKILL)
    fresh_server.proc.wait()
    with pytest.raises(grpc.RpcError):
        future.result()
    c = fresh_server.start().client()
    assert not fresh_server.stub().ListSnapshots(pb.ListSnapshotsRequest()).snapshots
    assert [p.name for p in partial.iterdir()] == []
    # the service froze the sandbox and died: the next one thawed it when it re-attached
    assert c.sh(src.id, "echo alive").stdout == b"alive\n"
