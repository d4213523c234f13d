"""The SDK and the API against a control plane on a real Ray cluster (see conftest.py).

The order matters: the node-loss test kills worker w2 for good and the partition test cuts off
w1, so both are marked `breaks_cluster` and run after every other test of the package.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
from _wait import wait_until
from raycluster import RayCluster

import aviato
from aviato import Sandbox, SandboxStatus
from aviato.node.v1 import node_pb2 as npb
from aviato.v1 import sandbox_pb2 as pb
from aviato.v1.sandbox_pb2_grpc import SandboxServiceStub

from .conftest import PLACEMENT_TIMEOUT

pytestmark = pytest.mark.slow  # every test here runs on the Ray cluster of network namespaces

TAG = f"cluster-{uuid.uuid4().hex[:8]}"


def _create(stub: SandboxServiceStub, *command: str, **spec: object) -> pb.Sandbox:
    request = pb.CreateSandboxRequest(
        spec=pb.SandboxSpec(command=list(command), tags=[TAG], **spec),  # type: ignore[arg-type]
        request_id=uuid.uuid4().hex,
    )
    return stub.CreateSandbox(request, timeout=30)


def _wait(stub: SandboxServiceStub, sandbox_id: str, terminal: bool, timeout: float) -> pb.Sandbox:
    condition = (
        pb.WaitSandboxRequest.CONDITION_TERMINAL
        if terminal
        else (pb.WaitSandboxRequest.CONDITION_STARTED)
    )
    request = pb.WaitSandboxRequest(
        sandbox_id=sandbox_id, condition=condition, timeout_seconds=timeout
    )
    return stub.WaitSandbox(request, timeout=timeout + 10)


def test_sdk_create_exec_files_stop_list(ray_cluster: RayCluster) -> None:
    sandboxes = [Sandbox.run(tags=[TAG]) for _ in range(3)]
    try:
        for sb in sandboxes:
            sb.wait(timeout=60)
            assert sb.status == SandboxStatus.RUNNING
        # Spread by free memory: three sandboxes land on both workers, never on the head.
        assert len({sb.node for sb in sandboxes}) == 2
        sb = sandboxes[0]
        r = sb.exec(["sh", "-c", "echo out; echo err >&2; exit 3"]).result(timeout=30)
        assert (r.returncode, r.stdout, r.stderr) == (3, "out\n", "err\n")
        lines = list(sb.exec(["sh", "-c", "seq 1 2000"]).stdout.lines())
        assert lines == [f"{i}\n" for i in range(1, 2001)]
        process = sb.exec(["cat"], stdin=True)
        assert process.stdin is not None
        process.stdin.write(b"\x00through ray\xff")
        process.stdin.close()
        assert process.result(timeout=30).stdout_bytes == b"\x00through ray\xff"
        data = bytes(range(256)) * 4096  # 1 MiB: several chunks each way
        sb.write_file("/tmp/blob", data).result(timeout=30)
        assert sb.read_file("/tmp/blob").result(timeout=30) == data
        with pytest.raises(aviato.SandboxFileError):
            sb.read_file("/tmp/missing").result(timeout=30)
        listed = {s.sandbox_id for s in Sandbox.list(tags=[TAG]).result(timeout=30)}
        assert {s.sandbox_id for s in sandboxes} <= listed
    finally:
        for sb in sandboxes:
            sb.stop().result(timeout=30)
    assert all(sb.status == SandboxStatus.TERMINATED for sb in sandboxes)
    assert all(sb.status_reason == "stopped" for sb in sandboxes)


def test_attach_to_a_command_on_a_node(ray_cluster: RayCluster) -> None:
    """The control plane holds each command's retention (issue 18), whatever node runs it: a
    command whose call went away runs on, and an attach gets every byte and the exit."""
    sb = Sandbox.run(tags=[TAG])
    try:
        script = "echo first; read x; seq 1 3000; exit 6"
        process = sb.exec(["sh", "-c", script], stdin=True)
        assert next(iter(process.stdout)) == "first\n"
        exec_id = process.started().result(timeout=30)
        process.detach()
        again = sb.attach(exec_id)
        assert again.stdin is not None
        again.stdin.write(b"go\n")
        again.stdin.close()
        result = again.result(timeout=60)
        expected = "first\n" + "".join(f"{i}\n" for i in range(1, 3001))
        assert (result.stdout, result.returncode) == (expected, 6)
        listed = {p.exec_id: p for p in sb.processes().result(timeout=30)}
        assert (listed[exec_id].state, listed[exec_id].returncode) == ("exited", 6)
    finally:
        sb.stop().result(timeout=30)


def test_usage_of_a_sandbox_on_a_node(ray_cluster: RayCluster) -> None:
    """The usage history (issue 20) reaches sandboxes on other nodes: the control plane asks
    each node host for its sandboxes' readings before each round (every second here)."""
    sb = Sandbox.run("sh", "-c", "while :; do :; done", tags=[TAG])
    try:
        sb.wait()
        deadline = time.monotonic() + 30
        usage = sb.usage().result(timeout=30)
        while len(usage.samples) < 3 and time.monotonic() < deadline:
            time.sleep(0.5)
            usage = sb.usage().result(timeout=30)
        assert usage.unavailable == "" and len(usage.samples) >= 3, usage
        first, last = usage.samples[0], usage.samples[-1]
        assert last.cpu_seconds > first.cpu_seconds >= 0  # a busy loop uses CPU between them
        assert last.memory_bytes > 0 and last.pids >= 2
        assert (usage.cpu_percent() or 0.0) > 10.0, usage
    finally:
        sb.stop().result(timeout=30)


def test_main_exit_and_logs(ray_cluster: RayCluster, stub: SandboxServiceStub) -> None:
    sb = _create(stub, "/bin/sh", "-c", "echo start; sleep 0.5; echo end; echo oops >&2; exit 4")
    got: list[bytes] = []
    for entry in stub.StreamLogs(
        pb.StreamLogsRequest(sandbox_id=sb.id, tail=-1, follow=True), timeout=30
    ):
        if entry.stream == pb.STREAM_STDOUT:
            got.append(entry.data)
    assert b"".join(got) == b"start\nend\n"
    done = _wait(stub, sb.id, terminal=True, timeout=30)
    assert (done.status, done.exit_code) == (pb.SANDBOX_STATUS_FAILED, 4)
    # The log is kept on the control plane after the end.
    kept = list(stub.StreamLogs(pb.StreamLogsRequest(sandbox_id=sb.id, tail=-1), timeout=30))
    assert b"oops" in b"".join(e.data for e in kept if e.stream == pb.STREAM_STDERR)
    stub.DeleteSandbox(pb.DeleteSandboxRequest(sandbox_id=sb.id), timeout=30)


def _pending_for_room(stub: SandboxServiceStub, sandbox_id: str) -> pb.Sandbox | None:
    """The sandbox's record once the placement says it waits for room on its node."""
    record = stub.GetSandbox(pb.GetSandboxRequest(sandbox_id=sandbox_id), timeout=10)
    return record if "waiting for room" in record.status_reason else None


def test_placement_follows_requested_memory(
    ray_cluster: RayCluster, stub: SandboxServiceStub
) -> None:
    # w1 offers 4 GiB to Ray: one 2.5 GiB sandbox fits, a second must wait for it.
    pin = {"aviato-test": "w1"}
    big = pb.Resources(memory="2560Mi")
    first = _create(stub, node_selector=pin, resources=big)
    first = _wait(stub, first.id, terminal=False, timeout=30)
    assert first.status == pb.SANDBOX_STATUS_RUNNING
    second = _create(stub, node_selector=pin, resources=big)
    waiting = wait_until(
        lambda: _pending_for_room(stub, second.id), "the second sandbox to wait for room"
    )
    assert waiting.status == pb.SANDBOX_STATUS_PENDING
    assert "waiting for room" in waiting.status_reason and "2.5Gi" in waiting.status_reason
    stub.StopSandbox(pb.StopSandboxRequest(sandbox_id=first.id, grace_seconds=1), timeout=30)
    t0 = time.monotonic()
    running = _wait(stub, second.id, terminal=False, timeout=30)
    assert running.status == pb.SANDBOX_STATUS_RUNNING and running.node == first.node
    assert time.monotonic() - t0 < 3
    assert running.status_reason == ""
    stub.StopSandbox(pb.StopSandboxRequest(sandbox_id=second.id, grace_seconds=1), timeout=30)


def test_unplaceable_sandbox_fails_after_the_deadline(
    ray_cluster: RayCluster, stub: SandboxServiceStub
) -> None:
    too_big = _create(stub, resources=pb.Resources(memory="64Gi"))
    nowhere = _create(stub, node_selector={"aviato-test": "nope"})
    t0 = time.monotonic()
    for sb, reason in ((too_big, "needs cpu 0 memory 64Gi"), (nowhere, "matches node_selector")):
        done = _wait(stub, sb.id, terminal=True, timeout=PLACEMENT_TIMEOUT + 20)
        assert done.status == pb.SANDBOX_STATUS_FAILED
        assert done.status_reason.startswith(f"not placed within {PLACEMENT_TIMEOUT:g} s")
        assert reason in done.status_reason
    assert time.monotonic() - t0 < PLACEMENT_TIMEOUT + 5


def test_stop_while_pending(ray_cluster: RayCluster, stub: SandboxServiceStub) -> None:
    sb = _create(stub, node_selector={"aviato-test": "nope"})
    stopped = stub.StopSandbox(pb.StopSandboxRequest(sandbox_id=sb.id), timeout=10)
    assert stopped.status == pb.SANDBOX_STATUS_TERMINATED and stopped.status_reason == "stopped"


PROBE = r"""
import os, socket, sys
failures = []
for target in sys.argv[1:]:
    host, port = target.rsplit(":", 1)
    s = socket.socket()
    s.settimeout(2)
    try:
        s.connect((host, int(port)))
        failures.append("connected to " + target)
    except OSError as e:
        pass
    finally:
        s.close()
for path in (os.environ.get("TOKEN", ""), os.path.expanduser("~/.ray/auth_token")):
    try:
        open(path).read()
        failures.append("read " + path)
    except OSError:
        pass
for path in ("/tmp/ray", "/dev/shm/plasma"):  # Ray's session files and object store
    if os.path.exists(path):
        failures.append("sees " + path)
leaked = [k for k in os.environ if k.startswith("RAY_")]
if leaked:
    failures.append("environment: " + ",".join(leaked))
print("\n".join(failures) or "isolated")
"""


def test_sandboxes_cannot_reach_ray(ray_cluster: RayCluster, stub: SandboxServiceStub) -> None:
    targets = [f"{ray_cluster.head_ip}:6379", f"{ray_cluster.ips['w1']}:22",
               f"{ray_cluster.ips['w2']}:6379", "127.0.0.1:6379"]  # fmt: skip
    token = str(ray_cluster.dir / "auth_token")
    for w in ("w1", "w2"):
        created = _create(stub, node_selector={"aviato-test": w}, env={"TOKEN": token})
        created = _wait(stub, created.id, terminal=False, timeout=30)
        pinned = Sandbox.from_id(created.id).result(timeout=30)
        try:
            r = pinned.exec(["python3", "-c", PROBE, *targets]).result(timeout=60)
            assert r.returncode == 0, r.stderr
            assert r.stdout == "isolated\n", f"on {w}: {r.stdout}"
            # Only loopback: no interface that could route to the cluster.
            links = pinned.exec(["cat", "/proc/net/dev"]).result(timeout=30).stdout
            assert [ln.split(":")[0].strip() for ln in links.splitlines()[2:]] == ["lo"]
        finally:
            pinned.stop().result(timeout=30)


def test_direct_channel_refuses_calls_without_the_token(ray_cluster: RayCluster) -> None:
    import grpc

    log = ray_cluster.server_log.read_text()
    addresses = set(re.findall(r"exec channel ([0-9.]+:[0-9]+)", log))
    assert len(addresses) >= 2, log[-2000:]
    for address in addresses:
        with grpc.insecure_channel(address) as channel:
            read = channel.unary_stream(
                "/aviato.node.v1.NodeHost/ReadFile",
                request_serializer=npb.ReadFileRequest.SerializeToString,
                response_deserializer=npb.ReadFileResponse.FromString,
            )
            with pytest.raises(grpc.RpcError) as info:
                list(read(npb.ReadFileRequest(sandbox_id="x", path="/etc/hostname"), timeout=10))
            assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_control_plane_restart_keeps_sandboxes_and_reservations(
    ray_cluster: RayCluster, stub: SandboxServiceStub
) -> None:
    pin = {"aviato-test": "w1"}
    big = pb.Resources(memory="2560Mi")
    kept = _create(stub, "sh", "-c", "echo before; sleep 600", node_selector=pin, resources=big)
    assert _wait(stub, kept.id, terminal=False, timeout=30).status == pb.SANDBOX_STATUS_RUNNING
    waiting = _create(stub, node_selector={"aviato-test": "nope"})
    ray_cluster.stop_server()
    ray_cluster.start_server()
    again = stub.GetSandbox(pb.GetSandboxRequest(sandbox_id=kept.id), timeout=30)
    assert again.status == pb.SANDBOX_STATUS_RUNNING
    interrupted = stub.GetSandbox(pb.GetSandboxRequest(sandbox_id=waiting.id), timeout=30)
    assert (interrupted.status, interrupted.status_reason) == (
        pb.SANDBOX_STATUS_FAILED,
        "interrupted by service restart",
    )
    sb = Sandbox.from_id(kept.id).result(timeout=30)
    assert sb.exec(["echo", "after"]).result(timeout=30).stdout == "after\n"
    # The node host kept the reservation: a second big sandbox on w1 still has to wait.
    second = _create(stub, node_selector=pin, resources=big)
    pending = wait_until(
        lambda: _pending_for_room(stub, second.id), "the second sandbox to wait for room"
    )
    assert pending.status == pb.SANDBOX_STATUS_PENDING
    sb.stop(graceful_shutdown_seconds=1).result(timeout=30)
    assert _wait(stub, second.id, terminal=False, timeout=30).status == (pb.SANDBOX_STATUS_RUNNING)
    logs = list(stub.StreamLogs(pb.StreamLogsRequest(sandbox_id=kept.id, tail=-1), timeout=30))
    assert b"before" in b"".join(e.data for e in logs)
    stub.StopSandbox(pb.StopSandboxRequest(sandbox_id=second.id, grace_seconds=1), timeout=30)


def _host_pids_with(marker: str) -> list[int]:
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if marker.encode() in Path(entry.path, "cmdline").read_bytes():
                    found.append(int(entry.name))
    return found


def test_lifetime_holds_on_a_node_while_the_control_plane_is_down(
    ray_cluster: RayCluster, stub: SandboxServiceStub
) -> None:
    """The node's supervisor got the deadline: with the control plane stopped, a 4 s sandbox
    still ends on its node, and the restarted control plane records why."""
    marker = f"avr-deadline-{uuid.uuid4().hex[:8]}"
    sb = _create(stub, "python3", "-c", "import time; time.sleep(600)", marker,
                 max_lifetime_seconds=4)  # fmt: skip
    assert _wait(stub, sb.id, terminal=False, timeout=30).status == pb.SANDBOX_STATUS_RUNNING
    assert _host_pids_with(marker)
    ray_cluster.stop_server()
    try:
        deadline = time.monotonic() + 20
        while _host_pids_with(marker) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _host_pids_with(marker) == [], "the sandbox outlived its lifetime on its node"
    finally:
        ray_cluster.start_server()
    ended = _wait(stub, sb.id, terminal=True, timeout=30)
    assert (ended.status, ended.status_reason) == (
        pb.SANDBOX_STATUS_TERMINATED,
        "max lifetime exceeded",
    )


def test_node_host_restart_reattaches(ray_cluster: RayCluster, stub: SandboxServiceStub) -> None:
    """Ray restarts a killed node host on its node; the sandboxes (own sessions, not killed
    with the worker) keep running, and the restarted host re-attaches them."""
    command = "i=0; while true; do echo tick$i; i=$((i+1)); sleep 0.2; done"
    sb = _create(stub, "sh", "-c", command, node_selector={"aviato-test": "w1"})
    sb = _wait(stub, sb.id, terminal=False, timeout=30)
    log = ray_cluster.server_log.read_text()
    pids = re.findall(rf"node host ready on {sb.node} .*?pid (\d+)", log)
    assert pids, log[-2000:]
    os.kill(int(pids[-1]), signal.SIGKILL)
    t0 = time.monotonic()
    sandbox = Sandbox.from_id(sb.id).result(timeout=30)
    while True:  # the first calls may fail while Ray restarts the actor
        try:
            assert sandbox.exec(["echo", "again"]).result(timeout=30).stdout == "again\n"
            break
        except aviato.AviatoError:
            assert time.monotonic() - t0 < 30
            time.sleep(0.5)
    print(f"node host restart: exec works again after {time.monotonic() - t0:.2f} s")
    assert stub.GetSandbox(pb.GetSandboxRequest(sandbox_id=sb.id), timeout=10).status == (
        pb.SANDBOX_STATUS_RUNNING
    )

    def last_tick() -> int:
        logs = list(stub.StreamLogs(pb.StreamLogsRequest(sandbox_id=sb.id, tail=1), timeout=30))
        return int(logs[-1].data.decode().strip().removeprefix("tick")) if logs else -1

    # The log mirror resumes after the restart: it catches up with the ticks (one each 0.2 s).
    wait_until(
        lambda: last_tick() >= (time.monotonic() - t0) / 0.2 * 0.5,
        "the log mirror to resume after the node host's restart",
    )
    last = last_tick()
    stopped = stub.StopSandbox(pb.StopSandboxRequest(sandbox_id=sb.id, grace_seconds=1), timeout=30)
    assert stopped.status == pb.SANDBOX_STATUS_TERMINATED
    assert not _sandbox_pids(sb.id)
    # The copy kept on the control plane resumed exactly where it was: no tick lost or twice.
    kept = stub.StreamLogs(pb.StreamLogsRequest(sandbox_id=sb.id, tail=-1), timeout=30)
    ticks = b"".join(entry.data for entry in kept).decode().split()
    assert ticks == [f"tick{i}" for i in range(len(ticks))] and len(ticks) > last


KILL_NODE_HOST = """
import sys, ray
ray.init(address=sys.argv[1], namespace="aviato", log_to_driver=False)
ray.kill(ray.get_actor("aviato-nodehost-" + sys.argv[2]), no_restart=True)
"""


def test_node_host_lost_for_good(ray_cluster: RayCluster) -> None:
    """A node host that Ray will not restart (killed with no_restart) while its node lives:
    its sandboxes end FAILED "node host lost", a stop of one returns promptly, a new node host
    starts on the node and kills what the lost one left running."""
    loop = "while true; do sleep 0.2; done"
    left = Sandbox.run("sh", "-c", loop, tags=[TAG], node_selector={"aviato-test": "w1"})
    stopped = Sandbox.run("sh", "-c", loop, tags=[TAG], node_selector={"aviato-test": "w1"})
    left.wait(timeout=30)
    stopped.wait(timeout=30)
    node = left.node
    assert node and stopped.node == node and left.node_selector == {"aviato-test": "w1"}
    assert _sandbox_pids(left.sandbox_id or "") and _sandbox_pids(stopped.sandbox_id or "")
    subprocess.run(
        [
            *ray_cluster.enter("head"),
            sys.executable,
            "-c",
            KILL_NODE_HOST,
            f"{ray_cluster.head_ip}:6379",
            node,
        ],
        env=ray_cluster.env(),
        check=True,
        timeout=60,
        capture_output=True,
    )
    t0 = time.monotonic()
    stopped.stop(graceful_shutdown_seconds=1).result(timeout=30)
    stop_took = time.monotonic() - t0
    with contextlib.suppress(aviato.SandboxFailedError):
        left.wait_until_complete(timeout=30).result(timeout=40)
    failed_after = time.monotonic() - t0
    print(
        f"node host lost: stop returned after {stop_took:.2f} s, FAILED after {failed_after:.2f} s"
    )
    # Stopped before or after the control plane gave up on the node host (it usually has by
    # the time the driver that killed it exits): either way the stop returned at once.
    assert stopped.status in (SandboxStatus.TERMINATED, SandboxStatus.FAILED)
    assert (left.status, left.status_reason) == (SandboxStatus.FAILED, "node host lost")
    assert stop_took < 10 and failed_after < 10
    # A new node host on the same node kills what is left and takes new sandboxes.
    deadline = time.monotonic() + 30
    while (_sandbox_pids(left.sandbox_id or "") or _sandbox_pids(stopped.sandbox_id or "")) and (
        time.monotonic() < deadline
    ):
        time.sleep(0.2)
    assert not _sandbox_pids(left.sandbox_id or "")
    assert not _sandbox_pids(stopped.sandbox_id or "")
    with Sandbox.run(tags=[TAG], node_selector={"aviato-test": "w1"}) as fresh:
        assert fresh.wait(timeout=30).node == node
        assert fresh.exec(["echo", "back"]).result(timeout=30).stdout == "back\n"


def test_sdk_node_selector(ray_cluster: RayCluster) -> None:
    nodes = {}
    for worker in ("w1", "w2"):
        with Sandbox.run(tags=[TAG], node_selector={"aviato-test": worker}) as sb:
            assert sb.wait(timeout=30).node_selector == {"aviato-test": worker}
            nodes[worker] = sb.node
    assert nodes["w1"] and nodes["w2"] and nodes["w1"] != nodes["w2"]
    # The key aviato.node names a node by id; a session's default selector applies too.
    with aviato.Session(
        aviato.SandboxDefaults(tags=(TAG,), node_selector={"aviato.node": nodes["w2"]})
    ) as session:
        assert session.sandbox().wait(timeout=30).node == nodes["w2"]
    with pytest.raises(aviato.SandboxValidationError, match=r"node_selector\['bad label'\]"):
        Sandbox.run(tags=[TAG], node_selector={"bad label": "x"})


@pytest.mark.breaks_cluster
def test_node_loss_fails_its_sandboxes_within_10s(
    ray_cluster: RayCluster, stub: SandboxServiceStub
) -> None:
    on_w2 = [_create(stub, node_selector={"aviato-test": "w2"}) for _ in range(2)]
    on_w1 = _create(stub, node_selector={"aviato-test": "w1"})
    for sb in (*on_w2, on_w1):
        assert _wait(stub, sb.id, terminal=False, timeout=30).status == pb.SANDBOX_STATUS_RUNNING
    victim = Sandbox.from_id(on_w2[0].id).result(timeout=30)
    process = victim.exec(["sh", "-c", "echo started; sleep 60"])
    assert next(iter(process.stdout.lines())) == "started\n"
    errors: list[BaseException] = []

    def drain() -> None:
        try:
            process.result(timeout=30)
        except BaseException as e:
            errors.append(e)

    reader = threading.Thread(target=drain)
    reader.start()

    t0 = time.monotonic()
    ray_cluster.kill_node("w2")
    ended = [_wait(stub, sb.id, terminal=True, timeout=30) for sb in on_w2]
    elapsed = time.monotonic() - t0
    for sb in ended:
        assert sb.status == pb.SANDBOX_STATUS_FAILED
        assert sb.status_reason == "node lost"
    print(f"node loss: sandboxes FAILED {elapsed:.2f} s after the kill")
    assert elapsed <= 10.0, f"node loss took {elapsed:.1f} s"
    reader.join(30)
    assert len(errors) == 1 and isinstance(errors[0], aviato.AviatoError), errors
    assert "node lost" in str(errors[0])
    # The other node is untouched, and new sandboxes go there.
    alive = stub.GetSandbox(pb.GetSandboxRequest(sandbox_id=on_w1.id), timeout=10)
    assert alive.status == pb.SANDBOX_STATUS_RUNNING
    fresh = Sandbox.run(tags=[TAG])
    try:
        assert fresh.wait(timeout=30).node == on_w1.node or fresh.node == alive.node
        assert fresh.exec(["echo", "ok"]).result(timeout=30).stdout == "ok\n"
    finally:
        fresh.stop().result(timeout=30)
        stub.StopSandbox(pb.StopSandboxRequest(sandbox_id=on_w1.id, grace_seconds=1), timeout=30)


def _sandbox_pids(sandbox_id: str) -> list[int]:
    """Host pids whose cgroup names the sandbox (its processes, on whichever node)."""
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if sandbox_id in Path(entry.path, "cgroup").read_text():
                    found.append(int(entry.name))
    return found


@pytest.mark.breaks_cluster
def test_partitioned_node_fences_its_sandboxes(
    ray_cluster: RayCluster, stub: SandboxServiceStub
) -> None:
    sb = _create(stub, "sleep", "600", node_selector={"aviato-test": "w1"})
    assert _wait(stub, sb.id, terminal=False, timeout=30).status == pb.SANDBOX_STATUS_RUNNING
    assert _sandbox_pids(sb.id), "the sandbox's processes are not visible"
    t0 = time.monotonic()
    ray_cluster.partition("w1")
    ended = _wait(stub, sb.id, terminal=True, timeout=30)
    lost_after = time.monotonic() - t0
    assert ended.status == pb.SANDBOX_STATUS_FAILED and ended.status_reason == "node lost"
    # The node cannot hear that it was declared dead; its node host stops the sandbox itself
    # once the GCS has been silent for longer than the lease.
    deadline = t0 + ray_cluster.node_lease + 10
    while _sandbox_pids(sb.id) and time.monotonic() < deadline:
        time.sleep(0.2)
    fenced_after = time.monotonic() - t0
    print(f"partition: FAILED after {lost_after:.2f} s, fenced after {fenced_after:.2f} s")
    assert lost_after <= 10.0
    assert not _sandbox_pids(sb.id), f"still running {fenced_after:.1f} s after the partition"
