"""Volumes and host directories against a real root service (docs/volumes.md).

What is proved here, each by a test that fails without its wall:

- a volume is shared by two sandboxes at once (one writes, the other reads while both run),
  persists across sandboxes and a restart of the service, and a read-only mount refuses writes;
- one owner's volume name is another volume for another owner; an owner who has no volume of
  a name gets the same NOT_FOUND whether or not another owner has one;
- a symlink planted in a volume resolves inside the next sandbox's own root (a host-only file
  stays out of reach), and neither measuring nor deleting the volume follows it on the host;
- a sandbox cannot make a device node in a volume, and the volume is mounted nosuid and nodev;
  what it chmods set-id lies in a directory only host root can enter;
- names with '/', '..' or too long are refused, and so are mount paths the image cannot take;
- host directories: only under an allowed tree, also after resolving symlinks; read-only;
- a sized volume is a hard bound: a sandbox that fills it gets ENOSPC and the host's disk holds
  at most its size for it; nonsense sizes are refused in words;
- an older (directory) volume keeps its files; filled past the service's bound it can no longer
  be mounted read-write (read-only still works);
- deleting a volume in use is refused, naming the sandbox; `aviato volume ls|rm` and `-v`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from _mounts import mounts_beneath
from reliability.harness import Client, Service, code_of, details_of, free_port, sdk_env

from aviato.server import auth
from aviato.server.registry import Registry
from aviato.v1 import sandbox_pb2 as pb
from aviato.v1 import sandbox_pb2_grpc as pbg

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the root service's volumes")

MiB = 1 << 20


def vol(path: str, name: str, read_only: bool = False) -> pb.DirectoryMount:
    return pb.DirectoryMount(path=path, volume=name, read_only=read_only)


def host(path: str, host_path: str) -> pb.DirectoryMount:
    return pb.DirectoryMount(path=path, host_path=host_path)


class World:
    """A root service over TCP with two owners (alice, bob), and an allowed host tree."""

    def __init__(self, *args: str) -> None:
        self.port = free_port()
        self.allowed = Path(os.environ.get("TMPDIR", "/tmp")) / f"avvol-{self.port}"
        self.outside = self.allowed.parent / f"avvol-out-{self.port}"
        (self.allowed / "imagenet").mkdir(parents=True)
        self.outside.mkdir()
        (self.allowed / "imagenet" / "label.txt").write_text("cat\n")
        (self.outside / "secret.txt").write_text("host only\n")
        os.symlink(self.outside, self.allowed / "escape")
        for directory in (self.allowed.parent, self.allowed, self.outside):
            os.chmod(directory, 0o755)
        self.svc = Service(
            "--listen", f"127.0.0.1:{self.port}", "--allow-host-mount", str(self.allowed), *args
        )
        self.svc.state_dir.mkdir(mode=0o700)
        reg = Registry(self.svc.state_dir / "registry.db")
        self.keys = {name: auth.create_key(reg, name, "vol")[1] for name in ("alice", "bob")}
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

    def stub(self) -> pbg.SandboxServiceStub:
        assert self.channel is not None
        return pbg.SandboxServiceStub(self.channel)  # type: ignore[no-untyped-call]

    def md(self, who: str) -> list[tuple[str, str]]:
        return [("authorization", f"Bearer {self.keys[who]}")]

    def client(self, who: str) -> Client:
        return Client(self.stub(), self.md(who), self.svc.record)

    def volumes(self, who: str) -> list[pb.Volume]:
        answer = self.stub().ListVolumes(pb.ListVolumesRequest(), metadata=self.md(who), timeout=30)
        return list(answer.volumes)

    def delete(self, who: str, name: str) -> None:
        self.stub().DeleteVolume(
            pb.DeleteVolumeRequest(name=name), metadata=self.md(who), timeout=30
        )

    def finish(self) -> None:
        if self.channel is not None:
            self.channel.close()
        self.svc.finish()
        subprocess.run(["rm", "-rf", str(self.allowed), str(self.outside)], check=False)

    def key(self, owner: str) -> str:
        return hashlib.sha256(owner.encode()).hexdigest()[:32]

    def volume_dir(self, owner: str, name: str) -> Path:
        """Where a volume's files are on the host: a sized volume's mounted filesystem, or an
        older directory volume's directory."""
        key = hashlib.sha256(owner.encode()).hexdigest()[:32]
        mounted = self.svc.state_dir / "volume-mounts" / key / name
        return mounted if mounted.exists() else self.svc.state_dir / "volumes" / key / name


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    w = World("--volume-max-size", "4Mi").start()
    try:
        yield w
    finally:
        w.finish()


def sh(client: Client, sandbox_id: str, script: str) -> tuple[int, str]:
    result = client.sh(sandbox_id, script)
    return result.exit_code, (result.stdout + result.stderr).decode(errors="replace")


def test_shared_by_two_at_once_persistent_across_a_restart_and_read_only(world: World) -> None:
    alice = world.client("alice")
    writer = alice.running(mounts=[vol("/cache", "shared")]).id
    reader = alice.running(mounts=[vol("/data", "shared", read_only=True)]).id
    code, out = sh(alice, writer, "echo one > /cache/f && id -u")
    assert code == 0, out
    code, out = sh(alice, reader, "cat /data/f")
    assert (code, out) == (0, "one\n")
    code, out = sh(alice, writer, "echo two >> /cache/f")  # both still run: live sharing
    assert sh(alice, reader, "cat /data/f") == (0, "one\ntwo\n")
    code, out = sh(alice, reader, "echo x > /data/g")
    assert code != 0 and "Read-only file system" in out
    # the mount is nosuid, nodev (and id-mapped: the sandbox's root owns what it wrote)
    code, out = sh(alice, writer, "grep ' /cache ' /proc/self/mountinfo; stat -c %u /cache/f")
    assert code == 0 and "nosuid" in out and "nodev" in out and out.endswith("0\n"), out
    on_host = world.volume_dir("alice", "shared") / "f"
    assert on_host.read_text() == "one\ntwo\n"
    for sid in (writer, reader):
        alice.stop(sid)
    world.restart()
    alice = world.client("alice")
    later = alice.running(mounts=[vol("/w", "shared")]).id
    assert sh(alice, later, "cat /w/f && echo three >> /w/f") == (0, "one\ntwo\n")
    alice.stop(later)
    assert on_host.read_text() == "one\ntwo\nthree\n"


def test_another_owners_volume_of_the_same_name_is_another_volume(world: World) -> None:
    alice, bob = world.client("alice"), world.client("bob")
    a = alice.running(mounts=[vol("/v", "private")]).id
    assert sh(alice, a, "echo alice-data > /v/mine")[0] == 0
    b = bob.running(mounts=[vol("/v", "private")]).id
    assert sh(bob, b, "ls -A /v") == (0, "")
    assert sh(bob, b, "echo bob-data > /v/mine")[0] == 0
    for client, sid in ((alice, a), (bob, b)):
        client.stop(sid)
    assert [v.name for v in world.volumes("bob")] == ["private"]
    assert "shared" not in [v.name for v in world.volumes("bob")]
    # bob deleting alice's volume: the answer is exactly that for a name nobody has
    with pytest.raises(grpc.RpcError) as theirs:
        world.delete("bob", "shared")
    with pytest.raises(grpc.RpcError) as nobodys:
        world.delete("bob", "nobody-has-this")
    assert code_of(theirs.value) == code_of(nobodys.value) == grpc.StatusCode.NOT_FOUND
    assert details_of(theirs.value).replace("shared", "X") == details_of(nobodys.value).replace(
        "nobody-has-this", "X"
    )
    assert (world.volume_dir("alice", "shared") / "f").exists()
    assert (world.volume_dir("bob", "private") / "mine").read_text() == "bob-data\n"
    world.delete("bob", "private")
    assert (world.volume_dir("alice", "private") / "mine").read_text() == "alice-data\n"


def test_a_planted_symlink_resolves_inside_the_next_sandbox(world: World) -> None:
    alice = world.client("alice")
    first = alice.running(mounts=[vol("/v", "links")]).id
    script = (
        f"ln -s {world.outside}/secret.txt /v/secret && ln -s /etc /v/etc && "
        f"ln -s {world.outside} /v/outside && ln -s / /v/root"
    )
    assert sh(alice, first, script)[0] == 0
    alice.stop(first)
    second = alice.running(mounts=[vol("/v", "links")]).id
    _code, out = sh(alice, second, "cat /v/secret 2>&1; ls /v/outside 2>&1")
    assert "host only" not in out and "No such file" in out, out
    # /v/etc is the sandbox's own /etc: read-only, whatever the host's /etc allows
    _, out = sh(alice, second, "echo pwned > /v/etc/aviato-volume-probe 2>&1; echo rc=$?")
    assert "rc=0" not in out
    assert not Path("/etc/aviato-volume-probe").exists()
    alice.stop(second)
    # the service measures and deletes the volume without following them
    listed = {v.name: v for v in world.volumes("alice")}
    assert listed["links"].size_bytes < MiB
    world.delete("alice", "links")
    assert (world.outside / "secret.txt").read_text() == "host only\n"
    assert Path("/etc/passwd").exists()


def test_no_device_nodes_and_set_id_files_stay_unreachable(world: World) -> None:
    alice = world.client("alice")
    sid = alice.running(mounts=[vol("/v", "bits")]).id
    code, out = sh(alice, sid, "mknod /v/null c 1 3 2>&1; echo rc=$?; mknod /v/sda b 8 0 2>&1")
    assert "rc=0" not in out and not (world.volume_dir("alice", "bits") / "null").exists()
    code, out = sh(
        alice,
        sid,
        "cp /bin/busybox /v/sh 2>/dev/null || cp /bin/sh /v/sh; chmod 4755 /v/sh && ls -l /v/sh",
    )
    assert code == 0, out
    alice.stop(sid)
    on_host = world.volume_dir("alice", "bits") / "sh"
    st = on_host.lstat()
    # The bit stays on the file (the sandbox's root owns it), but no host user other than root
    # can reach it: the owner's directory and everything above it are private to host root.
    for directory in (on_host.parent.parent, on_host.parent.parent.parent, world.svc.state_dir):
        mode = stat.S_IMODE(directory.stat().st_mode)
        assert mode & 0o077 == 0, (directory, oct(mode))
    nobody = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "test", "-e", str(on_host)],
        check=False,
    )
    assert nobody.returncode != 0
    assert st.st_mode & stat.S_ISUID  # documented: kept, unreachable, never honoured (nosuid)


@pytest.mark.parametrize(
    ("mount", "words"),
    [
        (vol("/v", "../x"), "not a volume name"),
        (vol("/v", "a/b"), "not a volume name"),
        (vol("/v", ".."), "not a volume name"),
        (vol("/v", "x" * 65), "at most 64"),
        (vol("/v/../etc", "ok"), "contains '..'"),
        (vol("relative", "ok"), "absolute"),
        (vol("/proc/x", "ok"), "reserved"),
        (vol("/", "ok"), "cannot replace"),
        (pb.DirectoryMount(path="/v"), "exactly one"),
    ],
)
def test_bad_names_and_paths_are_refused_in_words(
    world: World, mount: pb.DirectoryMount, words: str
) -> None:
    with pytest.raises(grpc.RpcError) as refused:
        world.client("alice").create(mounts=[mount])
    assert code_of(refused.value) == grpc.StatusCode.INVALID_ARGUMENT
    assert words in details_of(refused.value)
    assert "spec.mounts[0]" in details_of(refused.value)


def test_mount_paths_the_image_cannot_take_are_refused(world: World) -> None:
    alice = world.client("alice")
    for mounts, words in (
        ([vol("/usr/nonexistent", "ok")], "does not exist in the read-only"),
        ([vol("/a", "ok"), vol("/a/b", "ok2")], "inside another"),
    ):
        with pytest.raises(grpc.RpcError) as refused:
            alice.create(mounts=mounts)
        assert words in details_of(refused.value), details_of(refused.value)
    # an existing directory of a read-only tree may be covered
    sid = alice.running(mounts=[vol("/usr/local", "ok")]).id
    assert sh(alice, sid, "touch /usr/local/x && echo ok")[1] == "ok\n"
    alice.stop(sid)


def test_host_mounts_only_under_the_allowed_tree_and_read_only(world: World) -> None:
    alice = world.client("alice")
    sid = alice.running(mounts=[host("/datasets", str(world.allowed / "imagenet"))]).id
    assert sh(alice, sid, "cat /datasets/label.txt") == (0, "cat\n")
    code, out = sh(alice, sid, "touch /datasets/x 2>&1")
    assert code != 0 and "Read-only" in out
    alice.stop(sid)
    for asked, words in (
        (str(world.outside), "not under a directory the operator allows"),
        (str(world.allowed / "escape"), "leads through a symlink out of the allowed"),
        (str(world.allowed / "imagenet" / ".." / ".." / "avvol-out"), "contains '..'"),
        ("/etc", "not under a directory the operator allows"),
        (str(world.allowed / "imagenet" / "label.txt"), "is not a directory"),
    ):
        with pytest.raises(grpc.RpcError) as refused:
            alice.create(mounts=[host("/d", asked)])
        assert code_of(refused.value) == grpc.StatusCode.INVALID_ARGUMENT
        assert words in details_of(refused.value), (asked, details_of(refused.value))
        assert "host only" not in details_of(refused.value)


def test_a_sandbox_that_fills_a_volume_takes_no_more_of_the_hosts_disk_than_its_size(
    world: World,
) -> None:
    alice = world.client("alice")
    a = alice.running(mounts=[vol("/v", "fill")]).id
    b = alice.running(mounts=[vol("/w", "fill")]).id  # two writers at once: one bound
    code, out = sh(alice, a, "head -c 6000000 /dev/urandom > /v/big; echo rc=$?")
    assert "No space left on device" in out and "rc=0" not in out, out
    code, out = sh(alice, b, "head -c 100000 /dev/zero > /w/more")  # full for the other too
    assert code != 0 and "No space left on device" in out, out
    image = world.svc.state_dir / "volume-images" / world.key("alice") / "fill.img"
    assert image.stat().st_size == 4 * MiB
    assert image.stat().st_blocks * 512 <= 4 * MiB  # all the host's disk holds for it
    for sid in (a, b):
        alice.stop(sid)
    [fill] = [v for v in world.volumes("alice") if v.name == "fill"]
    assert fill.size_enforced and fill.max_size_bytes == 4 * MiB
    assert 2 * MiB < fill.size_bytes <= 4 * MiB  # its own metadata takes part of 4Mi
    world.delete("alice", "fill")
    assert not image.exists() and not world.volume_dir("alice", "fill").exists()


def _host_pids_of(sandbox_id: str) -> list[int]:
    """Host pids whose cgroup names the sandbox (its launcher's bwrap monitor among them)."""
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                if sandbox_id in Path(entry.path, "cgroup").read_text():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def test_a_sandbox_pins_only_the_volumes_it_mounts(world: World) -> None:
    """Each launcher detaches the volume filesystems from its mount namespace: a sandbox that
    started while another's volume was mounted holds no copy of it (which would keep its loop
    device and its image's blocks after a delete)."""
    alice = world.client("alice")
    user = alice.running(mounts=[vol("/v", "pinned")]).id
    bystander = alice.running().id
    mounted = str(world.volume_dir("alice", "pinned"))
    with open("/proc/self/mountinfo") as f:
        [device] = [line.split()[2] for line in f if line.split()[4] == mounted]

    def devices(sandbox_id: str) -> set[str]:
        found: set[str] = set()
        pids = _host_pids_of(sandbox_id)
        assert pids
        for pid in pids:
            with contextlib.suppress(FileNotFoundError):
                text = Path(f"/proc/{pid}/mountinfo").read_text()
                found.update(line.split()[2] for line in text.splitlines())
        return found

    assert device in devices(user)  # its launcher stages it (and its sandbox binds it)
    assert device not in devices(bystander)
    for sid in (user, bystander):
        alice.stop(sid)
    world.delete("alice", "pinned")


@pytest.mark.parametrize(
    ("size", "code", "words"),
    [
        (
            5 * MiB,
            grpc.StatusCode.INVALID_ARGUMENT,
            "is more than this service allows a volume (4Mi",
        ),
        (1000, grpc.StatusCode.INVALID_ARGUMENT, "is too small; a volume has at least 1Mi"),
        (-1, grpc.StatusCode.INVALID_ARGUMENT, "cannot be negative"),
        (2 * MiB, grpc.StatusCode.FAILED_PRECONDITION, "exists with size 3Mi"),
    ],
)
def test_nonsense_sizes_are_refused_in_words(
    world: World, size: int, code: grpc.StatusCode, words: str
) -> None:
    alice = world.client("alice")
    sid = alice.running(
        mounts=[pb.DirectoryMount(path="/v", volume="sized", size_bytes=3 * MiB)]
    ).id
    alice.stop(sid)
    with pytest.raises(grpc.RpcError) as refused:
        alice.create(mounts=[pb.DirectoryMount(path="/v", volume="sized", size_bytes=size)])
    assert code_of(refused.value) == code, details_of(refused.value)
    assert words in details_of(refused.value), details_of(refused.value)
    assert "spec.mounts[0]" in details_of(refused.value)


def test_an_older_directory_volume_keeps_its_files_and_its_measured_bound(world: World) -> None:
    """A volume made before sizes were enforced (a directory, `max_bytes` 0 in its row) is
    still mounted as it is; once it holds the service's bound it is mounted read-only only."""
    legacy = world.svc.state_dir / "volumes" / world.key("alice") / "full"
    legacy.mkdir(parents=True)
    os.chmod(legacy.parent, 0o700)
    (legacy / "big").write_bytes(os.urandom(6000000))
    reg = Registry(world.svc.state_dir / "registry.db")
    reg.volumes.insert("alice", "full", time.time_ns(), 0)
    reg.close()
    alice = world.client("alice")
    with pytest.raises(grpc.RpcError) as refused:
        alice.create(mounts=[vol("/v", "full")])
    assert code_of(refused.value) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert re.search(r"volume 'full' holds 5\.\d+Mi, its bound is 4Mi", details_of(refused.value))
    ro = alice.running(mounts=[vol("/v", "full", read_only=True)]).id
    assert sh(alice, ro, "wc -c < /v/big") == (0, "6000000\n")
    alice.stop(ro)
    world.delete("alice", "full")


def test_deleting_a_volume_in_use_is_refused_naming_the_sandbox(world: World) -> None:
    alice = world.client("alice")
    sid = alice.running(mounts=[vol("/v", "busy")]).id
    with pytest.raises(grpc.RpcError) as refused:
        world.delete("alice", "busy")
    assert code_of(refused.value) == grpc.StatusCode.FAILED_PRECONDITION
    assert f"in use by sandbox {sid}" in details_of(refused.value)
    [busy] = [v for v in world.volumes("alice") if v.name == "busy"]
    assert list(busy.used_by) == [sid]
    alice.stop(sid)
    world.delete("alice", "busy")
    assert not world.volume_dir("alice", "busy").exists()


def test_the_cli_mounts_lists_and_removes_volumes(world: World) -> None:
    env = sdk_env(world.svc)

    def aviato(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "aviato", *args], capture_output=True, text=True, env=env,
            timeout=120, check=False,
        )  # fmt: skip

    made = aviato("run", "-v", "clivol:/cache", "--", "sh", "-c", "echo from-cli > /cache/f")
    assert made.returncode == 0, made.stderr
    sid = aviato("run", "-v", "clivol:/c:ro", "-v", f"{world.allowed}/imagenet:/d").stdout.strip()
    out = aviato("exec", sid, "--", "sh", "-c", "cat /c/f /d/label.txt; touch /c/x")
    assert out.stdout == "from-cli\ncat\n" and out.returncode != 0
    listing = aviato("volume", "ls")
    assert "clivol" in listing.stdout and sid in listing.stdout, listing
    refused = aviato("volume", "rm", "clivol")
    assert refused.returncode == 1 and f"in use by sandbox {sid}" in refused.stderr
    assert aviato("stop", sid).returncode == 0
    assert aviato("volume", "rm", "clivol").stdout == "clivol\n"
    assert "clivol" not in aviato("volume", "ls").stdout
    bad = aviato("run", "-v", "../x:/c")
    assert bad.returncode == 2 and "volume name" in bad.stderr
    sized = aviato("run", "-v", "clisized:/s:rw,size=2Mi", "--", "true")
    assert sized.returncode == 0, sized.stderr
    [listed] = [v for v in json.loads(aviato("volume", "ls", "--json").stdout)
                if v["name"] == "clisized"]  # fmt: skip
    assert listed["max_size_bytes"] == 2 * MiB and listed["size_enforced"]
    assert aviato("volume", "rm", "clisized").returncode == 0
    for option, words in (("size=ten", "is not a size"), ("ro,rw", "expected NAME")):
        refused = aviato("run", "-v", f"x:/c:{option}")
        assert refused.returncode == 2 and words in refused.stderr, refused.stderr


def test_a_stop_keeps_mounted_only_the_volumes_of_sandboxes_that_outlive_it(world: World) -> None:
    """At its stop the service unmounts the volumes no live sandbox mounts, by owner: bob's
    volume of the same name as alice's goes while alice's, in use, stays for her sandbox."""
    alice, bob = world.client("alice"), world.client("bob")
    kept = alice.running(mounts=[vol("/v", "outlives")]).id
    gone = bob.running(mounts=[vol("/v", "outlives")]).id
    assert sh(alice, kept, "echo alice > /v/f")[0] == 0
    bob.stop(gone)
    root = world.svc.state_dir / "volume-mounts"
    assert world.channel is not None
    world.channel.close()
    assert world.svc.stop() == 0
    assert mounts_beneath(root) == [str(world.volume_dir("alice", "outlives")), str(root)]
    world.start()  # re-attaches alice's sandbox, which still has its volume
    alice = world.client("alice")
    assert sh(alice, kept, "echo more >> /v/f; cat /v/f") == (0, "alice\nmore\n")
    alice.stop(kept)
    for who in ("alice", "bob"):
        world.delete(who, "outlives")
