"""Volumes and host directories under Ray (docs/volumes.md, "Under Ray"), on the real cluster.

A volume lives on its home node (the node of the first sandbox that mounted it); every later
sandbox that mounts it is placed there. Proved here: a volume written by a sandbox on its node is
read by a second one there (at once, and after a restart of the control plane); its size is a
hard bound on that node's disk; volumes of two nodes in one sandbox are refused in words;
another owner neither sees nor mounts it; deleting removes its files on its node; host
directories are checked on the node (a symlink out of the allowed tree fails there).

The module restarts the control plane with `--allow-host-mount` and a small
`--volume-max-size`, and restores it afterwards.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from raw_client import Client
from raycluster import RayCluster

from aviato.server import auth
from aviato.server.registry import Registry
from aviato.v1 import sandbox_pb2 as pb
from aviato.v1.sandbox_pb2_grpc import SandboxServiceStub

from .test_cluster import TAG

MiB = 1 << 20


class World:
    def __init__(self, cluster: RayCluster, stub: SandboxServiceStub) -> None:
        self.cluster = cluster
        self.stub = stub
        registry = Registry(cluster.state_dir / "registry.db")
        self.bob_key = auth.create_key(registry, "bob", "volumes-ray")[1]
        registry.close()
        self.alice = Client(stub)  # the unix socket's own owner ("local")
        self.bob = Client(stub, [("authorization", f"Bearer {self.bob_key}")])

    def volumes(self, client: Client) -> dict[str, pb.Volume]:
        answer = self.stub.ListVolumes(pb.ListVolumesRequest(), metadata=client.md, timeout=30)
        return {v.name: v for v in answer.volumes}

    def delete(self, client: Client, name: str) -> None:
        request = pb.DeleteVolumeRequest(name=name)
        self.stub.DeleteVolume(request, metadata=client.md, timeout=30)

    def on_node(self, node: str, owner: str, *parts: str) -> Path:
        """A path below a volume's place in its node host's state directory."""
        key = hashlib.sha256(owner.encode()).hexdigest()[:32]
        return self.cluster.node_state_dir / node[:16] / parts[0] / key / Path(*parts[1:])


@pytest.fixture(scope="module")
def allowed(ray_cluster: RayCluster) -> Iterator[Path]:
    base = ray_cluster.dir / "host-trees"
    (base / "allowed" / "ds").mkdir(parents=True)
    (base / "outside").mkdir()
    (base / "allowed" / "ds" / "label.txt").write_text("cat\n")
    (base / "outside" / "secret.txt").write_text("host only\n")
    os.symlink(base / "outside", base / "allowed" / "escape")
    for directory in (ray_cluster.dir, base, base / "allowed", base / "allowed" / "ds"):
        os.chmod(directory, 0o755)
    yield base / "allowed"
    shutil.rmtree(base, ignore_errors=True)


def restart_with(cluster: RayCluster, args: list[str]) -> None:
    cluster.stop_server()
    cluster.server_args = args
    cluster.start_server()


@pytest.fixture(scope="module")
def world(ray_cluster: RayCluster, stub: SandboxServiceStub, allowed: Path) -> Iterator[World]:
    saved = list(ray_cluster.server_args)
    restart_with(ray_cluster, ["--allow-host-mount", str(allowed), "--volume-max-size", "64Mi"])
    try:
        yield World(ray_cluster, stub)
    finally:
        restart_with(ray_cluster, saved)


def vol(path: str, name: str, read_only: bool = False, size: int = 0) -> pb.DirectoryMount:
    return pb.DirectoryMount(path=path, volume=name, read_only=read_only, size_bytes=size)


def run(client: Client, *mounts: pb.DirectoryMount, **spec: object) -> pb.Sandbox:
    return client.running(mounts=list(mounts), tags=[TAG], **spec)


def sh(client: Client, sandbox_id: str, script: str) -> tuple[int, str]:
    result = client.sh(sandbox_id, script)
    return result.exit_code, (result.stdout + result.stderr).decode(errors="replace")


def failed_with(client: Client, *mounts: pb.DirectoryMount) -> str:
    """The FAILED reason of a sandbox whose node refused its mounts."""
    created = client.create(mounts=list(mounts), tags=[TAG])
    ended = client.wait(created.id, terminal=True, timeout=30)
    assert ended.status == pb.SANDBOX_STATUS_FAILED, ended
    return ended.status_reason


def test_a_volume_is_shared_on_its_node_and_outlives_a_restart_of_the_control_plane(
    world: World,
) -> None:
    alice = world.alice
    writer = run(alice, vol("/cache", "cache"))
    assert sh(alice, writer.id, "echo one > /cache/f")[0] == 0
    reader = run(alice, vol("/data", "cache", read_only=True))
    assert reader.node == writer.node  # placed on the volume's home
    assert sh(alice, reader.id, "cat /data/f") == (0, "one\n")
    assert sh(alice, writer.id, "echo two >> /cache/f")[0] == 0  # both run: live sharing
    assert sh(alice, reader.id, "cat /data/f; touch /data/x")[1].startswith("one\ntwo\n")
    listed = world.volumes(alice)["cache"]
    assert listed.node == writer.node and listed.size_enforced
    assert sorted(listed.used_by) == sorted((writer.id, reader.id))
    mounted = world.on_node(writer.node, "local", "volume-mounts", "cache", "f")
    assert mounted.read_text() == "one\ntwo\n"
    for sid in (writer.id, reader.id):
        alice.stop(sid)
    world.cluster.stop_server()
    world.cluster.start_server()
    later = run(alice, vol("/w", "cache"))
    assert later.node == writer.node
    assert sh(alice, later.id, "cat /w/f") == (0, "one\ntwo\n")
    alice.stop(later.id)
    world.delete(alice, "cache")
    assert not mounted.exists() and "cache" not in world.volumes(alice)
    assert not world.on_node(writer.node, "local", "volume-images", "cache.img").exists()


def test_its_size_bounds_what_it_takes_of_its_nodes_disk(world: World) -> None:
    alice = world.alice
    sb = run(alice, vol("/v", "small", size=4 * MiB))
    _, out = sh(alice, sb.id, "head -c 6000000 /dev/zero > /v/big; echo rc=$?")
    assert "No space left on device" in out and "rc=0" not in out, out
    image = world.on_node(sb.node, "local", "volume-images", "small.img")
    assert image.stat().st_blocks * 512 <= 4 * MiB
    alice.stop(sb.id)
    assert world.volumes(alice)["small"].max_size_bytes == 4 * MiB
    with pytest.raises(grpc.RpcError) as refused:
        alice.create(mounts=[vol("/v", "big", size=128 * MiB)], tags=[TAG])
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "more than this service allows a volume (64Mi" in str(refused.value.details())
    world.delete(alice, "small")


def test_volumes_of_two_nodes_in_one_sandbox_are_refused_in_words(world: World) -> None:
    alice = world.alice
    one = run(alice, vol("/a", "on-w1"), node_selector={"aviato-test": "w1"})
    two = run(alice, vol("/b", "on-w2"), node_selector={"aviato-test": "w2"})
    assert one.node != two.node
    for sid in (one.id, two.id):
        alice.stop(sid)
    with pytest.raises(grpc.RpcError) as refused:
        alice.create(mounts=[vol("/a", "on-w1"), vol("/b", "on-w2")], tags=[TAG])
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    words = str(refused.value.details())
    assert "volume 'on-w1' lives on node" in words, words
    assert "a sandbox can mount volumes of one node only" in words
    for name in ("on-w1", "on-w2"):
        world.delete(alice, name)


def test_another_owner_neither_sees_nor_mounts_it(world: World) -> None:
    alice, bob = world.alice, world.bob
    a = run(alice, vol("/v", "mine"))
    assert sh(alice, a.id, "echo alice > /v/secret")[0] == 0
    alice.stop(a.id)
    assert "mine" not in world.volumes(bob)
    with pytest.raises(grpc.RpcError) as theirs:
        world.delete(bob, "mine")
    assert theirs.value.code() == grpc.StatusCode.NOT_FOUND
    b = run(bob, vol("/v", "mine"))  # bob's own volume of that name: empty
    assert sh(bob, b.id, "ls -A /v") == (0, "")
    bob.stop(b.id)
    assert (
        world.on_node(a.node, "local", "volume-mounts", "mine", "secret").read_text() == "alice\n"
    )
    world.delete(bob, "mine")
    world.delete(alice, "mine")


def test_host_directories_are_checked_on_the_node(world: World, allowed: Path) -> None:
    alice = world.alice
    sb = run(alice, pb.DirectoryMount(path="/d", host_path=str(allowed / "ds")))
    code, out = sh(alice, sb.id, "cat /d/label.txt; touch /d/x")
    assert out.startswith("cat\n") and code != 0
    alice.stop(sb.id)
    # the control plane refuses what is not under an allowed tree by its text ...
    with pytest.raises(grpc.RpcError) as refused:
        alice.create(mounts=[pb.DirectoryMount(path="/d", host_path="/etc")], tags=[TAG])
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not under a directory the operator allows" in str(refused.value.details())
    # ... and the node what leads out of it through a symlink on its disk
    reason = failed_with(alice, pb.DirectoryMount(path="/d", host_path=str(allowed / "escape")))
    assert "leads through a symlink out of the allowed directories" in reason, reason
    assert "host only" not in reason


def test_a_volume_whose_node_is_gone_waits_for_it_and_can_still_be_deleted(
    world: World,
) -> None:
    """The home is recorded by node id: a record naming a node the cluster does not have keeps
    its sandboxes PENDING (then FAILED at the placement timeout); deleting it forgets it (its
    files, if any, stay on that node's disk)."""
    registry = Registry(world.cluster.state_dir / "registry.db")
    registry.volumes.insert("local", "orphan", time.time_ns(), 4 * MiB)
    registry.volumes.settle_node("local", "orphan", "f" * 56)
    registry.close()
    reason = failed_with(world.alice, vol("/v", "orphan"))
    assert "no ready node matches node_selector {aviato.node=" in reason, reason
    world.delete(world.alice, "orphan")
    assert "orphan" not in world.volumes(world.alice)


def test_a_shared_volume_directory_serves_a_volume_on_every_node(world: World) -> None:
    """With --ray-volume-dir (here a directory of this machine, which every node of the test
    cluster shares), a new volume has no home: sandboxes on two nodes share it at once."""
    cluster, alice = world.cluster, world.alice
    shared = cluster.dir / "shared-volumes"
    shared.mkdir(mode=0o700)
    saved = list(cluster.server_args)
    restart_with(cluster, [*saved, "--ray-volume-dir", str(shared)])
    try:
        one = run(alice, vol("/v", "everywhere"), node_selector={"aviato-test": "w1"})
        two = run(alice, vol("/v", "everywhere"), node_selector={"aviato-test": "w2"})
        assert one.node != two.node
        assert sh(alice, one.id, "echo from-w1 > /v/f")[0] == 0
        assert sh(alice, two.id, "cat /v/f; echo from-w2 >> /v/f") == (0, "from-w1\n")
        assert sh(alice, one.id, "cat /v/f; stat -c %u /v/f") == (0, "from-w1\nfrom-w2\n0\n")
        listed = world.volumes(alice)["everywhere"]
        assert listed.node == "" and not listed.size_enforced and listed.size_bytes > 0
        for sid in (one.id, two.id):
            alice.stop(sid)
        with pytest.raises(grpc.RpcError) as refused:
            alice.create(mounts=[vol("/v", "sized", size=4 * MiB)], tags=[TAG])
        assert "keeps volumes in a shared directory" in str(refused.value.details())
        key = hashlib.sha256(b"local").hexdigest()[:32]
        assert (shared / "volumes" / key / "everywhere" / "f").exists()
        world.delete(alice, "everywhere")
        assert not (shared / "volumes" / key / "everywhere").exists()
    finally:
        restart_with(cluster, saved)
