"""A command's output cannot exhaust the client: streaming runs in bounded memory, a slow reader
holds the command back, and ``.result()`` keeps a capped amount and says so.

The sandbox is the attacker: ``yes`` without end, or half a gigabyte at once. Memory is measured
in a child client process (its own resident set, sampled while it streams, and its peak VmHWM:
not ru_maxrss, which a child inherits from pytest across fork and exec), so the figures are the
SDK's alone. Before these walls, streaming 512 MiB cost the client
1.6 GiB and ``yes`` grew it until it was killed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from typing import Any

import pytest

from aviato import ProcessResult, Sandbox, SandboxDefaults, SandboxExecutionError

from .conftest import TEST_TAG

MiB = 1024 * 1024
DEFAULT_CAP = 64 * MiB

# Prepended to every child script: RSS sampling and the report.
PRELUDE = """
import json, sys, threading, time
from aviato import Sandbox, SandboxDefaults

def status(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0

def rss():
    return status("VmRSS")

def hwm():
    # the peak of this process's own memory: VmHWM starts afresh at exec, while ru_maxrss
    # keeps the parent's (pytest's) peak across fork and exec
    return status("VmHWM")

samples = []
running = [None]  # the Process whose end the samples note
def sample():
    while True:
        p = running[0]
        samples.append((time.monotonic(), rss(), p is not None and p.done()))
        time.sleep(0.1)

sb = Sandbox.run(tags=[TAG])
sb.wait()
sb.exec(["true"]).result()  # the channel and the loop are up: this is the baseline
base = rss()
threading.Thread(target=sample, daemon=True).start()

def report(**kw):
    sb.stop(graceful_shutdown_seconds=0).result()
    peak = hwm()
    print(json.dumps(dict(base=base, peak=peak, samples=samples, **kw)), flush=True)
"""


def run_client(body: str, timeout: float = 240) -> dict[str, Any]:
    code = f"TAG = {TEST_TAG!r}\n" + PRELUDE + textwrap.dedent(body)
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=os.environ.copy(),
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-2000:]}\nstderr:\n{proc.stderr[-4000:]}"
    out: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


def growth(report: dict[str, Any]) -> int:
    """How far the child's resident set rose above its baseline, at its peak."""
    return int(report["peak"]) - int(report["base"])


def _figures(name: str, report: dict[str, Any]) -> None:
    # kept in the test log for the record (pytest -s shows them)
    print(f"{name}: base {report['base'] / MiB:.0f} MiB, peak {report['peak'] / MiB:.0f} MiB")


@pytest.mark.slow
def test_streaming_yes_for_seconds_sync_runs_in_bounded_memory() -> None:
    report = run_client(
        """
        p = running[0] = sb.exec(["timeout", "8", "yes"])
        n = 0
        for chunk in p.stdout:
            n += len(chunk)
        r = p.result()
        report(n=n, rc=r.returncode, kept=len(r.stdout_bytes), cut=r.stdout_truncated)
        """
    )
    _figures(f"yes for 8 s, {report['n'] / MiB:.0f} MiB streamed", report)
    assert report["n"] > DEFAULT_CAP + 64 * MiB, report["n"]  # it really flooded
    assert report["rc"] == 124  # timeout's code: the exit code arrived
    assert report["kept"] == DEFAULT_CAP and report["cut"] is True
    # While it ran: the head kept for the result (64 MiB), the window, gRPC's buffers and
    # allocator slack, and no growth with time (the second half no higher than the first).
    # (the last half second left out: the result is being built then)
    during = [(t, r) for t, r, done in report["samples"] if not done][:-5]
    mid = during[len(during) // 2][0]
    first = max(r for t, r in during if t <= mid)
    second = max(r for t, r in during if t > mid)
    assert first - report["base"] < DEFAULT_CAP + 64 * MiB, first / MiB
    assert second <= first + 16 * MiB, (first / MiB, second / MiB)
    # At the end, the result's bytes and text of the kept head come on top.
    assert growth(report) < 3 * DEFAULT_CAP + 64 * MiB, growth(report) / MiB


@pytest.mark.slow
def test_streaming_512_mib_async_runs_in_bounded_memory() -> None:
    report = run_client(
        """
        import asyncio
        async def main():
            p = sb.exec(["head", "-c", "512M", "/dev/zero"], max_output_bytes=0)
            n = 0
            async for chunk in p.stdout:
                n += len(chunk)
            return n, await p
        n, r = asyncio.run(main())
        report(n=n, rc=r.returncode, kept=len(r.stdout_bytes), cut=r.stdout_truncated)
        """
    )
    _figures("512 MiB streamed (async)", report)
    assert report["n"] == 512 * MiB
    assert report["rc"] == 0 and report["kept"] == 0 and report["cut"] is True
    assert growth(report) < 64 * MiB, growth(report) / MiB


@pytest.mark.slow
def test_result_of_a_flood_keeps_the_cap_and_says_so() -> None:
    report = run_client(
        """
        r = sb.exec(["sh", "-c", "head -c 300M /dev/zero; echo tail >&2; exit 3"]).result()
        report(rc=r.returncode, out=len(r.stdout_bytes), err=r.stderr, text=len(r.stdout),
               cut=r.stdout_truncated, err_cut=r.stderr_truncated)
        """
    )
    _figures("result() of 300 MiB", report)
    assert report["rc"] == 3
    assert report["out"] == DEFAULT_CAP and report["text"] == DEFAULT_CAP
    assert report["cut"] is True and report["err_cut"] is False and report["err"] == "tail\n"
    # the kept bytes, their text, and slack: not the 300 MiB
    assert growth(report) < 3 * DEFAULT_CAP + 64 * MiB, growth(report) / MiB


def test_the_cap_is_configurable_per_call_and_in_the_defaults(sandbox: Sandbox) -> None:
    flood = ["sh", "-c", "head -c 5M /dev/zero | tr '\\0' a; echo; head -c 3M /dev/zero >&2"]
    r = sandbox.exec(flood, max_output_bytes=MiB).result(timeout=60)
    assert (len(r.stdout_bytes), len(r.stderr_bytes)) == (MiB, MiB)
    assert r.stdout == "a" * MiB and r.stdout_truncated and r.stderr_truncated
    with Sandbox.run(defaults=SandboxDefaults(max_output_bytes=1000, tags=(TEST_TAG,))) as sb:
        r = sb.exec(flood).result(timeout=60)
        assert (len(r.stdout_bytes), r.stdout_truncated, r.stderr_truncated) == (1000, True, True)
        r = sb.exec(flood, max_output_bytes=10 * MiB).result(timeout=60)
        assert (len(r.stdout_bytes), r.stdout_truncated) == (5 * MiB + 1, False)
        exact = sb.exec(["sh", "-c", "printf 1234567890"], max_output_bytes=10).result()
        assert (exact.stdout, exact.stdout_truncated) == ("1234567890", False)
    for bad in (-1, 1.5, True, "1M"):
        with pytest.raises((TypeError, ValueError), match="max_output_bytes"):
            sandbox.exec(["true"], max_output_bytes=bad)  # type: ignore[arg-type]
        with pytest.raises((TypeError, ValueError), match="max_output_bytes"):
            SandboxDefaults(max_output_bytes=bad)  # type: ignore[arg-type]


@pytest.mark.slow
def test_a_slow_reader_holds_the_command_back_and_loses_nothing(sandbox: Sandbox) -> None:
    process = sandbox.exec(["head", "-c", "200M", "/dev/zero"], max_output_bytes=MiB)
    loop = iter(process.stdout)
    n = len(next(loop))
    time.sleep(3.0)  # unthrottled, 200 MiB take well under a second
    assert process.poll() is None, "the command ran on while its reader was not reading"
    for chunk in loop:
        n += len(chunk)
    assert n == 200 * MiB
    result = process.result(timeout=30)
    assert result.returncode == 0 and result.stdout_truncated


def test_a_reader_that_stops_does_not_stall_the_result(sandbox: Sandbox) -> None:
    """``break`` ends the read loop: the flood then goes on without the reader (its excess is
    dropped), ``result()`` arrives, and a later loop reads what was kept, then fails where the
    output was cut rather than pretending it was whole."""
    process = sandbox.exec(["sh", "-c", "echo first; head -c 100M /dev/zero"], max_output_bytes=0)
    for line in process.stdout.lines():
        assert line == "first\n"
        break
    result: ProcessResult = process.result(timeout=60)
    assert result.returncode == 0 and result.stdout_truncated and result.stdout_bytes == b""
    kept = 0
    with pytest.raises(SandboxExecutionError, match="was not kept"):
        for chunk in process.stdout:
            kept += len(chunk)
    assert 0 < kept <= 5 * MiB


def test_closing_a_reader_releases_the_command(sandbox: Sandbox) -> None:
    process = sandbox.exec(["head", "-c", "100M", "/dev/zero"], max_output_bytes=0)
    loop = iter(process.stdout)
    next(loop)
    process.stdout.close()  # the loop object is still alive, but the reader is closed
    assert process.result(timeout=60).returncode == 0
    assert list(loop) == []


@pytest.mark.slow
def test_streaming_stdout_while_stderr_floods_unread(sandbox: Sandbox) -> None:
    """Only stdout is read: the stderr flood must neither stall stdout (one call carries both)
    nor pile up in the client."""
    process = sandbox.exec(
        ["sh", "-c", "head -c 200M /dev/zero >&2; echo done"], max_output_bytes=MiB
    )
    assert "".join(process.stdout) == "done\n"
    result = process.result(timeout=60)
    assert result.stderr_truncated and len(result.stderr_bytes) == MiB
    assert not result.stdout_truncated and result.stdout == "done\n"


def test_a_line_without_end_cannot_fill_the_client(sandbox: Sandbox) -> None:
    process = sandbox.exec(
        ["sh", "-c", "head -c 20M /dev/zero | tr '\\0' a; echo; echo last"], max_output_bytes=0
    )
    sizes = [len(line) for line in process.stdout.lines()]
    assert max(sizes) == 1024 * 1024 and sum(sizes) == 20 * MiB + 1 + 5
    assert sizes[-2:] == [1, 5]  # the end of the long line ("\n"), then "last\n"
    assert process.result(timeout=60).returncode == 0
