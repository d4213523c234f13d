"""The disk-backed writable layer through the real service: chosen per sandbox and service-wide,
held to the disk size, kept across a restart of the service, removed with the sandbox."""

from __future__ import annotations

import os

import grpc
import pytest
from server_helpers import ServerProcess, code_of

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="disk layers need a root service")


def layer_mounts(server: ServerProcess) -> list[str]:
    root = server.state_dir / "layers"
    return sorted(p.name for p in root.iterdir() if os.path.ismount(p)) if root.is_dir() else []


def test_disk_layer_holds_the_disk_limit_and_survives_a_restart(
    fresh_server: ServerProcess,
) -> None:
    c = fresh_server.start().client()
    sb = c.running(writable_layer="disk", resources={"disk": "32Mi"})
    assert c.get(sb.id).spec.writable_layer == "disk"
    out = c.sh(sb.id, "echo kept > /workspace/k; dd if=/dev/zero of=/workspace/z bs=1M count=64 "
                      "2>&1; echo rc=$?; stat -f -c %T /").stdout  # fmt: skip
    assert b"No space left on device" in out and b"rc=1" in out and b"ext2/ext3" in out
    assert layer_mounts(fresh_server) == [sb.id]
    fresh_server.kill9()
    c = fresh_server.start().client()
    assert c.sh(sb.id, "cat /workspace/k").stdout == b"kept\n"
    c.delete(sb.id)
    assert layer_mounts(fresh_server) == []
    assert not (fresh_server.state_dir / "layers" / f"{sb.id}.img").exists()


def test_service_wide_default_and_refusals(fresh_server: ServerProcess) -> None:
    fresh_server.args += ["--writable-layer", "disk"]
    c = fresh_server.start().client()
    sb = c.running()
    assert c.get(sb.id).spec.writable_layer == "disk"
    assert c.sh(sb.id, "stat -f -c %T /").stdout == b"ext2/ext3\n"
    mem = c.running(writable_layer="memory")
    assert c.sh(mem.id, "stat -f -c %T /").stdout == b"tmpfs\n"
    with pytest.raises(grpc.RpcError) as err:
        c.create(writable_layer="ssd")
    assert code_of(err.value) == grpc.StatusCode.INVALID_ARGUMENT
    assert "writable_layer" in (err.value.details() or "") and "'disk'" in (
        err.value.details() or ""
    )
