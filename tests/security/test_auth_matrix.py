"""Authentication and owner isolation, for every RPC, over TCP with API keys.

- No key, a wrong key, a malformed authorization header and a revoked key get UNAUTHENTICATED
  on each of the 13 RPCs (unary and streaming alike).
- Owner B cannot get, list, wait for, exec into, read from, write to, read the logs of, stop or
  delete owner A's sandbox, nor release A's lease: NOT_FOUND, with exactly the message an id
  that does not exist gets, so ids do not leak. A's sandbox is untouched afterwards.
(tests/server/test_auth.py covers the basics and TLS; this is the full matrix.)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
from reliability.harness import Client, Service, code_of, details_of, free_port

from aviato.server import auth
from aviato.server.registry import Registry
from aviato.v1 import sandbox_pb2 as pb
from aviato.v1 import sandbox_pb2_grpc as pbg


class World:
    def __init__(self, svc: Service, port: int, keys: dict[str, str]) -> None:
        self.svc = svc
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        self.stub = pbg.SandboxServiceStub(self.channel)
        self.keys = keys

    def md(self, who: str) -> list[tuple[str, str]]:
        return [("authorization", f"Bearer {self.keys[who]}")]

    def client(self, who: str) -> Client:
        return Client(self.stub, self.md(who), self.svc.record)


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    port = free_port()
    svc = Service("--listen", f"127.0.0.1:{port}")
    svc.state_dir.mkdir(mode=0o700)
    reg = Registry(svc.state_dir / "registry.db")
    keys = {name: auth.create_key(reg, name, "matrix")[1] for name in ("alice", "bob")}
    carol, keys["carol"] = auth.create_key(reg, "carol", "revoked")
    assert auth.revoke_key(reg, carol.id)
    reg.close()
    try:
        svc.start()
        w = World(svc, port, keys)
        yield w
        w.channel.close()
    finally:
        svc.finish()


def _calls(stub: pbg.SandboxServiceStub, sandbox_id: str) -> dict[str, Callable[[Any], object]]:
    """Each RPC as a function of the call metadata; it consumes streams fully."""
    exec_init = pb.ExecRequest(init=pb.ExecInit(sandbox_id=sandbox_id, argv=["/bin/true"]))
    header = pb.WriteFileRequest(header=pb.WriteFileHeader(sandbox_id=sandbox_id, path="/w/x"))
    return {
        "CreateSandbox": lambda md: stub.CreateSandbox(
            pb.CreateSandboxRequest(request_id="auth-x"), metadata=md, timeout=10
        ),
        "GetSandbox": lambda md: stub.GetSandbox(
            pb.GetSandboxRequest(sandbox_id=sandbox_id), metadata=md, timeout=10
        ),
        "ListSandboxes": lambda md: stub.ListSandboxes(
            pb.ListSandboxesRequest(), metadata=md, timeout=10
        ),
        "WaitSandbox": lambda md: stub.WaitSandbox(
            pb.WaitSandboxRequest(
                sandbox_id=sandbox_id,
                condition=pb.WaitSandboxRequest.CONDITION_STARTED,
                timeout_seconds=1,
            ),
            metadata=md,
            timeout=10,
        ),
        "StopSandbox": lambda md: stub.StopSandbox(
            pb.StopSandboxRequest(sandbox_id=sandbox_id), metadata=md, timeout=10
        ),
        "DeleteSandbox": lambda md: stub.DeleteSandbox(
            pb.DeleteSandboxRequest(sandbox_id=sandbox_id), metadata=md, timeout=10
        ),
        "Exec": lambda md: list(stub.Exec(iter([exec_init]), metadata=md, timeout=10)),
        "RunCommand": lambda md: list(stub.RunCommand(exec_init.init, metadata=md, timeout=10)),
        "ReadFile": lambda md: list(
            stub.ReadFile(
                pb.ReadFileRequest(sandbox_id=sandbox_id, path="/etc/hostname"),
                metadata=md,
                timeout=10,
            )
        ),
        "WriteFile": lambda md: stub.WriteFile(
            iter([header, pb.WriteFileRequest(data=b"x"), pb.WriteFileRequest(end=True)]),
            metadata=md,
            timeout=10,
        ),
        "StreamLogs": lambda md: list(
            stub.StreamLogs(pb.StreamLogsRequest(sandbox_id=sandbox_id), metadata=md, timeout=10)
        ),
        "RenewLease": lambda md: stub.RenewLease(
            pb.RenewLeaseRequest(lease_id="auth-lease"), metadata=md, timeout=10
        ),
        "ReleaseLease": lambda md: stub.ReleaseLease(
            pb.ReleaseLeaseRequest(lease_id="auth-lease"), metadata=md, timeout=10
        ),
        "GetServerInfo": lambda md: stub.GetServerInfo(
            pb.GetServerInfoRequest(), metadata=md, timeout=10
        ),
        "SetNetwork": lambda md: stub.SetNetwork(
            pb.SetNetworkRequest(sandbox_id=sandbox_id, egress_mode="internet"),
            metadata=md,
            timeout=10,
        ),
        "ForwardPort": lambda md: list(
            stub.ForwardPort(
                iter([pb.PortData(sandbox_id=sandbox_id, port=8080)]), metadata=md, timeout=10
            )
        ),
        "PauseSandbox": lambda md: stub.PauseSandbox(
            pb.PauseSandboxRequest(sandbox_id=sandbox_id), metadata=md, timeout=10
        ),
        "ResumeSandbox": lambda md: stub.ResumeSandbox(
            pb.ResumeSandboxRequest(sandbox_id=sandbox_id), metadata=md, timeout=10
        ),
        "ExtendSandbox": lambda md: stub.ExtendSandbox(
            pb.ExtendSandboxRequest(sandbox_id=sandbox_id, seconds=60), metadata=md, timeout=10
        ),
        "ListVolumes": lambda md: stub.ListVolumes(
            pb.ListVolumesRequest(), metadata=md, timeout=10
        ),
        "DeleteVolume": lambda md: stub.DeleteVolume(
            pb.DeleteVolumeRequest(name="cache"), metadata=md, timeout=10
        ),
        "StatPath": lambda md: stub.StatPath(
            pb.PathRequest(sandbox_id=sandbox_id, path="/workspace"), metadata=md, timeout=10
        ),
        "ListDir": lambda md: stub.ListDir(
            pb.ListDirRequest(sandbox_id=sandbox_id, path="/workspace"), metadata=md, timeout=10
        ),
        "RemovePath": lambda md: stub.RemovePath(
            pb.RemovePathRequest(sandbox_id=sandbox_id, path="/workspace/x", recursive=True),
            metadata=md,
            timeout=10,
        ),
        "MakeDir": lambda md: stub.MakeDir(
            pb.MakeDirRequest(sandbox_id=sandbox_id, path="/workspace/d"), metadata=md, timeout=10
        ),
        "RenamePath": lambda md: stub.RenamePath(
            pb.RenamePathRequest(sandbox_id=sandbox_id, source="/workspace", destination="/w2"),
            metadata=md,
            timeout=10,
        ),
        "UploadTree": lambda md: stub.UploadTree(
            iter([header, pb.WriteFileRequest(end=True)]), metadata=md, timeout=10
        ),
        "DownloadTree": lambda md: list(
            stub.DownloadTree(
                pb.ReadFileRequest(sandbox_id=sandbox_id, path="/workspace"),
                metadata=md,
                timeout=10,
            )
        ),
        "CreateSnapshot": lambda md: stub.CreateSnapshot(
            pb.CreateSnapshotRequest(sandbox_id=sandbox_id), metadata=md, timeout=10
        ),
        "ListSnapshots": lambda md: stub.ListSnapshots(
            pb.ListSnapshotsRequest(), metadata=md, timeout=10
        ),
        "DeleteSnapshot": lambda md: stub.DeleteSnapshot(
            pb.DeleteSnapshotRequest(snapshot_id="snap-0000"), metadata=md, timeout=10
        ),
        "ForkSandbox": lambda md: stub.ForkSandbox(
            pb.ForkSandboxRequest(sandbox_id=sandbox_id, count=2), metadata=md, timeout=10
        ),
        "CreateSecret": lambda md: stub.CreateSecret(
            pb.CreateSecretRequest(name="AUTH_X", value="v"), metadata=md, timeout=10
        ),
        "ListSecrets": lambda md: stub.ListSecrets(
            pb.ListSecretsRequest(), metadata=md, timeout=10
        ),
        "DeleteSecret": lambda md: stub.DeleteSecret(
            pb.DeleteSecretRequest(name="AUTH_X"), metadata=md, timeout=10
        ),
        "SandboxUsage": lambda md: stub.SandboxUsage(
            pb.SandboxUsageRequest(sandbox_id=sandbox_id), metadata=md, timeout=10
        ),
        "ListExecs": lambda md: stub.ListExecs(
            pb.ListExecsRequest(sandbox_id=sandbox_id), metadata=md, timeout=10
        ),
        "SignalExec": lambda md: stub.SignalExec(
            pb.SignalExecRequest(sandbox_id=sandbox_id, exec_id="exec-0", signal=9),
            metadata=md,
            timeout=10,
        ),
    }


def test_every_rpc_refuses_missing_wrong_and_revoked_keys(world: World) -> None:
    sandbox = world.client("alice").running(tags=["auth"])
    credentials = {
        "no key": [],
        "wrong key": [("authorization", "Bearer " + auth.generate_key())],
        "not a key": [("authorization", "Bearer hunter2")],
        "malformed header": [("authorization", "Basic YWxpY2U6cGFzcw==")],
        "key without scheme": [("authorization", world.keys["alice"])],
        "revoked key": world.md("carol"),
    }
    calls = _calls(world.stub, sandbox.id)
    assert len(calls) == len(pb.DESCRIPTOR.services_by_name["SandboxService"].methods)
    for label, md in credentials.items():
        for name, call in calls.items():
            with pytest.raises(grpc.RpcError) as err:
                call(md)
            assert code_of(err.value) == grpc.StatusCode.UNAUTHENTICATED, (label, name)
            assert details_of(err.value), (label, name)
        if label == "revoked key":
            assert "revoked" in details_of(err.value)
    # Nothing happened to the sandbox, and no sandbox was created by the refused calls.
    alice = world.client("alice")
    assert alice.get(sandbox.id).status == pb.SANDBOX_STATUS_RUNNING
    assert [s.id for s in alice.list(include_terminated=True).sandboxes] == [sandbox.id]
    alice.delete(sandbox.id)


def test_owner_b_cannot_touch_owner_a(world: World) -> None:
    alice, bob = world.client("alice"), world.client("bob")
    sb = alice.running(
        tags=["private"], lease_id="alice-lease", lease_ttl=600, request_id="alice-req"
    )
    alice.write_file(sb.id, "/workspace/secret", b"alice's data")
    ended = alice.create(command=["/bin/true"])
    alice.wait(ended.id, terminal=True)
    ghost = "sbx-" + "0" * 12  # exists for nobody

    def not_found(fn: Callable[[], object], sandbox_id: str) -> str:
        with pytest.raises(grpc.RpcError) as err:
            fn()
        assert code_of(err.value) == grpc.StatusCode.NOT_FOUND, (sandbox_id, err.value)
        return details_of(err.value)

    for target in (sb.id, ended.id):
        checks: dict[str, Callable[[str], object]] = {
            "get": lambda i: bob.get(i),
            "wait": lambda i: bob.wait(i, timeout=1),
            "read": lambda i: bob.read_file(i, "/workspace/secret"),
            "write": lambda i: bob.write_file(i, "/workspace/secret", b"bob was here"),
            "logs": lambda i: bob.logs(i),
            "network": lambda i: world.stub.SetNetwork(
                pb.SetNetworkRequest(sandbox_id=i, egress_mode="internet"),
                metadata=world.md("bob"),
                timeout=10,
            ),
            "usage": lambda i: world.stub.SandboxUsage(
                pb.SandboxUsageRequest(sandbox_id=i), metadata=world.md("bob"), timeout=10
            ),
            "stop": lambda i: bob.stop(i),
            "delete": lambda i: bob.delete(i),
        }
        for name, check in checks.items():
            mine = not_found(lambda c=check, t=target: c(t), target)  # type: ignore[misc]
            other = not_found(lambda c=check: c(ghost), ghost)  # type: ignore[misc]
            assert mine.replace(target, "ID") == other.replace(ghost, "ID"), (name, mine, other)
        r_mine, r_ghost = (
            bob.exec(target, ["/bin/cat", "/workspace/secret"]),
            bob.exec(ghost, ["/bin/true"]),
        )
        assert r_mine.error.code == 5 and r_ghost.error.code == 5
        assert r_mine.error.message.replace(target, "ID") == r_ghost.error.message.replace(
            ghost, "ID"
        )

    # Listing: bob sees nothing of alice's, whatever the filter.
    for kw in (
        {},
        {"include_terminated": True},
        {"tags": ["private"]},
        {"statuses": [pb.SANDBOX_STATUS_RUNNING, pb.SANDBOX_STATUS_COMPLETED]},
    ):
        assert list(bob.list(**kw).sandboxes) == [], kw  # type: ignore[arg-type]
    everything = world.stub.SandboxUsage(
        pb.SandboxUsageRequest(), metadata=world.md("bob"), timeout=10
    )
    assert list(everything.sandboxes) == []
    # The same request id and lease id for bob are bob's own, not a window into alice's.
    b2 = bob.create(request_id="alice-req")
    assert b2.id != sb.id
    with pytest.raises(grpc.RpcError) as err:
        world.stub.ReleaseLease(
            pb.ReleaseLeaseRequest(lease_id="alice-lease", stop_sandboxes=True),
            metadata=world.md("bob"),
            timeout=10,
        )
    assert code_of(err.value) == grpc.StatusCode.NOT_FOUND
    bob_lease = world.stub.RenewLease(
        pb.RenewLeaseRequest(lease_id="alice-lease"), metadata=world.md("bob"), timeout=10
    )
    assert bob_lease.sandbox_count == 0
    alice_lease = world.stub.RenewLease(
        pb.RenewLeaseRequest(lease_id="alice-lease", ttl_seconds=600),
        metadata=world.md("alice"),
        timeout=10,
    )
    assert alice_lease.sandbox_count == 1
    # The unix socket's owner ("local") is another owner too.
    local = world.svc.client()
    not_found(lambda: local.get(sb.id), sb.id)

    # Alice's sandbox is untouched.
    again = alice.get(sb.id)
    assert again.status == pb.SANDBOX_STATUS_RUNNING
    assert again.spec.egress_mode == "" and not again.spec.egress  # bob opened nothing
    assert alice.read_file(sb.id, "/workspace/secret")[1] == b"alice's data"
    for s in (sb, ended):
        alice.delete(s.id)
    bob.delete(b2.id)
