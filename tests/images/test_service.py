"""Images through the real service: status while pulling, failures, the CLI and the SDK."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from oci_helpers import LOCAL, Pusher, Registry, busybox_layer, require_image_tools, run_registry

from aviato.v1 import images_pb2 as ipb
from aviato.v1 import images_pb2_grpc, sandbox_pb2_grpc
from aviato.v1 import sandbox_pb2 as pb

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="these tests run sandboxes as root")
S = pb.SandboxStatus
ROOT = Path(__file__).resolve().parents[2]


def aviato_argv() -> list[str]:
    script = Path(sys.executable).with_name("aviato")
    return [str(script)] if script.exists() else [sys.executable, "-m", "aviato"]


class Service:
    """The real service of a private state directory, driven by the `aviato` command."""

    def __init__(self, state: Path) -> None:
        self.state = state
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("AVIATO_")}
        self.env["AVIATO_STATE_DIR"] = str(state)
        self.env["AVIATO_INSECURE_REGISTRIES"] = ",".join(LOCAL)  # the test registries
        self.channel = grpc.insecure_channel(f"unix://{state}/aviato.sock")
        self.stub = sandbox_pb2_grpc.SandboxServiceStub(self.channel)  # type: ignore[no-untyped-call]
        self.images = images_pb2_grpc.ImageServiceStub(self.channel)  # type: ignore[no-untyped-call]

    def cli(self, *args: str, input: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*aviato_argv(), *args], input=input, capture_output=True,
                              text=True, env=self.env, timeout=120,
                              stdin=None if input is not None else subprocess.DEVNULL)  # fmt: skip

    def create(self, **spec: object) -> pb.Sandbox:
        request = pb.CreateSandboxRequest(spec=pb.SandboxSpec(**spec),  # type: ignore[arg-type]
                                          request_id=f"r{time.monotonic_ns()}")  # fmt: skip
        record: pb.Sandbox = self.stub.CreateSandbox(request, timeout=30)
        return record

    def wait(self, sid: str, terminal: bool = False) -> pb.Sandbox:
        cond = pb.WaitSandboxRequest.CONDITION_TERMINAL if terminal else (
            pb.WaitSandboxRequest.CONDITION_STARTED)  # fmt: skip
        record: pb.Sandbox = self.stub.WaitSandbox(
            pb.WaitSandboxRequest(sandbox_id=sid, condition=cond, timeout_seconds=60), timeout=90
        )
        return record


def running_service(prefix: str) -> Iterator[Service]:
    """A fixture body: a service on a new state directory, everything removed afterwards."""
    require_image_tools()
    state = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    svc = Service(state)
    started = svc.cli("server", "start")
    assert started.returncode == 0, started.stderr
    yield svc
    svc.cli("rm", "--all", "-y")
    svc.cli("server", "stop")
    svc.channel.close()
    shutil.rmtree(state, ignore_errors=True)


@pytest.fixture(scope="module")
def service() -> Iterator[Service]:
    yield from running_service("avis-")


@pytest.fixture(scope="module")
def shared_registry() -> Iterator[Registry]:
    require_image_tools()
    work = Path(tempfile.mkdtemp(prefix="avisr-", dir="/tmp"))
    with run_registry(work) as reg:
        yield reg
    shutil.rmtree(work, ignore_errors=True)


def test_invalid_reference_refused_at_create(service: Service) -> None:
    with pytest.raises(grpc.RpcError) as info:
        service.create(image="Not/An:Image!")
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "spec.image" in (info.value.details() or "")
    with pytest.raises(grpc.RpcError) as info:
        service.create(image="busybox", registry_auth=pb.RegistryAuth(password="x"))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "spec.registry_auth.username" in (info.value.details() or "")


def test_unreachable_registry_fails_the_sandbox(service: Service) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    rec = service.create(image=f"127.0.0.1:{port}/nothing/here:v1")
    done = service.wait(rec.id, terminal=True)
    assert done.status == S.SANDBOX_STATUS_FAILED
    assert done.status_reason.startswith(f"pulling image 127.0.0.1:{port}/nothing/here:v1 failed")


@contextlib.contextmanager
def hanging_registry() -> Iterator[str]:
    """A TCP server that accepts and never answers: a pull that waits forever."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            with contextlib.suppress(OSError):
                held.append(server.accept()[0])

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.getsockname()[1]}"
    finally:
        stop.set()
        thread.join()
        for conn in held:
            conn.close()
        server.close()


def test_pending_with_reason_while_pulling_then_stop(service: Service) -> None:
    with hanging_registry() as host:
        rec = service.create(image=f"{host}/slow/image:v1")
        deadline = time.monotonic() + 10
        while True:
            got = service.stub.GetSandbox(pb.GetSandboxRequest(sandbox_id=rec.id))
            if got.status_reason or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert got.status == S.SANDBOX_STATUS_PENDING
        assert got.status_reason == f"pulling image {host}/slow/image:v1"
        stopped = service.stub.StopSandbox(pb.StopSandboxRequest(sandbox_id=rec.id), timeout=30)
        assert stopped.status == S.SANDBOX_STATUS_TERMINATED


@pytest.mark.slow
def test_create_exec_and_cli_image_commands(service: Service, shared_registry: Registry) -> None:
    pusher = Pusher(shared_registry)
    pushed = pusher.image("t/svc", "v1", [busybox_layer()], env=["PATH=/bin", "X=from-image"])
    ref = f"{shared_registry.host}/t/svc:v1"
    # CLI pull (no terminal: no bars, the digest on stdout).
    pulled = service.cli("image", "pull", ref)
    assert pulled.returncode == 0, pulled.stderr
    assert pulled.stdout.strip() == pushed.digest
    listed = json.loads(service.cli("image", "ls", "--json").stdout)
    assert [(i["names"], i["digest"], i["in_use"]) for i in listed] == [
        ([ref], pushed.digest, False)
    ]
    # A sandbox from it runs execs.
    rec = service.create(image=ref)
    assert service.wait(rec.id).status == S.SANDBOX_STATUS_RUNNING
    out = service.cli("exec", rec.id, "--", "sh", "-c", "echo $X; cat /etc/group | head -1")
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["from-image", "root:x:0:"]
    # In use: rm refuses, prune keeps it.
    refused = service.cli("image", "rm", ref)
    assert refused.returncode == 1 and "used by a sandbox" in refused.stderr
    assert service.cli("image", "prune", "-y").stdout == ""
    service.cli("rm", "-y", rec.id)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        images = service.images.ListImages(ipb.ListImagesRequest()).images
        if not any(i.in_use for i in images):
            break
        time.sleep(0.1)
    pruned = service.cli("image", "prune", "-y")
    assert pruned.returncode == 0 and pushed.digest in pruned.stdout
    assert json.loads(service.cli("image", "ls", "--json").stdout) == []


@pytest.mark.slow
def test_registry_auth_in_the_spec_is_used_and_not_kept(service: Service) -> None:
    work = Path(tempfile.mkdtemp(prefix="avisa-", dir="/tmp"))
    try:
        with run_registry(work, htpasswd=("bob", "pw")) as reg:
            Pusher(reg).image("t/private", "v1", [busybox_layer()])
            ref = f"{reg.host}/t/private:v1"
            denied = service.create(image=ref)
            failed = service.wait(denied.id, terminal=True)
            assert failed.status == S.SANDBOX_STATUS_FAILED and "login" in failed.status_reason
            auth = pb.RegistryAuth(username="bob", password="pw")
            rec = service.create(image=ref, registry_auth=auth)
            assert not rec.spec.HasField("registry_auth")
            assert service.wait(rec.id).status == S.SANDBOX_STATUS_RUNNING
            got = service.stub.GetSandbox(pb.GetSandboxRequest(sandbox_id=rec.id))
            assert not got.spec.HasField("registry_auth")
            service.cli("rm", "-y", rec.id)
    finally:
        shutil.rmtree(work, ignore_errors=True)


@pytest.mark.slow
def test_sdk_sandbox_run_with_container_image(service: Service, shared_registry: Registry) -> None:
    Pusher(shared_registry).image("t/sdk", "v1", [busybox_layer()], env=["PATH=/bin", "Y=sdk"])
    ref = f"{shared_registry.host}/t/sdk:v1"
    script = (
        "from aviato import Sandbox\n"
        f"sb = Sandbox.run(container_image={ref!r})\n"
        "r = sb.exec(['sh', '-c', 'echo $Y; id -u']).result()\n"
        "print(sb.container_image, r.stdout.strip().replace(chr(10), ' '), r.returncode)\n"
        "sb.stop().result()\n"
    )
    env = {**service.env, "PYTHONPATH": str(ROOT / "src")}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         env=env, timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [ref, "sdk", "0", "0"]
