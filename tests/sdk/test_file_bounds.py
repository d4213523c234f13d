"""A sandbox's files cannot exhaust the client: whole reads are capped with a clear error, and big
files are read as chunks or into a local file in bounded memory (also by ``aviato cp``).

The sandbox is the attacker: a sparse file of 1 GiB costs it nothing, and used to cost the
client 2.1 GiB in `read_file`. Memory is measured in child processes (their own peak resident
set, VmHWM: ``ru_maxrss`` would carry pytest's own peak across fork and exec).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from aviato import FileStream, Sandbox, SandboxDefaults, SandboxFileError

from .conftest import TEST_TAG

MiB = 1024 * 1024
GiB = 1024 * MiB
SPARSE = "/tmp/sparse-1g"


@pytest.fixture(scope="module")
def big(sandbox: Sandbox) -> Sandbox:
    """The module's sandbox, holding a sparse 1 GiB file and a dense 200 MiB one."""
    sandbox.exec(["truncate", "-s", "1G", SPARSE], check=True).result(timeout=60)
    sandbox.exec(["sh", "-c", "head -c 200M /dev/urandom > /tmp/dense"], check=True).result(
        timeout=120
    )
    return sandbox


def sha256_in(sandbox: Sandbox, path: str) -> str:
    return sandbox.exec(["sha256sum", path]).result(timeout=120).stdout.split()[0]


def run_child(sandbox_id: str, body: str) -> dict[str, Any]:
    """Runs an SDK script with `sb` attached to the sandbox; returns its JSON report, with the
    child's resident set after attaching (`base`) and at its peak (`peak`)."""
    code = textwrap.dedent(
        f"""
        import json
        from aviato import Sandbox
        def status(field):
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith(field + ":"):
                        return int(line.split()[1]) * 1024
        def rss():
            return status("VmRSS")
        def hwm():
            return status("VmHWM")
        sb = Sandbox.from_id({sandbox_id!r}).result()
        sb.exec(["true"]).result()
        base = rss()
        def report(**kw):
            peak = hwm()
            print(json.dumps(dict(base=base, peak=peak, **kw)), flush=True)
        """
    ) + textwrap.dedent(body)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


def test_read_file_of_a_huge_sparse_file_is_refused_before_it_moves(big: Sandbox) -> None:
    report = run_child(
        big.sandbox_id or "",
        f"""
        import time
        from aviato import SandboxFileError
        t = time.monotonic()
        try:
            sb.read_file({SPARSE!r}).result()
            report(error=None)
        except SandboxFileError as e:
            report(error=str(e), filepath=e.filepath, seconds=time.monotonic() - t)
        """,
    )
    message = report["error"]
    assert message is not None, "a 1 GiB file was read whole"
    assert report["filepath"] == SPARSE
    for part in (SPARSE, "1 GiB", "1073741824 bytes", "64 MiB", "read_file_streaming",
                 "download_file", "max_bytes"):  # fmt: skip
        assert part in message, (part, message)
    assert report["seconds"] < 5
    # at most gRPC's receive window arrived before the refusal: not the file
    assert report["peak"] - report["base"] < 48 * MiB, (report["peak"] - report["base"]) / MiB


def test_the_cap_is_configurable(big: Sandbox) -> None:
    big.exec(["sh", "-c", "head -c 3000 /dev/zero > /tmp/3000"], check=True).result()
    assert len(big.read_file("/tmp/3000", max_bytes=3000).result(timeout=60)) == 3000
    with pytest.raises(SandboxFileError, match=r"max_bytes=2\.93 KiB"):
        big.read_file("/tmp/3000", max_bytes=2999).result(timeout=60)
    with Sandbox.run(defaults=SandboxDefaults(max_read_file_bytes=10, tags=(TEST_TAG,))) as sb:
        sb.exec(
            ["sh", "-c", "printf 0123456789 > /tmp/ten; printf 01234567890 > /tmp/eleven"],
            check=True,
        ).result(timeout=60)
        assert sb.read_file("/tmp/ten").result(timeout=60) == b"0123456789"
        with pytest.raises(SandboxFileError, match="11 bytes"):
            sb.read_file("/tmp/eleven").result(timeout=60)
        assert sb.read_file("/tmp/eleven", max_bytes=11).result(timeout=60) == b"01234567890"
    for bad in (-1, 2.5, "1M", True):
        with pytest.raises((TypeError, ValueError), match="max_bytes"):
            big.read_file("/tmp/3000", max_bytes=bad)  # type: ignore[arg-type]
        with pytest.raises((TypeError, ValueError), match="max_read_file_bytes"):
            SandboxDefaults(max_read_file_bytes=bad)  # type: ignore[arg-type]


def test_a_file_of_unknown_size_is_read_and_cannot_outgrow_the_cap(big: Sandbox) -> None:
    """/proc files announce a size of 0 (not known in advance): they are read whole (they used
    to fail as "truncated: N of 0 bytes"), and whatever arrives counts against the cap."""
    status = big.read_file("/proc/self/status").result(timeout=60)
    assert status.startswith(b"Name:") and len(status) > 100
    assert b"".join(big.read_file_streaming("/proc/self/status")).startswith(b"Name:")
    with pytest.raises(SandboxFileError, match="size was not known in advance") as info:
        big.read_file("/proc/self/status", max_bytes=100).result(timeout=60)
    assert info.value.filepath == "/proc/self/status"


@pytest.mark.slow
def test_read_file_streaming_sync_and_async_in_bounded_memory(big: Sandbox) -> None:
    report = run_child(
        big.sandbox_id or "",
        f"""
        import asyncio, hashlib
        stream = sb.read_file_streaming({SPARSE!r})
        n = sum(len(chunk) for chunk in stream)
        size = stream.size
        async def main():
            h = hashlib.sha256()
            async with sb.read_file_streaming("/tmp/dense") as s:
                async for chunk in s:
                    h.update(chunk)
            return h.hexdigest()
        report(n=n, size=size, digest=asyncio.run(main()))
        """,
    )
    assert report["n"] == GiB and report["size"] == GiB
    assert report["digest"] == sha256_in(big, "/tmp/dense")
    assert report["peak"] - report["base"] < 48 * MiB, (report["peak"] - report["base"]) / MiB


@pytest.mark.slow
def test_download_file_in_bounded_memory(big: Sandbox, tmp_path: Path) -> None:
    target = tmp_path / "dense.bin"
    report = run_child(
        big.sandbox_id or "",
        f"""
        n = sb.download_file("/tmp/dense", {str(target)!r}).result()
        report(n=n)
        """,
    )
    assert report["n"] == 200 * MiB == target.stat().st_size
    assert hashlib.sha256(target.read_bytes()).hexdigest() == sha256_in(big, "/tmp/dense")
    assert report["peak"] - report["base"] < 48 * MiB, (report["peak"] - report["base"]) / MiB
    assert [p.name for p in tmp_path.iterdir()] == ["dense.bin"]  # no temporary file left


def test_download_file_errors(big: Sandbox, tmp_path: Path) -> None:
    with pytest.raises(IsADirectoryError, match="local_path"):
        big.download_file("/tmp/dense", tmp_path)
    with pytest.raises(FileNotFoundError, match="no such directory"):
        big.download_file("/tmp/dense", tmp_path / "missing" / "x")
    with pytest.raises(SandboxFileError) as info:
        big.download_file("/tmp/absent", tmp_path / "x").result(timeout=60)
    assert info.value.filepath == "/tmp/absent"
    assert list(tmp_path.iterdir()) == []  # the temporary file was removed
    big.exec(["sh", "-c", "printf x > /tmp/moded; chmod 6777 /tmp/moded"], check=True).result()
    big.download_file("/tmp/moded", tmp_path / "moded").result(timeout=60)
    assert (tmp_path / "moded").stat().st_mode & 0o7777 == 0o755  # no set-id, no o+w/g+w


def test_a_stream_stops_early_and_reports_errors(big: Sandbox) -> None:
    with big.read_file_streaming(SPARSE) as stream:
        assert isinstance(stream, FileStream)
        assert len(next(iter(stream))) > 0
    assert list(stream) == []  # closed: iteration ends
    with pytest.raises(SandboxFileError) as info:
        list(big.read_file_streaming("/tmp/absent"))
    assert info.value.filepath == "/tmp/absent"

    async def absent() -> None:
        async for _chunk in big.read_file_streaming("/tmp/absent"):
            pass

    with pytest.raises(SandboxFileError):
        asyncio.run(absent())


# Runs `aviato ARGS...` and, as it exits, writes its peak resident set (VmHWM: its own, where
# ru_maxrss would carry pytest's across fork and exec) to stderr.
_CLI_WITH_PEAK = """
import atexit, runpy, sys
def peak():
    with open("/proc/self/status") as f:
        hwm = [line.split()[1] for line in f if line.startswith("VmHWM:")][0]
    sys.stderr.write(f"\\nVmHWM {int(hwm) * 1024}\\n")
atexit.register(peak)
sys.argv = ["aviato", *sys.argv[1:]]
runpy.run_module("aviato", run_name="__main__")
"""


def _cli_peak(args: list[str], stdout: Any) -> tuple[int, int]:
    """Runs the CLI; returns (exit status, peak resident set in bytes) of that process alone."""
    proc = subprocess.run(
        [sys.executable, "-c", _CLI_WITH_PEAK, *args],
        stdout=stdout,
        stderr=subprocess.PIPE,
        text=True,
        timeout=300,
    )
    peak = int(proc.stderr.rsplit("VmHWM ", 1)[1].split()[0])
    return proc.returncode, peak


@pytest.mark.slow
def test_aviato_cp_streams_in_bounded_memory(big: Sandbox, tmp_path: Path) -> None:
    baseline_code, baseline = _cli_peak(["version"], subprocess.DEVNULL)
    assert baseline_code == 0
    code, peak = _cli_peak(["cp", f"{big.sandbox_id}:{SPARSE}", "-"], subprocess.DEVNULL)
    assert code == 0
    assert peak - baseline < 64 * MiB, (peak - baseline) / MiB
    target = tmp_path / "dense"
    code, peak = _cli_peak(["cp", "-q", f"{big.sandbox_id}:/tmp/dense", str(target)], None)
    assert code == 0 and target.stat().st_size == 200 * MiB
    assert peak - baseline < 64 * MiB, (peak - baseline) / MiB
    assert hashlib.sha256(target.read_bytes()).hexdigest() == sha256_in(big, "/tmp/dense")
    big.exec(["sh", "-c", "printf x > /tmp/cp-moded; chmod 6777 /tmp/cp-moded"], check=True).result(
        timeout=60
    )
    code, _ = _cli_peak(["cp", "-q", f"{big.sandbox_id}:/tmp/cp-moded", str(tmp_path)], None)
    assert code == 0 and (tmp_path / "cp-moded").stat().st_mode & 0o7777 == 0o755


def test_a_refused_or_abandoned_read_does_not_stall_the_sandbox(big: Sandbox) -> None:
    """A read the client gives up on (refused for its size, closed early) must be closed in the
    service too: its unread chunks used to pile up on the sandbox's supervisor connection until
    it stopped reading, and every later command of the sandbox hung."""
    with pytest.raises(SandboxFileError):
        big.read_file(SPARSE).result(timeout=60)
    assert big.exec(["echo", "after refusal"]).result(timeout=10).stdout == "after refusal\n"
    stream = big.read_file_streaming(SPARSE)
    next(iter(stream))
    stream.close()
    assert big.exec(["echo", "after close"]).result(timeout=10).stdout == "after close\n"
    assert big.read_file("/tmp/3000").result(timeout=10) == b"\0" * 3000
