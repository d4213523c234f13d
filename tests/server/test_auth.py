"""API keys over TCP: owners are isolated; missing, wrong and revoked keys are refused."""

from __future__ import annotations

import grpc
import pytest
from _system_tools import require_tools
from server_helpers import Client, ServerProcess, code_of, free_port

from aviato.server import auth
from aviato.server.registry import Registry
from aviato.v1 import sandbox_pb2 as pb
from aviato.v1 import sandbox_pb2_grpc as pbg


def test_tcp_keys_and_owners(fresh_server: ServerProcess) -> None:
    port = free_port()
    fresh_server.state_dir.mkdir(parents=True)
    reg = Registry(fresh_server.state_dir / "registry.db")
    alice_info, alice_key = auth.create_key(reg, "alice", "a")
    _, bob_key = auth.create_key(reg, "bob", "b")
    fresh_server.args += ["--listen", f"127.0.0.1:{port}"]
    fresh_server.start()

    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    stub = pbg.SandboxServiceStub(channel)
    alice = Client(stub, [("authorization", f"Bearer {alice_key}")])
    bob = Client(stub, [("authorization", f"Bearer {bob_key}")])
    local = fresh_server.client()

    sb = alice.running(tags=["mine"])
    assert alice.exec(sb.id, ["/bin/echo", "a"]).stdout == b"a\n"
    # Another owner sees nothing of it: NOT_FOUND everywhere, never PERMISSION_DENIED.
    calls = [
        lambda: bob.get(sb.id),
        lambda: bob.stop(sb.id),
        lambda: bob.delete(sb.id),
        lambda: bob.read_file(sb.id, "/etc/hostname"),
        lambda: bob.stub.StatPath(pb.PathRequest(sandbox_id=sb.id, path="/tmp"), metadata=bob.md),
        lambda: bob.stub.ListDir(pb.ListDirRequest(sandbox_id=sb.id, path="/"), metadata=bob.md),
        lambda: bob.stub.RemovePath(
            pb.RemovePathRequest(sandbox_id=sb.id, path="/tmp", recursive=True), metadata=bob.md
        ),
        lambda: list(
            bob.stub.DownloadTree(pb.ReadFileRequest(sandbox_id=sb.id, path="/"), metadata=bob.md)
        ),
        lambda: local.get(sb.id),
    ]
    for call in calls:
        with pytest.raises(grpc.RpcError) as err:
            call()
        assert code_of(err.value) == grpc.StatusCode.NOT_FOUND
    assert bob.exec(sb.id, ["/bin/true"]).error.code == 5
    assert bob.list(include_terminated=True).sandboxes == []
    assert local.list(include_terminated=True).sandboxes == []
    assert [s.id for s in alice.list().sandboxes] == [sb.id]
    # Same request id for two owners: two sandboxes.
    a2 = alice.create(request_id="shared-id")
    b2 = bob.create(request_id="shared-id")
    assert a2.id != b2.id

    # No key, a wrong key, a malformed header: UNAUTHENTICATED.
    for md in ([], [("authorization", "Bearer avt_wrong")], [("authorization", alice_key)]):
        with pytest.raises(grpc.RpcError) as err:
            stub.ListSandboxes(pb.ListSandboxesRequest(), metadata=md)
        assert code_of(err.value) == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as err:
        list(stub.Exec(iter([pb.ExecRequest(init=pb.ExecInit(sandbox_id=sb.id, argv=["true"]))])))
    assert code_of(err.value) == grpc.StatusCode.UNAUTHENTICATED

    # A key presented on the unix socket selects its owner there too.
    via_socket = Client(fresh_server.stub(), [("authorization", f"Bearer {alice_key}")])
    assert via_socket.get(sb.id).id == sb.id

    # Revocation (here on the registry file) takes effect on the next call.
    assert auth.revoke_key(reg, alice_info.id)
    with pytest.raises(grpc.RpcError) as err:
        alice.get(sb.id)
    assert code_of(err.value) == grpc.StatusCode.UNAUTHENTICATED
    assert "revoked" in err.value.details()  # type: ignore[attr-defined]
    reg.close()
    channel.close()
    # Clean up as the owners' sandboxes (alice's key is revoked: use a new alice key).
    reg = Registry(fresh_server.state_dir / "registry.db")
    _, alice_key2 = auth.create_key(reg, "alice")
    reg.close()
    alice2 = Client(fresh_server.stub(), [("authorization", f"Bearer {alice_key2}")])
    for s in (sb, a2):
        alice2.delete(s.id)
    bob2 = Client(fresh_server.stub(), [("authorization", f"Bearer {bob_key}")])
    bob2.delete(b2.id)


@pytest.mark.slow
def test_tls(fresh_server: ServerProcess, tmp_path) -> None:  # type: ignore[no-untyped-def]
    import subprocess

    require_tools("openssl")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
         "-out", str(cert), "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        check=True, capture_output=True,
    )  # fmt: skip
    port = free_port()
    fresh_server.state_dir.mkdir(parents=True)
    reg = Registry(fresh_server.state_dir / "registry.db")
    _, key_text = auth.create_key(reg, "tls-user")
    reg.close()
    fresh_server.args += ["--listen", f"127.0.0.1:{port}", "--tls-cert", str(cert),
                          "--tls-key", str(key)]  # fmt: skip
    fresh_server.start()
    creds = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
    with grpc.secure_channel(f"localhost:{port}", creds) as channel:
        client = Client(pbg.SandboxServiceStub(channel), [("authorization", f"Bearer {key_text}")])
        assert client.list().sandboxes == []
    with grpc.insecure_channel(f"127.0.0.1:{port}") as plain, pytest.raises(grpc.RpcError):
        pbg.SandboxServiceStub(plain).ListSandboxes(
            pb.ListSandboxesRequest(), metadata=[("authorization", f"Bearer {key_text}")],
            timeout=3)  # fmt: skip
