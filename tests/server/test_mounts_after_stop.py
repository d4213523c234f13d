"""What a stopped service leaves in the host's mount table (docs/state.md): nothing, once its
sandboxes have ended; the mounts of the sandboxes that outlive it, and nothing more, otherwise.

Each mount left behind stays until the host reboots when the state directory is deleted (a
mount point cannot be removed), and makes every later bubblewrap start on the host slower.
`ServerProcess.stop` is `aviato server stop`'s graceful stop (SIGTERM, then wait).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from _mounts import mounts_beneath
from server_helpers import ServerProcess

from aviato.v1 import sandbox_pb2 as pb

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="layers and sized volumes need root")

MiB = 1 << 20


def mounted(state_dir: Path) -> list[str]:
    """The mount points beneath `state_dir`, relative to it, volume keys shortened to 'KEY'."""
    names = []
    for point in mounts_beneath(state_dir):
        parts = list(Path(point).relative_to(state_dir).parts)
        if parts[0] == "volume-mounts" and len(parts) > 1:
            parts[1] = "KEY"
        names.append("/".join(parts))
    return sorted(names)


def layer_and_volume(sid: str) -> list[str]:
    return sorted(["layers", f"layers/{sid}", "volume-mounts", "volume-mounts/KEY/cache"])


def sandbox_with_both(server: ServerProcess) -> pb.Sandbox:
    """A sandbox with a disk layer and a sized volume, a file written to each."""
    c = server.client()
    sb = c.running(
        writable_layer="disk", resources={"disk": "32Mi"},
        mounts=[pb.DirectoryMount(path="/cache", volume="cache", size_bytes=4 * MiB)],
    )  # fmt: skip
    assert c.sh(sb.id, "echo layer > /workspace/f && echo volume > /cache/f").exit_code == 0
    return sb


def test_a_service_whose_sandboxes_ended_leaves_no_mount(fresh_server: ServerProcess) -> None:
    c = fresh_server.start().client()
    sb = sandbox_with_both(fresh_server)
    assert mounted(fresh_server.state_dir) == layer_and_volume(sb.id)
    c.stop(sb.id)  # stopped, not deleted: its cleanup runs as the service stops
    fresh_server.stop()
    assert mounted(fresh_server.state_dir) == []
    # A new service on the same state directory binds and mounts again what it needs.
    c = fresh_server.start().client()
    again = c.running(
        writable_layer="disk", resources={"disk": "32Mi"},
        mounts=[pb.DirectoryMount(path="/cache", volume="cache")],
    )  # fmt: skip
    assert c.sh(again.id, "cat /cache/f; echo new > /workspace/g; cat /workspace/g").stdout == (
        b"volume\nnew\n"
    )
    assert mounted(fresh_server.state_dir) == layer_and_volume(again.id)
    c.delete(again.id)
    assert mounted(fresh_server.state_dir) == ["volume-mounts", "volume-mounts/KEY/cache"]
    fresh_server.stop()
    assert mounted(fresh_server.state_dir) == []


def test_a_sandbox_that_outlives_the_service_keeps_its_mounts(
    fresh_server: ServerProcess,
) -> None:
    c = fresh_server.start().client()
    sb = sandbox_with_both(fresh_server)
    other = c.running(
        writable_layer="disk", resources={"disk": "32Mi"},
        mounts=[pb.DirectoryMount(path="/spare", volume="spare", size_bytes=2 * MiB)],
    )  # fmt: skip
    c.delete(other.id)  # not the last layer: the root's bind stays under sb's
    assert "volume-mounts/KEY/spare" in mounted(fresh_server.state_dir)
    fresh_server.stop()  # unmounts the volume that no live sandbox mounts
    assert mounted(fresh_server.state_dir) == layer_and_volume(sb.id)
    c = fresh_server.start().client()  # re-attaches sb
    out = c.sh(sb.id, "cat /workspace/f /cache/f; echo more >> /cache/f; tail -1 /cache/f")
    assert out.stdout == b"layer\nvolume\nmore\n"
    c.delete(sb.id)
    assert mounted(fresh_server.state_dir) == ["volume-mounts", "volume-mounts/KEY/cache"]
    fresh_server.stop()
    assert mounted(fresh_server.state_dir) == []


def test_deleting_the_last_volume_undoes_the_root_bind(fresh_server: ServerProcess) -> None:
    c = fresh_server.start().client()
    sb = c.running(mounts=[pb.DirectoryMount(path="/v", volume="v", size_bytes=2 * MiB)])
    assert mounted(fresh_server.state_dir) == ["volume-mounts", "volume-mounts/KEY/v"]
    c.delete(sb.id)
    c.stub.DeleteVolume(pb.DeleteVolumeRequest(name="v"), timeout=30)
    assert mounted(fresh_server.state_dir) == []
    sb = c.running(mounts=[pb.DirectoryMount(path="/v", volume="v", size_bytes=2 * MiB)])
    assert c.sh(sb.id, "echo ok > /v/f && cat /v/f").stdout == b"ok\n"
    assert mounted(fresh_server.state_dir) == ["volume-mounts", "volume-mounts/KEY/v"]
    c.delete(sb.id)
    fresh_server.stop()
    assert mounted(fresh_server.state_dir) == []
