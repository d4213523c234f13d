"""One owner cannot fill the service: per-owner quotas, over TCP with two API keys.

- Owner A at its quota is refused (RESOURCE_EXHAUSTED) with a message that names A's own usage
  and limit only: the very same text whatever other owners hold; owner B still creates; once A
  stops one, A creates again.
- Quotas hold across a restart of the service (re-attached sandboxes are charged again), and
  sandboxes that end, or fail while they are created, give their share back.
- 20 concurrent creates by one owner never exceed its quota.
- An owner's own quota (`aviato keys quota`, a row in the registry) replaces the default from
  the next create on, without a restart; memory and cpu quotas count the limits sandboxes get.
- The global refusal (server --max-sandboxes) tells an ordinary owner that the service is full,
  never how many sandboxes it runs; the service's own user still gets the figures.
"""

from __future__ import annotations

import concurrent.futures as cf
import re
import time
from collections.abc import Iterator

import grpc
import pytest
from reliability.harness import Client, Service, code_of, details_of, free_port

from aviato.server import auth
from aviato.server.registry import OwnerQuotaRecord, Registry
from aviato.v1 import sandbox_pb2 as pb
from aviato.v1 import sandbox_pb2_grpc as pbg

QUOTA = 3
SMALL = {"memory": "32Mi", "cpu": "100m", "disk": "8Mi"}
RUNNING = pb.SandboxStatus.SANDBOX_STATUS_RUNNING


class World:
    def __init__(self, *args: str, owners: tuple[str, ...] = ("alice", "bob")) -> None:
        self.port = free_port()
        self.svc = Service("--listen", f"127.0.0.1:{self.port}", *args)
        self.svc.state_dir.mkdir(mode=0o700)
        reg = Registry(self.svc.state_dir / "registry.db")
        self.keys = {name: auth.create_key(reg, name, "quota")[1] for name in owners}
        reg.close()
        self.channel: grpc.Channel | None = None

    def start(self) -> World:
        self.svc.start()
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.port}")
        return self

    def restart(self) -> None:
        assert self.channel is not None
        self.channel.close()
        assert self.svc.stop() == 0
        self.start()

    def client(self, who: str) -> Client:
        assert self.channel is not None
        stub = pbg.SandboxServiceStub(self.channel)  # type: ignore[no-untyped-call]
        return Client(stub, [("authorization", f"Bearer {self.keys[who]}")], self.svc.record)

    def registry(self) -> Registry:
        return Registry(self.svc.state_dir / "registry.db")

    def finish(self) -> None:
        if self.channel is not None:
            self.channel.close()
        self.svc.finish()


@pytest.fixture
def world() -> Iterator[World]:
    w = World("--owner-max-sandboxes", str(QUOTA))
    try:
        yield w.start()
    finally:
        w.finish()


def refusal(fn: object) -> str:
    with pytest.raises(grpc.RpcError) as err:
        fn()  # type: ignore[operator]
    assert code_of(err.value) == grpc.StatusCode.RESOURCE_EXHAUSTED, err.value
    return details_of(err.value)


@pytest.mark.slow
def test_owner_at_quota_is_refused_with_its_own_usage_only(world: World) -> None:
    alice, bob = world.client("alice"), world.client("bob")
    mine = [alice.running(request_id=f"alice-{i}", resources=SMALL) for i in range(QUOTA)]
    alone = refusal(lambda: alice.create(resources=SMALL))
    assert alone == (
        f"quota reached: you have {QUOTA} live sandboxes and your limit is {QUOTA}; "
        "stop or delete some of yours first"
    )
    # Bob fills his own share: alice's refusal does not change by a character.
    bobs = [bob.running(resources=SMALL) for _ in range(QUOTA)]
    assert refusal(lambda: alice.create(resources=SMALL)) == alone
    assert refusal(lambda: bob.create(resources=SMALL)) == alone
    # What an owner is told about the service is its own count.
    info = alice.stub.GetServerInfo(pb.GetServerInfoRequest(), metadata=alice.md, timeout=10)
    assert info.sandboxes_running == QUOTA
    assert info.sandbox_limits == ""  # the host's budget is the operator's business
    assert info.quota.startswith(f"sandboxes {QUOTA} of {QUOTA}"), info.quota
    # Bob stops one and creates again; alice is still refused.
    bob.stop(bobs.pop().id)
    bobs.append(bob.running(resources=SMALL))
    refusal(lambda: alice.create(resources=SMALL))
    # Alice stops one of hers: she can create again (and then no more).
    alice.stop(mine.pop().id)
    mine.append(alice.running(resources=SMALL))
    refusal(lambda: alice.create(resources=SMALL))
    # A repeated request id is not a new sandbox: it gets the earlier one, even at the quota.
    assert alice.create(request_id="alice-0", resources=SMALL).id == mine[0].id
    for sb in mine:
        alice.delete(sb.id)
    for sb in bobs:
        bob.delete(sb.id)


@pytest.mark.slow
def test_quota_holds_across_a_restart_and_ended_sandboxes_give_back(world: World) -> None:
    alice = world.client("alice")
    # Sandboxes that end by themselves, and one that fails while it is created, hold nothing.
    for argv in (["/bin/true"], ["/bin/false"], ["/no/such/program"]):
        for _ in range(QUOTA):
            ended = alice.create(command=argv, resources=SMALL)
            assert alice.wait(ended.id, terminal=True).status != RUNNING
    mine = [alice.running(resources=SMALL) for _ in range(QUOTA)]
    message = refusal(lambda: alice.create(resources=SMALL))
    world.restart()
    alice = world.client("alice")
    assert all(alice.get(sb.id).status == RUNNING for sb in mine)
    assert refusal(lambda: alice.create(resources=SMALL)) == message
    # Killed outright (no graceful shutdown), the service re-attaches and charges them again.
    world.svc.kill9()
    world.start()
    alice = world.client("alice")
    assert refusal(lambda: alice.create(resources=SMALL)) == message
    alice.stop(mine.pop().id)
    mine.append(alice.running(resources=SMALL))
    refusal(lambda: alice.create(resources=SMALL))
    for sb in mine:
        alice.delete(sb.id)


@pytest.mark.slow
def test_concurrent_creates_never_exceed_the_quota() -> None:
    w = World("--owner-max-sandboxes", "5")
    try:
        w.start()
        alice = w.client("alice")

        def create(i: int) -> str:
            try:
                return alice.create(request_id=f"burst-{i}", resources=SMALL).id
            except grpc.RpcError as e:
                assert code_of(e) == grpc.StatusCode.RESOURCE_EXHAUSTED, e
                return ""

        with cf.ThreadPoolExecutor(20) as pool:
            made = [sid for sid in pool.map(create, range(20)) if sid]
        assert len(made) == 5, made
        live = alice.list().sandboxes
        assert len(live) == 5
        for sid in made:
            alice.wait(sid)
            alice.delete(sid)
    finally:
        w.finish()


@pytest.mark.slow
def test_an_owners_own_quota_replaces_the_default(world: World) -> None:
    alice, bob = world.client("alice"), world.client("bob")
    reg = world.registry()
    try:
        reg.set_owner_quota(
            OwnerQuotaRecord("alice", sandboxes=0, memory_bytes=96 << 20, cpu_millis=250)
        )
    finally:
        reg.close()
    # No bound on the count now, but memory: 32Mi each, 96Mi in all.
    mine = [alice.running(resources=SMALL) for _ in range(2)]
    mine.append(alice.running(resources={"memory": "32Mi", "cpu": "25m", "disk": "8Mi"}))
    msg = refusal(lambda: alice.create(resources={"memory": "16Mi", "cpu": "10m"}))
    assert msg == (
        "quota reached: this sandbox needs memory 16Mi, and your live sandboxes already hold "
        "96Mi of your memory quota of 96Mi; ask for less (resources.memory) or stop some of "
        "yours first"
    )
    alice.delete(mine.pop().id)
    # cpu: 2 x 100m held of 250m; a sandbox without a cpu limit counts as every core.
    msg = refusal(lambda: alice.create(resources={"memory": "16Mi"}))
    assert msg.startswith("quota reached: this sandbox needs cpu ") and "(no cpu limit" in msg
    assert "more than your whole cpu quota of 0.25; ask for less (resources.cpu)" in msg, msg
    msg = refusal(lambda: alice.create(resources={"memory": "16Mi", "cpu": "150m"}))
    assert "needs cpu 0.15, and your live sandboxes already hold 0.2 of your cpu quota" in msg
    # More than the whole quota is said so.
    msg = refusal(lambda: alice.create(resources={"memory": "128Mi", "cpu": "10m"}))
    assert "more than your whole memory quota of 96Mi" in msg
    mine.append(alice.running(resources={"memory": "32Mi", "cpu": "25m", "disk": "8Mi"}))
    # Bob still has the default (3 sandboxes), whatever alice holds.
    bobs = [bob.running(resources=SMALL) for _ in range(QUOTA)]
    refusal(lambda: bob.create(resources=SMALL))
    for sb in mine:
        alice.delete(sb.id)
    for sb in bobs:
        bob.delete(sb.id)


@pytest.mark.slow
def test_global_refusal_does_not_tell_others_the_count() -> None:
    w = World("--max-sandboxes", "2")
    try:
        w.start()
        alice, bob = w.client("alice"), w.client("bob")
        held = [bob.running(resources=SMALL), bob.running(resources=SMALL)]
        msg = refusal(lambda: alice.create(resources=SMALL))
        assert "max-sandboxes" in msg and not re.search(r"\d", msg), msg
        info = alice.stub.GetServerInfo(pb.GetServerInfoRequest(), metadata=alice.md, timeout=10)
        assert info.sandboxes_running == 0  # alice's own
        # The service's own user (the unix socket) is told the figures.
        local = w.svc.client()
        assert "2 of 2 sandboxes are live" in refusal(lambda: local.create(resources=SMALL))
        bob.delete(held.pop().id)
        deadline = time.monotonic() + 10
        while True:
            try:
                alice.delete(alice.create(resources=SMALL).id)
                break
            except grpc.RpcError:
                assert time.monotonic() < deadline
                time.sleep(0.1)
        for sb in held:
            bob.delete(sb.id)
    finally:
        w.finish()
