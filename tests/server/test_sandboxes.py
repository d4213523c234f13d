"""Records through a real service: create, get, list, wait, stop, delete, validation, info."""

from __future__ import annotations

import re
import threading
import time
import uuid

import grpc
import pytest
from server_helpers import TERMINAL, Client, S, ServerProcess, code_of, sandbox_cgroups

from aviato.v1 import sandbox_pb2 as pb


def test_server_info(server: ServerProcess) -> None:
    info = server.stub().GetServerInfo(pb.GetServerInfoRequest())
    assert info.placement == "local"
    assert info.runtime.startswith("bubblewrap")
    # which C library the supervisor was built against (setup.py: it moves a sandbox's start)
    assert re.search(r"; supervisor built against (musl|glibc)$", info.runtime), info.runtime
    assert info.cgroups in ("v1", "v2", "none")
    assert info.state_dir == str(server.state_dir)
    assert info.max_sandboxes > 0
    assert (server.state_dir / "aviato.sock").stat().st_mode & 0o777 == 0o600


def test_default_limits_are_applied_and_answered(server: ServerProcess) -> None:
    """A spec that names no limits gets the service's defaults, resolved once at validation:
    the runtime's cgroup holds them and the answer says them."""
    c = server.client()
    sb = c.running(tags=["t-defaults"])
    res = sb.spec.resources
    assert (res.cpu, res.memory, res.pids, res.disk) == ("", "1Gi", 1024, "1Gi")
    asked = c.running(resources={"memory": "300Mi", "pids": 77})
    assert (asked.spec.resources.memory, asked.spec.resources.pids) == ("300Mi", 77)
    try:
        for sandbox, memory, pids in ((sb, 1 << 30, 1024), (asked, 300 << 20, 77)):
            dirs = sandbox_cgroups({sandbox.id}, server.cgroup_parent)
            if not dirs:
                pytest.skip("this host gives sandboxes no cgroups")
            names = ("memory.limit_in_bytes", "memory.max", "pids.max")
            found = {
                p.name: int(p.read_text()) for d in dirs for n in names if (p := d / n).exists()
            }
            assert found.get("memory.limit_in_bytes", found.get("memory.max")) == memory
            assert found["pids.max"] == pids
    finally:
        c.stop(sb.id)
        c.stop(asked.id)


def test_create_get_and_states(server: ServerProcess) -> None:
    c = server.client()
    sb = c.create(tags=["t-states"], env={"A": "1"})
    assert sb.id and sb.status in (S.SANDBOX_STATUS_PENDING, S.SANDBOX_STATUS_CREATING,
                                   S.SANDBOX_STATUS_RUNNING)  # fmt: skip
    assert sb.node == "local" and sb.spec.image == "host" and list(sb.spec.tags) == ["t-states"]
    assert sb.HasField("created_at") and sb.HasField("expires_at")
    assert sb.expires_at.ToNanoseconds() - sb.created_at.ToNanoseconds() == pytest.approx(
        3600e9, rel=1e-3
    )
    sb = c.wait(sb.id)
    assert sb.status == S.SANDBOX_STATUS_RUNNING and sb.HasField("started_at")
    assert not sb.HasField("exit_code")
    got = c.get(sb.id)
    assert got.id == sb.id and got.status == S.SANDBOX_STATUS_RUNNING
    stopped = c.stop(sb.id)
    assert stopped.status == S.SANDBOX_STATUS_TERMINATED and stopped.status_reason == "stopped"
    assert stopped.exit_code == 0 and stopped.HasField("ended_at")
    # Terminal records stay queryable.
    assert c.get(sb.id).status == S.SANDBOX_STATUS_TERMINATED
    c.delete(sb.id)


def test_main_command_outcomes(server: ServerProcess) -> None:
    c = server.client()
    ok = c.create(command=["/bin/true"])
    bad = c.create(command=["/bin/sh", "-c", "exit 3"])
    missing = c.create(command=["/no/such/program"])
    ok_end = c.wait(ok.id, terminal=True)
    bad_end = c.wait(bad.id, terminal=True)
    missing_end = c.wait(missing.id, terminal=True)
    assert (ok_end.status, ok_end.exit_code, ok_end.status_reason) == (
        S.SANDBOX_STATUS_COMPLETED,
        0,
        "",
    )
    assert (bad_end.status, bad_end.exit_code) == (S.SANDBOX_STATUS_FAILED, 3)
    assert bad_end.status_reason == "exited with code 3"
    assert missing_end.status == S.SANDBOX_STATUS_FAILED and missing_end.exit_code != 0
    for sb in (ok, bad, missing):
        c.delete(sb.id)


def test_idempotent_create(server: ServerProcess) -> None:
    c = server.client()
    rid = str(uuid.uuid4())
    results: list[pb.Sandbox] = []

    def create() -> None:
        results.append(c.create(request_id=rid, tags=["t-idem"]))

    threads = [threading.Thread(target=create) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    again = c.create(request_id=rid, tags=["t-idem"])
    assert {r.id for r in results} == {again.id}
    listed = c.list(tags=["t-idem"], include_terminated=True)
    assert [s.id for s in listed.sandboxes] == [again.id]
    c.wait(again.id)
    sandboxes_dir = server.state_dir / "sandboxes"
    assert (sandboxes_dir / again.id).is_dir()
    c.delete(again.id)
    # After delete the request id is free again: a new sandbox.
    fresh = c.create(request_id=rid)
    assert fresh.id != again.id
    c.delete(fresh.id)


def test_list_filters_pagination_and_terminal_hidden(server: ServerProcess) -> None:
    c = server.client()
    tag = f"t-{uuid.uuid4().hex[:8]}"
    live = [c.create(tags=[tag, "even" if i % 2 == 0 else "odd"]) for i in range(7)]
    done = c.create(tags=[tag, "done"], command=["/bin/true"])
    c.wait(done.id, terminal=True)

    def ids(**kw: object) -> list[str]:
        return [s.id for s in c.list(**kw).sandboxes]

    assert ids(tags=[tag]) == [s.id for s in live]  # creation order; terminal hidden
    assert done.id in ids(tags=[tag], include_terminated=True)
    assert ids(tags=[tag], statuses=[S.SANDBOX_STATUS_COMPLETED]) == [done.id]
    assert ids(tags=[tag, "even"]) == [live[i].id for i in (0, 2, 4, 6)]
    assert ids(tags=[tag, "even", "odd"]) == []
    for sb in live:
        c.wait(sb.id)
    assert ids(tags=[tag], statuses=[S.SANDBOX_STATUS_RUNNING]) == [s.id for s in live]

    seen: list[str] = []
    token = ""
    pages = 0
    while True:
        resp = c.list(tags=[tag], include_terminated=True, page_size=3, page_token=token)
        assert len(resp.sandboxes) <= 3
        seen += [s.id for s in resp.sandboxes]
        token = resp.next_page_token
        pages += 1
        if not token:
            break
    assert pages == 3 and seen == [s.id for s in live] + [done.id]

    with pytest.raises(grpc.RpcError) as err:
        c.list(page_token="garbage!")
    assert code_of(err.value) == grpc.StatusCode.INVALID_ARGUMENT
    assert "page_token" in err.value.details()  # type: ignore[attr-defined]
    for sb in [*live, done]:
        c.delete(sb.id)
    assert ids(tags=[tag], include_terminated=True) == []


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        (
            {"resources": {"memory": "12Qi"}},
            "spec.resources.memory: '12Qi' is not a size such as 512Mi or 2G",
        ),
        ({"resources": {"cpu": "-1"}}, "spec.resources.cpu"),
        ({"command": ["sh", "a\x00"]}, "spec.command[1]"),
        ({"working_dir": "relative"}, "spec.working_dir"),
        ({"tags": ["bad tag"]}, "spec.tags[0]"),
        ({"network": "bridge"}, "spec.network"),
        ({"max_lifetime_seconds": float("nan")}, "spec.max_lifetime_seconds"),
        ({"max_lifetime_seconds": 8 * 86400}, "spec.max_lifetime_seconds"),
        ({"env": {"A=B": "1"}}, "spec.env"),
        ({"image": "UPPER CASE"}, "spec.image"),
        ({"request_id": "has space"}, "request_id"),
        ({"mounted": [("rel/path", b"")]}, "spec.mounted_files[0].path"),
    ],
)
def test_validation_errors_name_the_field(
    server: ServerProcess, spec: dict[str, object], field: str
) -> None:
    with pytest.raises(grpc.RpcError) as err:
        server.client().create(**spec)  # type: ignore[arg-type]
    assert code_of(err.value) == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith(field), err.value.details()  # type: ignore[attr-defined]


def test_missing_request_id(server: ServerProcess) -> None:
    with pytest.raises(grpc.RpcError) as err:
        server.stub().CreateSandbox(pb.CreateSandboxRequest(spec=pb.SandboxSpec()))
    assert code_of(err.value) == grpc.StatusCode.INVALID_ARGUMENT
    assert "request_id" in err.value.details()  # type: ignore[attr-defined]


def test_unknown_ids_are_not_found(server: ServerProcess) -> None:
    c = server.client()
    for call in (
        lambda: c.get("sbx-nope"),
        lambda: c.stop("sbx-nope"),
        lambda: c.delete("sbx-nope"),
        lambda: c.get(""),
        lambda: c.get("../../etc"),
        lambda: c.wait("sbx-nope"),
        lambda: c.logs("sbx-nope"),
        lambda: c.read_file("sbx-nope", "/etc/hostname"),
    ):
        with pytest.raises(grpc.RpcError) as err:
            call()
        assert code_of(err.value) == grpc.StatusCode.NOT_FOUND


IGNORES_TERM = ["/bin/sh", "-c", "trap '' TERM; touch /tmp/ready; while :; do sleep 0.05; done"]


def wait_ready(c: Client, sandbox_id: str) -> None:
    """Waits until the main process has installed its trap (a stop before would kill it)."""
    deadline = time.monotonic() + 10
    while c.exec(sandbox_id, ["/bin/test", "-e", "/tmp/ready"]).exit_code != 0:
        assert time.monotonic() < deadline, "the main process never got ready"
        time.sleep(0.02)


@pytest.mark.slow
def test_stop_grace_then_sigkill(server: ServerProcess) -> None:
    c = server.client()
    # A main process that ignores SIGTERM: stop must SIGKILL it after the grace.
    sb = c.running(command=IGNORES_TERM)
    wait_ready(c, sb.id)
    t0 = time.monotonic()
    stopped = c.stop(sb.id, grace=1.0)
    elapsed = time.monotonic() - t0
    assert stopped.status == S.SANDBOX_STATUS_TERMINATED and stopped.status_reason == "stopped"
    assert stopped.exit_code == 137
    assert 0.9 <= elapsed < 6, elapsed
    # A main process that exits on SIGTERM: stop returns long before the grace.
    sb2 = c.running(command=["/bin/sleep", "600"])
    t0 = time.monotonic()
    stopped2 = c.stop(sb2.id, grace=30)
    assert time.monotonic() - t0 < 5
    assert stopped2.status == S.SANDBOX_STATUS_TERMINATED
    assert stopped2.exit_code == 128 + 15
    # Stopping a terminal sandbox is a no-op.
    again = c.stop(sb2.id)
    assert again.status == S.SANDBOX_STATUS_TERMINATED and again.ended_at == stopped2.ended_at
    for s in (sb, sb2):
        c.delete(s.id)


@pytest.mark.slow
def test_concurrent_stops_coalesce(server: ServerProcess) -> None:
    c = server.client()
    sb = c.running(command=IGNORES_TERM)
    wait_ready(c, sb.id)
    results: list[pb.Sandbox] = []
    threads = [
        threading.Thread(target=lambda: results.append(c.stop(sb.id, grace=1))) for _ in range(5)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 5
    assert {r.status for r in results} == {S.SANDBOX_STATUS_TERMINATED}
    assert len({r.ended_at.ToNanoseconds() for r in results}) == 1
    c.delete(sb.id)


def test_stop_while_creating_and_delete_running(server: ServerProcess) -> None:
    c = server.client()
    sb = c.create()
    stopped = c.stop(sb.id)  # right after create: may still be PENDING/CREATING
    assert stopped.status in TERMINAL
    running = c.running()
    c.delete(running.id)  # stops first
    with pytest.raises(grpc.RpcError) as err:
        c.get(running.id)
    assert code_of(err.value) == grpc.StatusCode.NOT_FOUND
    assert not (server.state_dir / "sandboxes" / running.id).exists()
    c.delete(sb.id)


def test_wait_times_out_with_current_record(server: ServerProcess) -> None:
    c = server.client()
    sb = c.running()
    t0 = time.monotonic()
    got = c.wait(sb.id, terminal=True, timeout=0.3)
    assert 0.25 <= time.monotonic() - t0 < 3
    assert got.status == S.SANDBOX_STATUS_RUNNING
    c.delete(sb.id)


def test_mounted_files_are_read_only(server: ServerProcess) -> None:
    c = server.client()
    sb = c.running(mounted=[("/workspace/app.conf", b"k=v\n")])
    r = c.sh(sb.id, "cat /workspace/app.conf; echo x >> /workspace/app.conf")
    assert r.stdout == b"k=v\n" and r.exit_code != 0
    got = c.get(sb.id)
    assert got.spec.mounted_files[0].path == "/workspace/app.conf"
    assert got.spec.mounted_files[0].content == b""  # contents are not echoed back
    c.delete(sb.id)


def test_a_mounted_file_the_image_cannot_take_is_refused_at_create(server: ServerProcess) -> None:
    """A path in the host image's read-only /etc that does not exist there cannot become a mount
    point: refused by CreateSandbox with the reason, and nothing recorded."""
    c = server.client()
    request_id = str(uuid.uuid4())
    with pytest.raises(grpc.RpcError) as err:
        c.create(request_id=request_id, mounted=[("/etc/app.conf", b"k=v\n")])
    assert code_of(err.value) == grpc.StatusCode.INVALID_ARGUMENT
    assert "/etc/app.conf" in (err.value.details() or "")
    assert "read-only" in (err.value.details() or "")
    listed = c.list(include_terminated=True).sandboxes
    assert not [sb for sb in listed if sb.spec.mounted_files]
