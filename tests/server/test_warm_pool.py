"""The warm pool (`aviato server --warm-pool N`) against a real service and real sandboxes: a
claimed sandbox looks like a fresh one, is handed out once, keeps nothing of anybody; a spec
that is not the pool's shape is created fresh; the claimed sandbox's deadline holds; a restart
leaves no member behind; the pool refills (docs/state.md, "The warm pool")."""

from __future__ import annotations

import os
import sqlite3
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
from server_helpers import (
    Client,
    ServerProcess,
    code_of,
    sandbox_cgroups,
    sandbox_processes,
)

from aviato.server import auth
from aviato.server.registry import Registry
from aviato.v1 import sandbox_pb2 as pb

S = pb.SandboxStatus
RUNNING = S.SANDBOX_STATUS_RUNNING
# What the tests read inside a sandbox: everything a fresh and a claimed one must share.
PROBE = """
hostname; id; echo "cwd $(pwd)"; env | sort
ps -e -o pid=,user=,comm= | grep -v -e ' ps$' -e ' sh$' -e ' sort$' -e ' grep$'
grep -E '^(Uid|Gid|Groups|NoNewPrivs|Seccomp|CapInh|CapPrm|CapEff|CapBnd|CapAmb):' /proc/1/status
ulimit -a; df -k / /tmp /dev/shm | tr -s ' ' | cut -d' ' -f2,6
ls -la /tmp /workspace /dev/shm | grep -v -e ' \\.$' -e ' \\.\\.$' -e '^total'
cat /proc/self/cgroup; cat /proc/sys/kernel/hostname
"""


def info(server: ServerProcess) -> pb.ServerInfo:
    return server.stub().GetServerInfo(pb.GetServerInfoRequest(), timeout=10)  # type: ignore[no-any-return]


def wait_pool_ready(server: ServerProcess, size: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if info(server).warm_pool.startswith(f"{size} of {size} ready"):
            return
        time.sleep(0.05)
    raise AssertionError(f"pool not ready: {info(server).warm_pool}\n{server.log_tail()}")


def state_ids(server: ServerProcess) -> set[str]:
    directory = server.state_dir / "sandboxes"
    return set(os.listdir(directory)) if directory.is_dir() else set()


def recorded_ids(server: ServerProcess) -> set[str]:
    with sqlite3.connect(server.state_dir / "registry.db") as db:
        return {r[0] for r in db.execute("SELECT id FROM sandboxes")}


def members(server: ServerProcess) -> set[str]:
    """The pool's members now: sandboxes on the node that have no record."""
    return state_ids(server) - recorded_ids(server)


def host_limits(server: ServerProcess, sandbox_id: str) -> dict[str, str]:
    """The sandbox's cgroup limits as the host has them."""
    out: dict[str, str] = {}
    for path in sandbox_cgroups({sandbox_id}, server.cgroup_parent):
        for name in ("memory.limit_in_bytes", "memory.max", "pids.max", "cpu.cfs_quota_us"):
            if (path / name).exists():
                out[f"{path.parent.parent.name}/{name}"] = (path / name).read_text().strip()
    return out


def probe(client: Client, sandbox_id: str) -> str:
    result = client.sh(sandbox_id, PROBE)
    assert result.exit_code == 0, result.stderr
    return str(result.stdout.decode())


def created_and_claimed(
    server: ServerProcess, client: Client, **spec: Any
) -> tuple[pb.Sandbox, bool]:
    """Creates a sandbox; whether a pool member served it (its id was one before the create)."""
    before = members(server)
    t0 = time.time()
    sb = client.create(**spec)
    assert sb.created_at.ToNanoseconds() >= int(t0 * 1e9) - 10**6, "created before the call"
    return client.wait(sb.id), sb.id in before


def keyed(server: ServerProcess, *owners: str) -> list[Client]:
    reg = Registry(server.state_dir / "registry.db")
    try:
        keys = [auth.create_key(reg, owner, owner)[1] for owner in owners]
    finally:
        reg.close()
    return [Client(server.stub(), [("authorization", f"Bearer {key}")]) for key in keys]


def test_a_claimed_sandbox_looks_like_a_fresh_one(fresh_server: ServerProcess) -> None:
    server = fresh_server
    server.args += ["--warm-pool", "1"]
    server.start()
    wait_pool_ready(server, 1)
    client = server.client()
    # Members are nobody's: not listed, not running for anybody, in no quota.
    assert len(members(server)) == 1
    assert client.list_all(include_terminated=True) == []
    assert info(server).sandboxes_running == 0
    found: dict[bool, pb.Sandbox] = {}
    for _ in range(6):  # the first create is claimed; the next, right after, finds it empty
        made, from_pool = created_and_claimed(server, client)
        found.setdefault(from_pool, made)
        if len(found) == 2:
            break
    assert set(found) == {True, False}, found
    claimed, fresh = found[True], found[False]
    for sb in (claimed, fresh):
        assert sb.status == RUNNING
        assert sb.started_at.ToNanoseconds() >= sb.created_at.ToNanoseconds()
        assert sb.id.startswith("sbx-") and len(sb.id) == len("sbx-") + 12
    assert claimed.spec == fresh.spec
    assert claimed.expires_at.ToNanoseconds() - claimed.created_at.ToNanoseconds() == (
        fresh.expires_at.ToNanoseconds() - fresh.created_at.ToNanoseconds()
    )
    assert host_limits(server, claimed.id) == host_limits(server, fresh.id) != {}
    assert probe(client, claimed.id) == probe(client, fresh.id)
    assert sorted(s.id for s in client.list_all()) == sorted([claimed.id, fresh.id])
    for sb in (claimed, fresh):
        client.delete(sb.id)


def test_a_user_cannot_reach_a_later_claim(fresh_server: ServerProcess) -> None:
    """Alice plants files and background processes in her claimed sandbox and keeps it
    running; bob's and carol's claims get other, untouched members; no member is handed out
    twice."""
    server = fresh_server
    server.args += ["--warm-pool", "2"]
    server.state_dir.mkdir(parents=True)
    alice, bob, carol = keyed(server, "alice", "bob", "carol")
    server.start()
    wait_pool_ready(server, 2)
    a, a_claimed = created_and_claimed(server, alice)
    assert a_claimed
    planted = alice.sh(
        a.id,
        "for d in /tmp /workspace /dev/shm /var/tmp; do echo alice > $d/planted 2>/dev/null; "
        "done; (setsid sleep 1000 >/dev/null 2>&1 &); (nohup sh -c 'while :; do "
        "echo alice > /tmp/planted-late; sleep 0.1; done' >/dev/null 2>&1 &); echo ok",
    )
    assert planted.stdout == b"ok\n"
    seen = {a.id}
    for user in (bob, carol):
        wait_pool_ready(server, 2)
        sb, claimed = created_and_claimed(server, user)
        assert claimed and sb.id not in seen
        seen.add(sb.id)
        out = user.sh(
            sb.id,
            "ls /tmp /workspace /dev/shm /var/tmp 2>/dev/null | grep planted; "
            "ps -e -o args= | grep -c -e '[s]leep 1000' -e '[p]lanted-late'; env | grep -c alice",
        )
        assert out.stdout == b"0\n0\n", out.stdout  # no file, no process, nothing of alice
        # Alice cannot name it: another owner's sandbox is not found.
        assert alice.exec(sb.id, ["/bin/true"]).error.code == 5
    # Alice ends hers; the ids handed out so far never come back.
    alice.delete(a.id)
    wait_pool_ready(server, 2)
    assert not members(server) & seen
    for user in (bob, carol):
        for sb in user.list_all():
            user.delete(sb.id)


def test_a_spec_that_is_not_the_shape_gets_a_fresh_sandbox(fresh_server: ServerProcess) -> None:
    server = fresh_server
    server.args += ["--warm-pool", "1"]
    server.start()
    wait_pool_ready(server, 1)
    client = server.client()
    waiting = members(server)
    others: list[dict[str, Any]] = [
        {"env": {"A": "1"}},
        {"resources": {"memory": "256Mi"}},
        {"working_dir": "/tmp"},
        {"command": ["sleep", "600"]},
        {"mounted": [("/workspace/planted", b"x")]},
        {"egress_mode": "internet"},
    ]
    for spec in others:
        sb, claimed = created_and_claimed(server, client, **spec)
        assert not claimed and sb.status == RUNNING, spec
        assert members(server) == waiting, spec  # the member still waits, untouched
        client.delete(sb.id)
    # Tags, a lifetime and an idle timeout are the claim's identity, not the shape.
    sb, claimed = created_and_claimed(
        server, client, tags=["t"], max_lifetime_seconds=600, idle_timeout_seconds=300
    )
    assert claimed and list(sb.spec.tags) == ["t"]
    assert sb.expires_at.ToNanoseconds() - sb.created_at.ToNanoseconds() == 600 * 10**9
    client.delete(sb.id)


def test_the_claims_deadline_holds_and_a_restart_leaves_no_member(
    fresh_server: ServerProcess,
) -> None:
    """A claimed sandbox ends at its own lifetime while the service is down (its supervisor has
    the claim's deadline, not the member's); the killed service's members are killed by the
    next one, which fills its own pool; a graceful stop removes the members."""
    server = fresh_server
    server.args += ["--warm-pool", "2"]
    server.start()
    wait_pool_ready(server, 2)
    client = server.client()
    sb, claimed = created_and_claimed(server, client, max_lifetime_seconds=3)
    assert claimed
    wait_pool_ready(server, 2)
    old = members(server)
    assert len(old) == 2 and sb.id not in old
    server.kill9()
    time.sleep(5)
    assert not sandbox_processes({sb.id}), "the claimed sandbox outlived its lifetime"
    assert sandbox_processes(old), "members end with their own deadline, not at once"
    server.start()
    wait_pool_ready(server, 2)
    assert not sandbox_processes(old) and not sandbox_cgroups(old, server.cgroup_parent)
    assert not state_ids(server) & old
    ended = server.client().get(sb.id)
    assert ended.status == S.SANDBOX_STATUS_TERMINATED, ended
    assert ended.status_reason == "max lifetime exceeded"
    new = members(server)
    assert len(new) == 2 and not new & old
    server.stop()
    assert not sandbox_processes(new) and not sandbox_cgroups(new, server.cgroup_parent)
    assert not state_ids(server) & new
    assert not [p for p in Path(server.state_dir / "sandboxes").iterdir()]


def test_members_never_take_a_users_place(fresh_server: ServerProcess) -> None:
    """With `--max-sandboxes 2 --warm-pool 2` two users' sandboxes of another shape still fit
    beside the two members: the members count toward no bound of the users'."""
    server = fresh_server
    server.args += ["--max-sandboxes", "2", "--warm-pool", "2"]
    server.start()
    wait_pool_ready(server, 2)
    client = server.client()
    made = [created_and_claimed(server, client, env={"N": str(i)}) for i in range(2)]
    assert [(sb.status, claimed) for sb, claimed in made] == [(RUNNING, False)] * 2
    with pytest.raises(grpc.RpcError) as err:
        client.create(env={"N": "3"})
    assert code_of(err.value) == grpc.StatusCode.RESOURCE_EXHAUSTED
    client.delete(made[0][0].id)
    sb, claimed = created_and_claimed(server, client)
    assert claimed and sb.status == RUNNING
    for each in (made[1][0], sb):
        client.delete(each.id)


def test_a_retried_create_answers_its_record_and_no_other(fresh_server: ServerProcess) -> None:
    """The registry is asked for an earlier create of a request id only when a create cannot
    be recorded: a retry of an ended sandbox's create (the pool full, a member claimed for it
    and then let go) and one refused for capacity both answer the earlier record, never a
    second sandbox or the refusal."""
    server = fresh_server
    server.args += ["--warm-pool", "1", "--max-sandboxes", "1"]
    server.start()
    wait_pool_ready(server, 1)
    client = server.client()
    rid = "retried-create"
    first, claimed = created_and_claimed(server, client, request_id=rid)
    assert claimed
    ended = client.stop(first.id)
    wait_pool_ready(server, 1)
    again = client.create(request_id=rid)
    assert (again.id, again.status) == (first.id, ended.status)
    other, _ = created_and_claimed(server, client)  # the service is full now
    with pytest.raises(grpc.RpcError) as full:
        client.create()
    assert code_of(full.value) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert client.create(request_id=rid).id == first.id  # the retry, not the refusal
    assert recorded_ids(server) == {first.id, other.id}
    client.delete(other.id)
    wait_pool_ready(server, 1)  # and the pool fills again
