"""Secrets (docs/secrets.md): visible in the sandbox that names them and nowhere else.

Against a real service over TCP with two owners' API keys and real sandboxes:

- a secret reaches the main process and every command of a sandbox that names it, and nothing
  of the host holds its value in clear: not a byte of the state directory (registry and its
  WAL, logs, sandbox directories, runtime records), not the service's log, not any host
  process's command line (/proc/*/cmdline: bwrap reads the whole environment, plain variables
  too, on a descriptor), not an answer;
- another owner cannot use it, list it or delete it, and has a secret of the same name of
  their own;
- deleting a secret that a live sandbox uses leaves that sandbox its value and refuses new
  sandboxes; the key survives a restart of the service.
"""

from __future__ import annotations

import os
import pwd
import secrets
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from reliability.harness import (
    Client,
    Service,
    code_of,
    details_of,
    free_port,
    interpreter_for,
)

from aviato.server import auth
from aviato.server.registry import Registry
from aviato.v1 import sandbox_pb2 as pb
from aviato.v1 import sandbox_pb2_grpc as pbg

pytestmark = pytest.mark.slow

NAME = "API_TOKEN"


class Owners:
    def __init__(self, svc: Service, port: int, keys: dict[str, str]) -> None:
        self.svc = svc
        self.port = port
        self.keys = keys
        self.connect()

    def connect(self) -> None:
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.port}")
        self.stub = pbg.SandboxServiceStub(self.channel)

    def md(self, who: str) -> list[tuple[str, str]]:
        return [("authorization", f"Bearer {self.keys[who]}")]

    def client(self, who: str) -> Client:
        return Client(self.stub, self.md(who), self.svc.record)

    def create_secret(self, who: str, name: str, value: str, replace: bool = False) -> None:
        self.stub.CreateSecret(
            pb.CreateSecretRequest(name=name, value=value, replace=replace),
            metadata=self.md(who),
            timeout=10,
        )


@pytest.fixture(params=["root", "rootless"])
def owners(request: pytest.FixtureRequest) -> Iterator[Owners]:
    """A service over TCP with keys of alice and bob: as root, and as an unprivileged user
    (nobody) whose sandboxes get a user namespace from bwrap itself."""
    user = None
    if request.param == "rootless":
        if os.geteuid() != 0:
            pytest.skip("the rootless service runs as nobody: the tests must run as root")
        try:
            interpreter_for("nobody")
        except LookupError as e:
            pytest.skip(f"rootless mode: {e}")
        user = "nobody"
    port = free_port()
    svc = Service("--listen", f"127.0.0.1:{port}", user=user)
    svc.state_dir.mkdir(mode=0o700)
    reg = Registry(svc.state_dir / "registry.db")
    keys = {name: auth.create_key(reg, name, "secrets")[1] for name in ("alice", "bob")}
    reg.close()
    if user is not None:
        pw = pwd.getpwnam(user)
        for path in (svc.state_dir, *svc.state_dir.iterdir()):
            os.chown(path, pw.pw_uid, pw.pw_gid)
    try:
        svc.start()
        world = Owners(svc, port, keys)
        yield world
        world.channel.close()
    finally:
        svc.finish()


def _files_holding(root: Path, needle: bytes) -> list[str]:
    """Every regular file under `root` (symlinks not followed) whose bytes contain `needle`."""
    found = []
    for directory, _, names in os.walk(root):
        for name in names:
            path = Path(directory) / name
            try:
                if path.is_symlink() or not path.is_file():
                    continue
                if needle in path.read_bytes():
                    found.append(str(path))
            except OSError:
                continue
    return found


def _cmdlines_holding(needle: bytes) -> list[str]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if needle in (entry / "cmdline").read_bytes():
                    found.append(entry.name)
            except OSError:
                continue
    return found


def test_a_secret_is_in_the_sandbox_and_nowhere_else(owners: Owners) -> None:
    value = "canary-" + secrets.token_hex(16)
    owners.create_secret("alice", NAME, value)
    alice = owners.client("alice")
    sb = alice.running(
        command=["/bin/sh", "-c", f'[ -n "${NAME}" ] && echo main-has-it; exec sleep 600'],
        secrets=[NAME],
    )
    seen = alice.exec(sb.id, ["/usr/bin/printenv", NAME])
    assert seen.stdout.decode().strip() == value
    # The main process had it from its start (its log says so, without the value).
    assert b"main-has-it" in b"".join(e.data for e in alice.logs(sb.id))

    needle = value.encode()
    # Answers: the record names the secret, never its value; the list names it.
    record = alice.get(sb.id)
    assert list(record.spec.secrets) == [NAME] and needle not in record.SerializeToString()
    listed = owners.stub.ListSecrets(pb.ListSecretsRequest(), metadata=owners.md("alice"))
    assert [s.name for s in listed.secrets] == [NAME]
    assert needle not in listed.SerializeToString()
    # The host: no file of the state directory, no line of the service's log, no command line.
    assert _files_holding(owners.svc.state_dir, needle) == []
    assert value not in owners.svc.log_text()
    assert _cmdlines_holding(needle) == []
    # The key is apart from the registry, private, and the registry alone reveals nothing.
    key = owners.svc.state_dir / "secrets.key"
    assert key.stat().st_mode & 0o777 == 0o600 and key.stat().st_size == 32

    # After a restart of the service the secret is still usable (the key persisted).
    alice.delete(sb.id)
    owners.channel.close()
    owners.svc.stop()
    owners.svc.start()
    owners.connect()
    alice = owners.client("alice")
    again = alice.running(secrets=[NAME])
    assert alice.exec(again.id, ["/usr/bin/printenv", NAME]).stdout.decode().strip() == value
    assert _files_holding(owners.svc.state_dir, needle) == []
    assert value not in owners.svc.log_text()
    alice.delete(again.id)


def test_plain_variables_are_not_on_a_host_command_line_either(owners: Owners) -> None:
    """Users put tokens in plain variables too: the whole environment reaches bwrap on a
    descriptor, so no host process's /proc/PID/cmdline shows a value while the sandbox runs."""
    value = "plain-" + secrets.token_hex(16)
    alice = owners.client("alice")
    sb = alice.running(env={"PLAIN_TOKEN": value})
    seen = alice.exec(sb.id, ["/usr/bin/printenv", "PLAIN_TOKEN"])
    assert seen.stdout.decode().strip() == value
    assert _cmdlines_holding(value.encode()) == []
    alice.delete(sb.id)


def test_another_owner_cannot_use_list_or_delete_it(owners: Owners) -> None:
    alice_value, bob_value = "alice-" + secrets.token_hex(8), "bob-" + secrets.token_hex(8)
    owners.create_secret("alice", NAME, alice_value)
    bob = owners.client("bob")
    with pytest.raises(grpc.RpcError) as err:
        bob.create(secrets=[NAME])
    assert code_of(err.value) == grpc.StatusCode.INVALID_ARGUMENT
    assert f"you have no secret named {NAME}" in details_of(err.value)
    assert alice_value not in details_of(err.value)
    empty = owners.stub.ListSecrets(pb.ListSecretsRequest(), metadata=owners.md("bob"))
    assert list(empty.secrets) == []
    with pytest.raises(grpc.RpcError) as err:
        owners.stub.DeleteSecret(pb.DeleteSecretRequest(name=NAME), metadata=owners.md("bob"))
    assert code_of(err.value) == grpc.StatusCode.NOT_FOUND
    # Bob's secret of the same name is his own; each sandbox gets its owner's value.
    owners.create_secret("bob", NAME, bob_value)
    alice = owners.client("alice")
    a, b = alice.running(secrets=[NAME]), bob.running(secrets=[NAME])
    assert alice.exec(a.id, ["/usr/bin/printenv", NAME]).stdout.decode().strip() == alice_value
    assert bob.exec(b.id, ["/usr/bin/printenv", NAME]).stdout.decode().strip() == bob_value
    # A row of the registry moved to another owner does not open (the owner is sealed in).
    db = sqlite3.connect(owners.svc.state_dir / "registry.db", timeout=10)
    with db:
        db.execute(
            "UPDATE secrets SET sealed=(SELECT sealed FROM secrets WHERE owner='alice') "
            "WHERE owner='bob'"
        )
    db.close()
    with pytest.raises(grpc.RpcError) as err:
        bob.create(secrets=[NAME])
    assert code_of(err.value) == grpc.StatusCode.FAILED_PRECONDITION
    assert "cannot be read" in details_of(err.value) and alice_value not in details_of(err.value)
    alice.delete(a.id)
    bob.delete(b.id)


def test_deleting_a_secret_in_use_keeps_the_running_sandbox_and_refuses_new_ones(
    owners: Owners,
) -> None:
    value = "del-" + secrets.token_hex(8)
    owners.create_secret("alice", NAME, value)
    alice = owners.client("alice")
    sb = alice.running(secrets=[NAME])
    owners.stub.DeleteSecret(pb.DeleteSecretRequest(name=NAME), metadata=owners.md("alice"))
    assert alice.exec(sb.id, ["/usr/bin/printenv", NAME]).stdout.decode().strip() == value
    with pytest.raises(grpc.RpcError) as err:
        alice.create(secrets=[NAME])
    assert code_of(err.value) == grpc.StatusCode.INVALID_ARGUMENT
    # Replacing: a new value for new sandboxes; an existing name without replace is refused.
    owners.create_secret("alice", NAME, "first")
    with pytest.raises(grpc.RpcError) as err:
        owners.create_secret("alice", NAME, "second")
    assert code_of(err.value) == grpc.StatusCode.ALREADY_EXISTS
    owners.create_secret("alice", NAME, "second", replace=True)
    fresh = alice.running(secrets=[NAME])
    assert alice.exec(fresh.id, ["/usr/bin/printenv", NAME]).stdout.decode().strip() == "second"
    assert alice.exec(sb.id, ["/usr/bin/printenv", NAME]).stdout.decode().strip() == value
    for s in (sb, fresh):
        alice.delete(s.id)
