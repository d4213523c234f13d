"""Crafted image layers against the unpack: nothing of the host may be touched, whatever the layer.

Each attack is an image pushed to a real registry on 127.0.0.1 and pulled by a real service
running as root (image_support.py). The target is a canary directory of the test on the host:
its files' modes, times, link counts and contents must be exactly as before, whether the pull
succeeds (the attack contained inside the image root) or fails with a clear error.
"""

from __future__ import annotations

import concurrent.futures
import os
import stat
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .image_support import Canary, Entry, Lab, busybox_layer, lab, layer, raw_layer, zeros_layer


@pytest.fixture(scope="module")
def env() -> Iterator[Lab]:
    with lab() as the_lab:
        yield the_lab


@pytest.fixture
def canary(env: Lab) -> Canary:
    return Canary(env.base / f"canary-{time.monotonic_ns()}")


def climb(path: Path) -> str:
    """A relative symlink target that climbs from anywhere to `path` on the host."""
    return "../" * 40 + str(path).lstrip("/")


@pytest.mark.slow
def test_a_directory_swapped_for_a_symlink_never_chmods_the_host(env: Lab, canary: Canary) -> None:
    """The critical one: `x/` (mode 4777) then `x -> host file`; the directory modes applied at
    the end of the layer used to follow the symlink and chmod (and utime) the host's file."""
    ref = env.push("attack/chmod", [layer([
        Entry("x", kind="dir", mode=0o4777),
        Entry("x", kind="symlink", link=str(canary.file)),
        Entry("rel", kind="dir", mode=0o4777),
        Entry("rel", kind="symlink", link=climb(canary.file)),
        Entry("d", kind="dir"),
        Entry("d/x", kind="dir", mode=0o4777),
        Entry("d", kind="symlink", link=str(canary.dir)),
    ])])  # fmt: skip
    before = canary.state()
    ok, digest = env.pull(ref)
    assert canary.state() == before
    assert ok, digest
    assert (env.rootfs(digest) / "x").is_symlink()  # contained: the link is in the image


def test_whiteouts_under_symlinked_parents_stay_inside(env: Lab, canary: Canary) -> None:
    ref = env.push("attack/whiteout", [
        layer([Entry("w", kind="symlink", link=str(canary.dir)),
               Entry("r", kind="symlink", link=climb(canary.dir))]),
        layer([Entry("w/.wh.victim"), Entry("r/.wh.victim"), Entry("w/.wh.x"),
               Entry("r/.wh..wh..opq"), Entry("w/.wh..wh..opq"),
               Entry("s", kind="dir"), Entry("s/victim", data=b"mine"),
               Entry("s", kind="symlink", link=str(canary.dir)), Entry("s/.wh.victim"),
               Entry("s/.wh..wh..opq")]),
    ])  # fmt: skip
    before = canary.state()
    ok, detail = env.pull(ref)
    assert canary.state() == before
    assert ok, detail


def test_hard_links_never_reach_host_files(env: Lab, canary: Canary) -> None:
    direct = env.push("attack/hardlink", [layer([
        Entry("h", kind="hardlink", hardlink=str(canary.file).lstrip("/")),
    ])])  # fmt: skip
    via_link = env.push("attack/hardlink-via", [
        layer([Entry("s", kind="symlink", link=str(canary.dir))]),
        layer([Entry("h", kind="hardlink", hardlink="s/canary")]),
    ])  # fmt: skip
    before = canary.state()
    for ref in (direct, via_link):
        ok, detail = env.pull(ref)
        assert not ok and "hard link" in detail, detail
    assert canary.state() == before


@pytest.mark.parametrize("name", ["../escape", "/abs/escape", "a/../../escape", "./../escape"])
def test_absolute_and_climbing_names_are_refused(env: Lab, canary: Canary, name: str) -> None:
    tag = str(abs(hash(name)))
    env.pusher.image("attack/names", tag, [layer([Entry(name, data=b"x")])])
    ok, detail = env.pull(env.ref("attack/names", tag))
    assert not ok and ("absolute" in detail or "climbs" in detail), detail


def test_writes_through_climbing_symlinks_stay_inside(env: Lab, canary: Canary) -> None:
    ref = env.push("attack/climb", [
        layer([Entry("up", kind="symlink", link=climb(canary.dir)),
               Entry("abs", kind="symlink", link=str(canary.dir)),
               Entry("dot", kind="symlink", link="/../../..")]),
        layer([Entry("up/pwned", data=b"x"), Entry("abs/pwned2", data=b"y"),
               Entry("abs/canary", data=b"replaced"), Entry("abs/x/deeper", kind="dir"),
               Entry(f"dot/{str(canary.dir).lstrip('/')}/pwned3", data=b"z")]),
    ])  # fmt: skip
    before = canary.state()
    ok, digest = env.pull(ref)
    assert canary.state() == before
    assert ok, digest
    inside = env.rootfs(digest) / str(canary.dir).lstrip("/")
    assert (inside / "pwned").read_bytes() == b"x" and (
        inside / "canary"
    ).read_bytes() == b"replaced"


def test_working_dir_through_a_symlink_is_made_inside(env: Lab, canary: Canary) -> None:
    ref = env.push("attack/workdir", [layer([
        Entry("wd", kind="symlink", link=str(canary.dir)),
        Entry("rel", kind="symlink", link=climb(canary.dir)),
    ])], working_dir="/wd/made/here")  # fmt: skip
    ref2 = env.push("attack/workdir2", [layer([
        Entry("rel", kind="symlink", link=climb(canary.dir)),
    ])], working_dir="/rel/x/made")  # fmt: skip
    before = canary.state()
    for r in (ref, ref2):
        ok, digest = env.pull(r)
        assert ok, digest
        assert (env.rootfs(digest) / str(canary.dir).lstrip("/")).is_dir()
    assert canary.state() == before


def _passwd_user(env: Lab, repo: str, passwd: Entry) -> str:
    return env.push(repo, [busybox_layer(), layer([passwd])], user="evil")


@pytest.mark.slow
def test_etc_passwd_as_a_symlink_to_a_host_file_is_read_inside(env: Lab, canary: Canary) -> None:
    host_passwd = canary.dir / "passwd"
    host_passwd.write_bytes(b"evil:x:4242:4242::/:/bin/sh\n")
    for repo, link in (("attack/pw-abs", str(host_passwd)), ("attack/pw-rel", climb(host_passwd))):
        ref = _passwd_user(env, repo, Entry("etc/passwd", kind="symlink", link=link))
        rec = env.svc.client().create(image=ref)
        done = env.svc.client().wait(rec.id, terminal=True, timeout=120)
        assert "'evil' is not in the image's /etc/passwd" in done.status_reason, done


def test_etc_passwd_as_a_fifo_fails_fast(env: Lab) -> None:
    fifo = tarfile.TarInfo("etc/passwd")
    fifo.type = tarfile.FIFOTYPE
    fifo.mode = 0o644
    ref = env.push("attack/pw-fifo", [busybox_layer(), raw_layer([(fifo, None)])], user="app")
    start = time.monotonic()
    rec = env.svc.client().create(image=ref)
    done = env.svc.client().wait(rec.id, terminal=True, timeout=120)
    assert "'app' is not in the image's /etc/passwd" in done.status_reason, done
    assert time.monotonic() - start < 60


@pytest.mark.slow
def test_a_sparse_layer_entry_is_refused(env: Lab, canary: Canary) -> None:
    """A 10 GiB sparse /etc/passwd in 1 KiB of layer: tarfile would write its holes out as
    10 GiB of zeros onto the host's disk."""
    content = b"app:x:1000:1000::/home/app:/bin/sh\n"
    sparse_map = b"1\n0\n%d\n" % len(content)
    data = sparse_map.ljust(512, b"\0") + content.ljust(512, b"\0")
    info = tarfile.TarInfo("etc/GNUSparseFile.0/passwd")
    info.size = len(data)
    info.pax_headers = {"GNU.sparse.major": "1", "GNU.sparse.minor": "0",
                        "GNU.sparse.name": "etc/passwd",
                        "GNU.sparse.realsize": str(10 << 30)}  # fmt: skip
    ref = env.push("attack/sparse", [busybox_layer(), raw_layer([(info, data)])], user="app")
    ok, detail = env.pull(ref)
    assert not ok and "sparse" in detail, detail
    assert env.tmp_entries() == []


def test_a_huge_sparse_passwd_in_the_root_is_not_read(env: Lab) -> None:
    """However a 10 GiB (sparse) /etc/passwd got into a root, resolving `User` does not read it."""
    ref = env.push("attack/pw-huge", [busybox_layer()], user="app")
    ok, digest = env.pull(ref)
    assert ok, digest
    passwd = env.rootfs(digest) / "etc/passwd"
    passwd.unlink()
    with open(passwd, "wb") as f:
        f.truncate(10 << 30)
    peak_before = _peak_rss_kib(env.svc.pid)
    rec = env.svc.client().create(image=ref)
    done = env.svc.client().wait(rec.id, terminal=True, timeout=120)
    assert "'app' is not in the image's /etc/passwd" in done.status_reason, done
    assert _peak_rss_kib(env.svc.pid) - peak_before < 64 << 10


def _peak_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


@pytest.mark.slow
def test_a_huge_tar_header_is_refused_before_it_is_read(env: Lab) -> None:
    """A PAX header record claiming 2 GiB (2 MiB of gzip): tarfile reads a header whole."""
    header = tarfile.TarInfo("././@PaxHeader")
    header.type = tarfile.XHDTYPE
    header.size = 2 << 30
    ref = env.push("attack/paxbomb", [zeros_layer(header.tobuf(tarfile.USTAR_FORMAT), 2 << 30)])
    peak_before = _peak_rss_kib(env.svc.pid)
    ok, detail = env.pull(ref)
    assert not ok and "header" in detail, detail
    assert _peak_rss_kib(env.svc.pid) - peak_before < 256 << 10
    assert env.tmp_entries() == []


@pytest.mark.slow
def test_swaps_raced_by_concurrent_pulls_under_nice(env: Lab, canary: Canary) -> None:
    """The swap attacks as second layers, ten images pulled five at a time: unpack threads
    competing for the CPU (run the suite under `nice`, as the house does)."""
    swap = layer(
        [
            Entry("d", kind="dir", mode=0o4777),
            Entry("d/x", kind="dir", mode=0o4777),
            Entry("d", kind="symlink", link=str(canary.dir)),
            Entry("e", kind="dir", mode=0o777),
            Entry("e", kind="symlink", link=climb(canary.file)),
            Entry("w", kind="symlink", link=str(canary.dir)),
            Entry("w/.wh.victim"),
        ]
    )
    refs = []
    for i in range(10):
        filler = layer(
            [
                Entry(f"f{i}", kind="dir"),
                *(Entry(f"f{i}/{j}", data=os.urandom(512)) for j in range(300)),
            ]
        )
        refs.append(env.push(f"attack/race{i}", [filler, swap]))
    before = canary.state()
    with concurrent.futures.ThreadPoolExecutor(5) as pool:
        results = list(pool.map(env.pull, refs))
    assert canary.state() == before
    assert all(ok for ok, _ in results), results


@pytest.mark.slow
def test_set_id_bits_never_reach_the_hosts_disk(env: Lab) -> None:
    """A setuid-root binary in a layer is stored without its set-id bits (and inside a sandbox
    no_new_privs would make them inert: NoNewPrivs is checked too)."""
    ref = env.push("attack/suid", [busybox_layer([
        Entry("bin/suid", data=b"#!/bin/sh\nid\n", mode=0o4755),
        Entry("bin/sgid", data=b"x", mode=0o2755),
        Entry("setgid-dir", kind="dir", mode=0o2775),
        Entry("bin/hard", kind="hardlink", hardlink="bin/suid"),
    ])])  # fmt: skip
    ok, digest = env.pull(ref)
    assert ok, digest
    root = env.rootfs(digest)
    for name in ("bin/suid", "bin/sgid", "setgid-dir", "bin/hard"):
        mode = (root / name).lstat().st_mode
        assert not mode & (stat.S_ISUID | stat.S_ISGID), (name, oct(mode))
    assert stat.S_IMODE((root / "bin/suid").stat().st_mode) == 0o755
    sb = env.svc.client().running(image=ref)
    r = env.svc.client().exec(sb.id, ["cat", "/proc/self/status"])
    assert "NoNewPrivs:\t1" in r.stdout.decode(), r.stdout


@pytest.mark.slow
def test_a_layer_too_deep_is_refused(env: Lab) -> None:
    """A layer 600 directories deep is refused with a clear error: the walk holds one
    descriptor per level, so the depth is bounded."""
    deep = "/".join(["d"] * 600)
    ref = env.push("attack/deep", [layer([Entry(deep + "/f", data=b"x")])])
    ok, detail = env.pull(ref)
    assert not ok and "deep" in detail, detail
    assert env.tmp_entries() == []


def test_a_working_dir_through_an_image_symlink_says_nothing_of_host_paths(
    env: Lab, canary: Canary
) -> None:
    """A sandbox's working directory (or mounted file) inside the image's read-only trees is
    checked in the image: a symlink there to a host path must not tell whether that host path
    exists (the check ran as root on the host, following the symlink: an existence oracle)."""
    ref = env.push("attack/oracle", [busybox_layer([
        Entry("bin/there", kind="symlink", link=str(canary.sub)),
        Entry("bin/absent", kind="symlink", link=str(canary.dir / "no-such-dir")),
        Entry("bin/file-there", kind="symlink", link=str(canary.file)),
        Entry("bin/file-absent", kind="symlink", link=str(canary.dir / "no-such-file")),
    ])])  # fmt: skip
    ok, detail = env.pull(ref)
    assert ok, detail
    reasons = []
    for spec in ({"working_dir": "/bin/there"}, {"working_dir": "/bin/absent"},
                 {"mounted": [("/bin/file-there", b"x")]},
                 {"mounted": [("/bin/file-absent", b"x")]}):  # fmt: skip
        rec = env.svc.client().create(image=ref, **spec)
        done = env.svc.client().wait(rec.id, terminal=True, timeout=60)
        reasons.append(done.status_reason.replace("absent", "X").replace("there", "X"))
    assert reasons[0] == reasons[1] and reasons[2] == reasons[3], reasons


def test_removing_an_image_never_follows_its_symlinks(env: Lab, canary: Canary) -> None:
    """`aviato image rm` of a root full of symlinks to host paths, and of directories without
    any permission: the root goes, the host's files stay."""
    from aviato.v1 import images_pb2 as ipb
    from aviato.v1 import images_pb2_grpc

    ref = env.push("attack/rm", [layer([
        Entry("abs", kind="symlink", link=str(canary.dir)),
        Entry("rel", kind="symlink", link=climb(canary.dir)),
        Entry("file", kind="symlink", link=str(canary.file)),
        Entry("closed", kind="dir", mode=0o000),
        Entry("closed/inner", kind="dir", mode=0o000),
        Entry("closed/inner/f", data=b"x", mode=0o000),
    ])])  # fmt: skip
    ok, digest = env.pull(ref)
    assert ok, digest
    before = canary.state()
    stub = images_pb2_grpc.ImageServiceStub(env.svc.channel())  # type: ignore[no-untyped-call]
    stub.RemoveImage(ipb.RemoveImageRequest(image=ref), timeout=60)
    assert not env.rootfs(digest).exists()
    assert canary.state() == before
    assert env.tmp_entries() == []


def _global_header(key: str, value: str) -> bytes:
    """One PAX global header record (typeflag g) holding `key=value`, padded to blocks."""
    body = f" {key}={value}\n"
    length = len(body) + 1
    while len(str(length)) + len(body) != length:
        length = len(str(length)) + len(body)
    payload = f"{length}{body}".encode()
    info = tarfile.TarInfo("pax_global_header")
    info.type = tarfile.XGLTYPE
    info.size = len(payload)
    pad = (-len(payload)) % 512
    return info.tobuf(tarfile.USTAR_FORMAT) + payload + b"\0" * pad


@pytest.mark.slow
def test_chains_and_piles_of_tar_headers_are_refused(env: Lab) -> None:
    """5000 header records in a row (tarfile recursed once per record: a RecursionError, an
    internal error), and 200 global headers of 512 KiB kept for the whole layer (memory)."""
    import gzip

    from .image_support import sha

    chain = b"".join(_global_header(f"k{i}", "v") for i in range(5000))
    filler = tarfile.TarInfo("f").tobuf(tarfile.USTAR_FORMAT)
    pile = b"".join(_global_header(f"k{i}", "x" * (512 << 10)) + filler for i in range(200))
    peak_before = _peak_rss_kib(env.svc.pid)
    for name, raw in (("chain", chain), ("pile", pile)):
        raw += b"\0" * 1024
        ref = env.push(f"attack/headers-{name}", [(gzip.compress(raw, mtime=0), sha(raw))])
        ok, detail = env.pull(ref)
        assert not ok and "header" in detail and not detail.startswith("INTERNAL"), detail
    assert _peak_rss_kib(env.svc.pid) - peak_before < 128 << 10
    assert env.tmp_entries() == []
