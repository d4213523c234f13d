"""The Admin API (keys and owners' quotas): served on the unix socket to the service's user,
refused over TCP whatever key a caller presents; what it does takes effect on the next call."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from server_helpers import Client, ServerProcess, code_of, free_port

from aviato.v1 import admin_pb2 as apb
from aviato.v1 import admin_pb2_grpc
from aviato.v1 import sandbox_pb2 as pb
from aviato.v1 import sandbox_pb2_grpc as pbg

from .conftest import finish


class Listening:
    """A service on a unix socket and on loopback TCP."""

    def __init__(self, server: ServerProcess, port: int) -> None:
        self.server = server
        self.tcp = grpc.insecure_channel(f"127.0.0.1:{port}")

    def admin(self) -> admin_pb2_grpc.AdminStub:
        """The Admin API on the unix socket."""
        return admin_pb2_grpc.AdminStub(self.server.channel())

    def tcp_admin(self) -> admin_pb2_grpc.AdminStub:
        return admin_pb2_grpc.AdminStub(self.tcp)

    def tcp_client(self, key: str) -> Client:
        return Client(pbg.SandboxServiceStub(self.tcp), [("authorization", f"Bearer {key}")])


@pytest.fixture(scope="module")
def listening() -> Iterator[Listening]:
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="avt-adm-") as tmp:
        server = ServerProcess(Path(tmp) / "state", "--listen", f"127.0.0.1:{port}").start()
        service = Listening(server, port)
        try:
            yield service
        finally:
            service.tcp.close()
            finish(server)


def _every_call(admin: admin_pb2_grpc.AdminStub) -> list[tuple[str, object]]:
    quota = apb.OwnerQuota(owner="mallory", max_sandboxes=0)
    return [
        ("CreateKey", lambda md: admin.CreateKey(apb.CreateKeyRequest(owner="x"), metadata=md)),
        ("ListKeys", lambda md: admin.ListKeys(apb.ListKeysRequest(), metadata=md)),
        ("RevokeKey", lambda md: admin.RevokeKey(apb.RevokeKeyRequest(key_id="k"), metadata=md)),
        (
            "SetOwnerQuota",
            lambda md: admin.SetOwnerQuota(apb.SetOwnerQuotaRequest(quota=quota), metadata=md),
        ),
        (
            "GetOwnerQuotas",
            lambda md: admin.GetOwnerQuotas(apb.GetOwnerQuotasRequest(), metadata=md),
        ),
    ]


def test_tcp_callers_are_refused_even_with_a_valid_key(listening: Listening) -> None:
    admin = listening.admin()
    keys = [admin.CreateKey(apb.CreateKeyRequest(owner=o)).secret for o in ("tcp-user", "local")]
    assert listening.tcp_client(keys[0]).list().sandboxes == []  # the key itself is good
    for metadata in ([], *([("authorization", f"Bearer {k}")] for k in keys)):
        for name, call in _every_call(listening.tcp_admin()):
            with pytest.raises(grpc.RpcError) as err:
                call(metadata)  # type: ignore[operator]
            assert code_of(err.value) == grpc.StatusCode.PERMISSION_DENIED, name
            assert "unix socket" in err.value.details(), name  # type: ignore[attr-defined]
    # Nothing was done by the refused calls.
    assert "x" not in [k.owner for k in admin.ListKeys(apb.ListKeysRequest()).keys]
    assert admin.GetOwnerQuotas(apb.GetOwnerQuotasRequest()).quotas == []


def test_keys_made_on_the_socket_work_over_tcp_until_revoked(listening: Listening) -> None:
    admin = listening.admin()
    created = admin.CreateKey(apb.CreateKeyRequest(owner="alice", name="laptop"))
    assert created.secret.startswith("avt_") and created.key.id.startswith("key_")
    listed = admin.ListKeys(apb.ListKeysRequest(owner="alice")).keys
    assert [(k.id, k.owner, k.name, k.revoked) for k in listed] == [
        (created.key.id, "alice", "laptop", False)
    ]
    assert created.secret not in str(listed)
    alice = listening.tcp_client(created.secret)
    assert alice.list().sandboxes == []

    admin.RevokeKey(apb.RevokeKeyRequest(key_id=created.key.id))
    with pytest.raises(grpc.RpcError) as err:
        alice.list()
    assert code_of(err.value) == grpc.StatusCode.UNAUTHENTICATED
    assert admin.ListKeys(apb.ListKeysRequest(owner="alice")).keys[0].revoked
    with pytest.raises(grpc.RpcError) as err:
        admin.RevokeKey(apb.RevokeKeyRequest(key_id=created.key.id))
    assert code_of(err.value) == grpc.StatusCode.NOT_FOUND


def test_an_owner_quota_holds_from_the_next_create(listening: Listening) -> None:
    admin = listening.admin()
    bob = listening.tcp_client(admin.CreateKey(apb.CreateKeyRequest(owner="bob")).secret)
    stored = admin.SetOwnerQuota(
        apb.SetOwnerQuotaRequest(quota=apb.OwnerQuota(owner="bob", max_sandboxes=1))
    )
    assert stored.max_sandboxes == 1 and not stored.HasField("max_memory_bytes")
    [row] = admin.GetOwnerQuotas(apb.GetOwnerQuotasRequest(owner="bob")).quotas
    assert (row.owner, row.max_sandboxes, row.HasField("max_cpu_millis")) == ("bob", 1, False)
    first = bob.create()
    with pytest.raises(grpc.RpcError) as err:
        bob.create()
    assert code_of(err.value) == grpc.StatusCode.RESOURCE_EXHAUSTED
    # Every value unset: back to the service's defaults, and the owner has no row of its own.
    admin.SetOwnerQuota(apb.SetOwnerQuotaRequest(quota=apb.OwnerQuota(owner="bob")))
    assert "bob" not in [q.owner for q in admin.GetOwnerQuotas(apb.GetOwnerQuotasRequest()).quotas]
    second = bob.create()
    for sandbox in (first, second):
        bob.delete(sandbox.id)


@pytest.mark.parametrize(
    ("call", "field"),
    [
        (lambda a: a.CreateKey(apb.CreateKeyRequest(owner="")), "owner"),
        (lambda a: a.CreateKey(apb.CreateKeyRequest(owner="a\nb")), "owner"),
        (lambda a: a.CreateKey(apb.CreateKeyRequest(owner="a", name="n" * 300)), "name"),
        (lambda a: a.ListKeys(apb.ListKeysRequest(owner="o" * 129)), "owner"),
        (lambda a: a.RevokeKey(apb.RevokeKeyRequest(key_id="")), "key_id"),
        (lambda a: a.RevokeKey(apb.RevokeKeyRequest(key_id="k" * 10_000)), "key_id"),
        (lambda a: a.SetOwnerQuota(apb.SetOwnerQuotaRequest(
            quota=apb.OwnerQuota(owner="c", max_memory_bytes=-1))), "quota.max_memory_bytes"),
        (lambda a: a.SetOwnerQuota(apb.SetOwnerQuotaRequest()), "quota.owner"),
        (lambda a: a.GetOwnerQuotas(apb.GetOwnerQuotasRequest(owner="")), "owner"),
    ],
)  # fmt: skip
def test_bad_requests_name_the_field(listening: Listening, call: object, field: str) -> None:
    with pytest.raises(grpc.RpcError) as err:
        call(listening.admin())  # type: ignore[operator]
    assert code_of(err.value) == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith(f"{field}: ")  # type: ignore[attr-defined]
    assert len(err.value.details()) < 600  # type: ignore[attr-defined]


def test_the_sandbox_api_is_unchanged_for_the_local_user(listening: Listening) -> None:
    """The Admin API sits beside the sandbox API on the same socket."""
    local = listening.server.client()
    assert local.stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=10).version
