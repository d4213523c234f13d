"""Issue 17 under Ray: directory calls, pause, snapshots and forks of sandboxes on cluster nodes,
and a snapshot taken on one node started on another (docs/state.md, "Under Ray").

The first tests need no cluster: the archive a snapshot moves in (cluster/snapshot_archive.py)
round-trips a tree a hostile sandbox made, and the receiving side refuses crafted archives
(`..`, absolute names, hard links out of the tree, archives beyond the snapshot's facts) and
lands nothing outside its target, whatever symlinks earlier entries planted. The others run on
the real three-node cluster (conftest.py) through the SDK.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import io
import os
import re
import signal
import stat
import subprocess
import sys
import tarfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import grpc
import pytest
from raycluster import RayCluster

import aviato
from aviato import Sandbox, Snapshot
from aviato.cluster import codec
from aviato.cluster.execwire import ExecServer
from aviato.cluster.node_snapshots import snapshot_handlers
from aviato.cluster.snapshot_archive import (
    ArchiveRefused,
    Spool,
    archive_bound,
    unpack_archive,
    write_archive,
)
from aviato.node.v1 import node_pb2 as npb
from aviato.runtime.base import FileEntry, PathOp, PathOpResult, SnapshotFacts
from aviato.runtime.snapshot_store import SnapshotStore

TAG = f"cluster-state-{uuid.uuid4().hex[:8]}"
SNAP = "snap-0123456789abcdef"


# --- the archive, without a cluster ------------------------------------------------------------


def _hostile_tree(tree: Path) -> None:
    """What a sandbox can leave in its layer: links out and up, hard links, a fifo, set-id
    bits, whiteout-like names, deep and odd names."""
    (tree / "work").mkdir(parents=True)
    (tree / "work" / "data.bin").write_bytes(os.urandom(3 << 20))
    (tree / "work" / "secret").write_text("mine")
    os.symlink("/etc/shadow", tree / "work" / "shadow")
    os.symlink("../../../../..", tree / "work" / "up")
    os.link(tree / "work" / "secret", tree / "work" / "secret-again")
    os.mkfifo(tree / "work" / "pipe")
    (tree / "work" / "setuid").write_text("#!/bin/sh\n")
    os.chmod(tree / "work" / "setuid", 0o4755)
    (tree / "work" / ".wh.secret").write_text("a file, not a whiteout")
    (tree / "work" / "sp ace\nnewline").write_text("odd name")
    deep = tree / "deep"
    for i in range(40):
        deep = deep / f"d{i}"
    deep.mkdir(parents=True)
    (deep / "bottom").write_text("down here")
    os.chmod(tree / "work", 0o750)


def _archive_of(tree: Path) -> bytes:
    pieces: list[bytes] = []
    write_archive(tree, pieces.append)
    return b"".join(pieces)


def _unpack(store: SnapshotStore, archive: bytes, facts: SnapshotFacts) -> None:
    spool = Spool(store, SNAP, archive_bound(facts))
    try:
        for i in range(0, len(archive), 1 << 20):
            spool.write(archive[i : i + (1 << 20)])
    except BaseException:
        spool.discard()
        raise
    unpack_archive(store, SNAP, spool, facts)


def test_the_source_refuses_a_sparse_tree_before_a_byte_beyond_the_receivers_bound(
    tmp_path: Path,
) -> None:
    """The source stops first, in words: had only the receiver refused mid-stream, the service's
    write to it could fail before its status arrived, and the user would read gRPC's "Internal
    error from Core" instead (seen in CI under load)."""
    tree = tmp_path / "tree"
    tree.mkdir()
    with open(tree / "sparse", "wb") as f:
        f.truncate(1 << 30)
    facts = SnapshotFacts(size_bytes=0, entries=1, skipped=0)  # what read_facts says of it
    bound = archive_bound(facts)
    emitted: list[bytes] = []
    with pytest.raises(ArchiveRefused, match="sparse"):
        write_archive(tree, emitted.append, bound, SNAP)
    assert 0 < sum(map(len, emitted)) <= bound.tar_bytes


def test_a_hostile_tree_round_trips_as_it_was(tmp_path: Path) -> None:
    source = tmp_path / "source"
    _hostile_tree(source)
    archive = _archive_of(source)
    store = SnapshotStore(tmp_path / "snapshots")
    _unpack(store, archive, SnapshotFacts(3 << 20, 60, 0))
    tree = store.tree(SNAP)
    assert (tree / "work" / "data.bin").read_bytes() == (source / "work" / "data.bin").read_bytes()
    assert os.readlink(tree / "work" / "shadow") == "/etc/shadow"
    assert os.readlink(tree / "work" / "up") == "../../../../.."
    a, b = (tree / "work" / "secret").stat(), (tree / "work" / "secret-again").stat()
    assert a.st_ino == b.st_ino and (tree / "work" / "secret").read_text() == "mine"
    assert stat.S_ISFIFO((tree / "work" / "pipe").lstat().st_mode)
    assert not (tree / "work" / "setuid").stat().st_mode & 0o6000
    assert (tree / "work" / ".wh.secret").read_text() == "a file, not a whiteout"
    assert (tree / "work" / "sp ace\nnewline").read_text() == "odd name"
    assert stat.S_IMODE((tree / "work").stat().st_mode) == 0o750
    bottom = tree.joinpath("deep", *(f"d{i}" for i in range(40)), "bottom")
    assert bottom.read_text() == "down here"
    assert not list(store.root.glob(".partial-*"))  # the spool and the partial tree are gone


def _tar(*members: tuple[tarfile.TarInfo, bytes]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            info.size = len(data) if info.type == tarfile.REGTYPE else 0
            tar.addfile(info, io.BytesIO(data) if data else None)
    return out.getvalue()


def _member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mode = kind, link, 0o644
    return info


ESCAPES = {
    "dot-dot": _tar((_member("../escaped"), b"x")),
    "absolute": _tar((_member("/tmp/escaped-abs"), b"x")),
    "hard link out": _tar((_member("h", tarfile.LNKTYPE, "../../../../etc/passwd"), b"")),
    "hard link absolute": _tar((_member("h", tarfile.LNKTYPE, "/etc/passwd"), b"")),
}


@pytest.mark.parametrize("name", list(ESCAPES))
def test_a_crafted_archive_is_refused_and_leaves_nothing(tmp_path: Path, name: str) -> None:
    store = SnapshotStore(tmp_path / "snapshots")
    with pytest.raises(ArchiveRefused):
        _unpack(store, ESCAPES[name], SnapshotFacts(1 << 20, 10, 0))
    assert not store.exists(SNAP)
    assert not list(store.root.iterdir())  # no tree, no partial, no spool
    assert not (tmp_path / "escaped").exists() and not Path("/tmp/escaped-abs").exists()


def test_symlinks_planted_by_earlier_entries_lead_nowhere_outside(tmp_path: Path) -> None:
    """A symlink to `/` or out with `..`, then entries through it: they land inside the tree
    (resolved as the sandbox would see them), never on the node; devices are left out."""
    outside = tmp_path / "outside"
    outside.mkdir()
    device = _member("null", tarfile.CHRTYPE)
    device.devmajor, device.devminor = 1, 3
    archive = _tar(
        (_member("root", tarfile.SYMTYPE, "/"), b""),
        (_member("root/planted"), b"through a link to /"),
        (_member("up", tarfile.SYMTYPE, "../../../../../../" + str(outside)), b""),
        (_member("up/planted"), b"through a link up"),
        (device, b""),
    )
    store = SnapshotStore(tmp_path / "snapshots")
    _unpack(store, archive, SnapshotFacts(1 << 20, 10, 0))
    tree = store.tree(SNAP)
    assert (tree / "planted").read_text() == "through a link to /"
    assert (tree / str(outside).lstrip("/") / "planted").read_text() == "through a link up"
    assert not list(outside.iterdir())
    assert not Path("/planted").exists()
    assert not (tree / "null").exists()


def test_an_archive_beyond_the_snapshots_facts_is_refused(tmp_path: Path) -> None:
    """A sandbox's sparse file (holes written out) or a source lying about its size: the
    receiver stops at the bound the facts give and keeps nothing."""
    archive = _tar((_member("big"), bytes(4 << 20)))
    store = SnapshotStore(tmp_path / "snapshots")
    with pytest.raises(ArchiveRefused, match="sparse"):
        _unpack(store, archive, SnapshotFacts(1 << 20, 1, 0))
    assert not list(store.root.iterdir())


def test_what_a_node_host_killed_mid_transfer_leaves_goes_at_its_next_start(
    tmp_path: Path,
) -> None:
    store = SnapshotStore(tmp_path / "snapshots")
    spool = Spool(store, SNAP, archive_bound(SnapshotFacts(1 << 20, 10, 0)))
    spool.write(b"half an archive")  # ... and the node host dies here
    assert list(store.root.iterdir()) and not store.exists(SNAP)
    SnapshotStore(tmp_path / "snapshots").discard_partial()  # what the next runtime does
    assert not list(store.root.iterdir())


@pytest.mark.parametrize(
    "op",
    [
        PathOp("list", "/work", offset=3, limit=10),
        PathOp("set_meta", "/r", rel="a/b", mode=0o640, mtime_ns=123456789012345),
        PathOp("rename", "/r", rel="", arg="x", recursive=True, parents=True, mode=0),
    ],
)
def test_directory_operations_cross_the_node_protocol_whole(op: PathOp) -> None:
    assert codec.decode_path_op(codec.encode_path_op("sbx", op)) == op
    result = PathOpResult([FileEntry("n", "symlink", 1, 0o777, 5, "t")], truncated=True)
    assert codec.decode_path_result(codec.encode_path_result(result)) == result
    assert {f.name for f in dataclasses.fields(PathOp)} <= {
        f.name for f in npb.PathOpRequest.DESCRIPTOR.fields
    }


def test_a_transfer_cut_mid_stream_leaves_nothing_on_the_receiving_node(tmp_path: Path) -> None:
    """The control plane dies (or cancels) mid-copy: the receiving node host keeps no spool,
    no partial tree and no snapshot; a whole transfer afterwards succeeds."""
    store = SnapshotStore(tmp_path / "snapshots")
    runtime = SimpleNamespace(snapshots=store)
    source = tmp_path / "source"
    _hostile_tree(source)
    archive = _archive_of(source)
    facts = SnapshotFacts(3 << 20, 60, 0)

    async def runtime_of() -> object:
        return runtime

    async def handle_of(sandbox_id: str) -> object:
        raise AssertionError("no sandbox call expected")

    async def main() -> None:
        server = ExecServer(handle_of, None, lambda s: snapshot_handlers(s, runtime_of, 0))  # type: ignore[arg-type]
        address = await server.start("127.0.0.1", 0)
        try:
            async with grpc.aio.insecure_channel(address) as channel:
                method = channel.stream_unary(
                    "/aviato.node.v1.NodeHost/ImportSnapshot",
                    request_serializer=npb.ImportSnapshotRequest.SerializeToString,
                    response_deserializer=npb.SnapshotFacts.FromString,
                )
                header = npb.ImportSnapshotHeader(
                    snapshot_id=SNAP, facts=npb.SnapshotFacts(size_bytes=3 << 20, entries=60)
                )
                call = method(metadata=(("x-aviato-node-token", server.token),))
                await call.write(npb.ImportSnapshotRequest(header=header))
                await call.write(npb.ImportSnapshotRequest(data=archive[: 1 << 20]))
                await asyncio.sleep(0.3)
                assert list(store.root.iterdir())  # the spool exists while it comes
                call.cancel()
                for _ in range(50):
                    await asyncio.sleep(0.1)
                    if not list(store.root.iterdir()):
                        break
                assert not list(store.root.iterdir()) and not store.exists(SNAP)

                whole = method(metadata=(("x-aviato-node-token", server.token),))
                await whole.write(npb.ImportSnapshotRequest(header=header))
                for i in range(0, len(archive), 1 << 20):
                    await whole.write(npb.ImportSnapshotRequest(data=archive[i : i + (1 << 20)]))
                await whole.write(npb.ImportSnapshotRequest(end=True))
                await whole.done_writing()
                answer = await whole
                assert codec.decode_snapshot_facts(answer) == facts
                assert store.exists(SNAP)
        finally:
            await server.stop()

    asyncio.run(main())
    assert (store.tree(SNAP) / "work" / "secret").read_text() == "mine"


# --- on the cluster ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def on_w1(ray_cluster: RayCluster) -> Iterator[Sandbox]:
    """A sandbox on w1, the node of the snapshots below."""
    with Sandbox.run(
        "sleep", "infinity", tags=[TAG], node_selector={"aviato-test": "w1"}
    ) as sb:  # fmt: skip
        sb.wait(timeout=60)
        assert sb.node and sb.node != "local"
        yield sb


def test_directory_calls_reach_a_sandbox_on_another_node(on_w1: Sandbox, tmp_path: Path) -> None:
    sb = on_w1
    sb.make_dir("/tmp/pt/a/b", parents=True, mode=0o750).result()
    sb.write_file("/tmp/pt/a/f", b"hello").result()
    sb.exec(["ln", "-s", "/etc/hostname", "/tmp/pt/a/link"]).result()
    listing = sb.list_dir("/tmp/pt/a").result()
    kinds = {e.name: (e.type, e.size if e.is_file else None) for e in listing}
    assert kinds == {"b": ("dir", None), "f": ("file", 5), "link": ("symlink", None)}
    assert sb.stat("/tmp/pt/a/b").result().mode == 0o750
    assert sb.stat("/tmp/pt/a/link").result().target == "/etc/hostname"
    sb.rename("/tmp/pt/a/f", "/tmp/pt/a/b/g").result()
    assert sb.read_file("/tmp/pt/a/b/g").result() == b"hello"
    with pytest.raises(aviato.SandboxFileError) as missing:  # the reason crosses the nodes
        sb.stat("/tmp/pt/nothing").result()
    assert missing.value.filepath == "/tmp/pt/nothing"
    with pytest.raises(aviato.SandboxFileError, match="not empty"):
        sb.remove("/tmp/pt/a").result()

    local = tmp_path / "up"
    (local / "sub").mkdir(parents=True)
    (local / "sub" / "big.bin").write_bytes(os.urandom(5 << 20))  # several 1 MiB frames
    (local / "x.sh").write_text("#!/bin/sh\necho x\n")
    os.chmod(local / "x.sh", 0o755)
    os.symlink("sub/big.bin", local / "ln")
    assert sb.upload_dir(local, "/tmp/pt/tree").result() > 5 << 20
    back = tmp_path / "back"
    sb.download_dir("/tmp/pt/tree", back).result()
    assert (back / "sub" / "big.bin").read_bytes() == (local / "sub" / "big.bin").read_bytes()
    assert stat.S_IMODE((back / "x.sh").stat().st_mode) == 0o755
    assert os.readlink(back / "ln") == "sub/big.bin"
    # The CLI's tree copy and listing take the same path (AVIATO_BASE_URL: the cluster).
    cli = [sys.executable, "-m", "aviato"]
    again = tmp_path / "again"
    subprocess.run([*cli, "cp", "-r", f"{sb.sandbox_id}:/tmp/pt/tree", str(again)], check=True)
    assert (again / "x.sh").read_text() == "#!/bin/sh\necho x\n"
    listed = subprocess.run(
        [*cli, "files", "ls", str(sb.sandbox_id), "/tmp/pt/tree"],
        check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    assert "x.sh" in listed and "sub" in listed
    sb.remove("/tmp/pt", recursive=True).result()
    with pytest.raises(aviato.SandboxFileError):
        sb.stat("/tmp/pt").result()


def test_pause_and_resume_a_sandbox_on_another_node(on_w1: Sandbox) -> None:
    sb = on_w1
    sb.pause().result()
    assert sb.get_status() == aviato.SandboxStatus.PAUSED
    with pytest.raises(aviato.SandboxNotRunningError, match="paused"):
        sb.exec(["/bin/true"]).result()
    sb.extend(60).result()  # a paused sandbox can be extended (its deadline goes at resume)
    sb.resume().result()
    assert sb.get_status() == aviato.SandboxStatus.RUNNING
    assert sb.exec(["echo", "on"]).result().stdout == "on\n"


def test_an_idle_sandbox_on_another_node_is_stopped(ray_cluster: RayCluster) -> None:
    idle = Sandbox.run("sleep", "infinity", tags=[TAG], idle_timeout_seconds=1.0)
    idle.wait(timeout=60)
    assert idle.node not in (None, "local")
    idle.wait_until_complete(timeout=30, raise_on_termination=False).result(timeout=40)
    assert idle.status == aviato.SandboxStatus.TERMINATED and idle.status_reason == "idle"


# What the sandbox leaves for its snapshot: state, and what a hostile one would plant.
PREPARE = """
set -e
mkdir -p /work
echo ready > /work/state
ln /work/state /work/state-again
ln -s /etc/shadow /work/shadow
ln -s ../../../../.. /work/up
mkfifo /work/pipe
echo plain > /work/.wh.state
head -c 2097152 /dev/urandom > /work/random.bin
"""
CHECK = (
    "cat /work/state; readlink /work/shadow /work/up; stat -c %h /work/state-again;"
    " test -p /work/pipe && echo fifo; cat /work/.wh.state; sha256sum /work/random.bin"
)


def _copies(cluster: RayCluster, snapshot_id: str) -> int:
    return cluster.server_log.read_text().count(f"snapshot copied id={snapshot_id} ")


def _tree(cluster: RayCluster, node: str, snapshot_id: str) -> Path:
    return cluster.node_state_dir / node[:16] / "snapshots" / snapshot_id


def _started(sb: Sandbox) -> Sandbox:
    sb.wait(timeout=90)
    assert sb.get_status() == aviato.SandboxStatus.RUNNING, sb.status_reason
    return sb


def _run_from(snap: Snapshot, **selector: str) -> Sandbox:
    return _started(
        Sandbox.run("sleep", "infinity", tags=[TAG], snapshot=snap, node_selector=selector or None)
    )


def test_snapshots_forks_and_a_start_on_another_node(
    ray_cluster: RayCluster, on_w1: Sandbox
) -> None:
    sb = on_w1
    a = sb.node
    assert a is not None
    sb.exec(["sh", "-c", PREPARE]).result(timeout=60)
    expected = sb.exec(["sh", "-c", CHECK]).result().stdout
    snap = sb.snapshot().result(timeout=120)
    assert snap.id in {s.id for s in Snapshot.list().result()}
    assert _tree(ray_cluster, a, snap.id).is_dir()

    # Forks go to their source's node, each with its own changes.
    forks = sb.fork(2).result(timeout=120)
    try:
        assert {f.node for f in forks} == {a}
        forks[0].exec(["sh", "-c", "echo changed > /work/state"]).result()
        assert forks[1].exec(["cat", "/work/state"]).result().stdout == "ready\n"
    finally:
        for f in forks:
            f.stop(graceful_shutdown_seconds=0).result(timeout=30)

    # A plain start prefers the node that holds the snapshot (it has room): nothing copied.
    here = _run_from(snap)
    try:
        assert here.node == a
        assert here.exec(["sh", "-c", CHECK]).result().stdout == expected
    finally:
        here.stop(graceful_shutdown_seconds=0).result(timeout=30)
    assert _copies(ray_cluster, snap.id) == 0

    # Forced onto w2: copied there first (once), the same tree, the hostile entries as they were.
    t0 = time.monotonic()
    there = _run_from(snap, **{"aviato-test": "w2"})
    print(f"first start on another node (copy included): {time.monotonic() - t0:.2f} s")
    b = there.node
    assert b is not None and b != a
    try:
        assert there.exec(["sh", "-c", CHECK]).result().stdout == expected
        assert _copies(ray_cluster, snap.id) == 1
        again = _run_from(snap, **{"aviato.node": b})  # cached on b: nothing copied
        assert again.node == b
        assert again.exec(["cat", "/work/state"]).result().stdout == "ready\n"
        again.stop(graceful_shutdown_seconds=0).result(timeout=30)
        assert _copies(ray_cluster, snap.id) == 1
    finally:
        there.stop(graceful_shutdown_seconds=0).result(timeout=30)
    assert _tree(ray_cluster, b, snap.id).is_dir()

    # Survives a restart of the control plane (as does a pause: the node's kernel has it)...
    sb.pause().result()
    ray_cluster.stop_server()
    ray_cluster.start_server()
    assert snap.id in {s.id for s in Snapshot.list().result()}
    assert sb.get_status() == aviato.SandboxStatus.PAUSED
    sb.resume().result()
    on_b = _run_from(snap, **{"aviato.node": b})
    on_b.stop(graceful_shutdown_seconds=0).result(timeout=30)
    assert _copies(ray_cluster, snap.id) == 1

    # ... and of the node host that holds it.
    pids = re.findall(rf"node host ready on {a} .*?pid (\d+)", ray_cluster.server_log.read_text())
    os.kill(int(pids[-1]), signal.SIGKILL)
    deadline = time.monotonic() + 60
    while True:  # calls fail while Ray restarts the actor
        try:
            sb.exec(["true"]).result(timeout=10)
            break
        except aviato.AviatoError:
            assert time.monotonic() < deadline
            time.sleep(0.5)
    on_a = _run_from(snap, **{"aviato.node": a})
    assert on_a.exec(["cat", "/work/state"]).result().stdout == "ready\n"
    with pytest.raises(aviato.SandboxError, match="in use"):
        Snapshot.delete(snap).result(timeout=30)
    on_a.stop(graceful_shutdown_seconds=0).result(timeout=30)

    # Deleted from every node that holds it.
    Snapshot.delete(snap).result(timeout=60)
    assert not _tree(ray_cluster, a, snap.id).exists()
    assert not _tree(ray_cluster, b, snap.id).exists()
    with pytest.raises(aviato.AviatoError):
        Sandbox.run(tags=[TAG], snapshot=snap.id).wait(timeout=30)


def test_a_snapshot_of_sparse_files_is_refused_elsewhere_in_words(on_w1: Sandbox) -> None:
    """Its holes would travel as zeros: beyond its data bytes, the receiving node refuses."""
    sb = on_w1
    sb.exec(["sh", "-c", "rm -rf /work && mkdir /work && truncate -s 1G /work/sparse"]).result()
    snap = sb.snapshot().result(timeout=60)
    assert snap.size_bytes < 1 << 20
    try:
        elsewhere = Sandbox.run(tags=[TAG], snapshot=snap, node_selector={"aviato-test": "w2"})
        with pytest.raises(aviato.AviatoError):
            elsewhere.wait(timeout=60)
        assert "sparse" in (elsewhere.status_reason or ""), elsewhere.status_reason
        here = _run_from(snap, **{"aviato.node": str(sb.node)})  # where it was taken: fine
        assert here.exec(["stat", "-c", "%s", "/work/sparse"]).result().stdout == "1073741824\n"
        here.stop(graceful_shutdown_seconds=0).result(timeout=30)
    finally:
        with contextlib.suppress(aviato.AviatoError):
            elsewhere.stop().result(timeout=30)
        Snapshot.delete(snap).result(timeout=60)


def test_the_new_direct_channel_calls_refuse_calls_without_the_token(
    ray_cluster: RayCluster,
) -> None:
    addresses = set(
        re.findall(r"exec channel ([0-9.]+:[0-9]+)", ray_cluster.server_log.read_text())
    )
    assert addresses
    service = "/aviato.node.v1.NodeHost"
    for address in addresses:
        with grpc.insecure_channel(address) as channel:
            calls = [
                lambda c: c.unary_unary(f"{service}/PathOp")(
                    npb.PathOpRequest(sandbox_id="x", kind="stat", path="/").SerializeToString(),
                    timeout=10,
                ),
                lambda c: list(
                    c.unary_stream(f"{service}/ReadFileAt")(
                        npb.ReadFileAtRequest(
                            sandbox_id="x", root="/", rel="etc/shadow"
                        ).SerializeToString(),
                        timeout=10,
                        metadata=(("x-aviato-node-token", "guess"),),
                    )
                ),
                lambda c: c.stream_unary(f"{service}/WriteFileAt")(
                    iter([npb.WriteFileAtRequest(end=True).SerializeToString()]), timeout=10
                ),
                lambda c: list(
                    c.unary_stream(f"{service}/ExportSnapshot")(
                        npb.ExportSnapshotRequest(snapshot_id="snap-00000000").SerializeToString(),
                        timeout=10,
                    )
                ),
                lambda c: c.stream_unary(f"{service}/ImportSnapshot")(
                    iter([npb.ImportSnapshotRequest(end=True).SerializeToString()]), timeout=10
                ),
            ]
            for call in calls:
                with pytest.raises(grpc.RpcError) as info:
                    call(channel)
                assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
