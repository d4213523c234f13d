"""The SDK surface the command line is built on, over the in-memory transport: terminal
commands (`exec(..., tty=True)`), signals, raw output, log streams and the image store."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Iterator

import pytest

import aviato
from aviato import Sandbox, _client
from aviato._transport.memory import MemoryService

_names = iter(range(1_000_000))


@pytest.fixture
def svc() -> Iterator[MemoryService]:
    service = MemoryService(f"unit-tty-{next(_names)}")
    _client.register_transport(service.url, service.transport)
    yield service
    _client.register_transport(service.url, None)


def test_a_terminal_starts_at_its_size_and_follows_resizes(svc: MemoryService) -> None:
    sb = Sandbox.run(base_url=svc.url)
    process = sb.exec(["winsize"], tty=True, tty_size=(30, 100))
    assert process.tty and process.stdin is not None
    chunks = process.stdout.iter_bytes()
    process.stdin.write(b"\r")
    assert next(chunks) == b"30 100\r\n"
    process.resize(40, 120).result(timeout=10)
    process.stdin.write(b"\r")
    assert next(chunks) == b"40 120\r\n"
    process.stdin.close()
    assert process.wait(timeout=10) == 0
    assert svc.resizes == [(40, 120)]


def test_the_default_terminal_is_24_by_80(svc: MemoryService) -> None:
    sb = Sandbox.run(base_url=svc.url)
    process = sb.exec(["winsize"], tty=True)
    assert process.stdin is not None
    process.stdin.write(b"x")
    process.stdin.close()
    assert process.result(timeout=10).stdout == "24 80\r\n"


def test_a_resize_before_the_call_opened_is_sent_once_it_is(svc: MemoryService) -> None:
    sb = Sandbox.run(base_url=svc.url)
    process = sb.exec(["winsize"], tty=True)
    resized = process.resize(50, 132)  # the sandbox may not even be created yet
    assert process.stdin is not None
    resized.result(timeout=10)
    process.stdin.write(b"x")
    process.stdin.close()
    assert process.result(timeout=10).stdout == "50 132\r\n"


def test_a_signal_reaches_the_command(svc: MemoryService) -> None:
    sb = Sandbox.run(base_url=svc.url)
    process = sb.exec(["sleep", "30"], stdin=True)
    process.send_signal(signal.SIGINT).result(timeout=10)
    result = process.result(timeout=10)
    assert (result.returncode, result.signal) == (130, signal.SIGINT)
    assert svc.signals == [signal.SIGINT]
    # after the exit, a resize or a signal has nothing to reach and does nothing
    process.send_signal(signal.SIGTERM).result(timeout=10)


def test_bad_terminal_arguments_are_refused_before_anything_runs(svc: MemoryService) -> None:
    sb = Sandbox.run(base_url=svc.url)
    with pytest.raises(ValueError, match="tty_size must be"):
        sb.exec(["winsize"], tty=True, tty_size=(0, 80))
    with pytest.raises(ValueError, match="not both"):
        sb.exec(["cat"], tty=True, input=b"x")
    plain = sb.exec(["echo", "hi"])
    with pytest.raises(aviato.SandboxExecutionError, match="tty=True"):
        plain.resize(10, 10)
    with pytest.raises(aviato.SandboxExecutionError, match="stdin=True or tty=True"):
        plain.send_signal(signal.SIGINT)
    assert plain.result(timeout=10).stdout == "hi\n"
    assert svc.calls["Exec"] == 1  # the refused calls never reached the service
    process = sb.exec(["winsize"], tty=True)
    with pytest.raises(ValueError, match="rows must be"):
        process.resize(0, 10)
    with pytest.raises(ValueError, match="signum must be"):
        process.send_signal(99)
    process.cancel()


def test_raw_bytes_are_relayed_undecoded_and_async(svc: MemoryService) -> None:
    sb = Sandbox.run(base_url=svc.url)
    process = sb.exec(["cat"], stdin=True, max_output_bytes=0)
    assert process.stdin is not None
    process.stdin.write(b"\xff\xfe\x00binary")
    process.stdin.close()

    async def collect() -> bytes:
        return b"".join([chunk async for chunk in process.stdout.iter_bytes()])

    assert asyncio.run(collect()) == b"\xff\xfe\x00binary"
    assert process.result(timeout=10).stdout_bytes == b""  # nothing kept with 0


# --- the main process's log ------------------------------------------------------------------


def test_logs_tail_and_follow_until_the_sandbox_ends(svc: MemoryService) -> None:
    sb = Sandbox.run(base_url=svc.url)
    sandbox_id = sb.wait().sandbox_id
    assert sandbox_id is not None
    for line in (b"one\n", b"two\n"):
        svc.log(sandbox_id, line)
    svc.log(sandbox_id, b"oops\n", stderr=True)
    records = list(sb.stream_logs())
    assert [(r.stream, r.data) for r in records] == [
        ("stdout", b"one\n"),
        ("stdout", b"two\n"),
        ("stderr", b"oops\n"),
    ]
    assert records[0].text == "one\n" and records[0].time is not None
    assert [r.text for r in sb.stream_logs(tail=1)] == ["oops\n"]
    assert list(sb.stream_logs(tail=0)) == []

    async def follow() -> list[str]:
        seen: list[str] = []
        async for record in sb.stream_logs(follow=True, tail=1):
            seen.append(record.text)
            if record.text == "oops\n":
                svc.log(sandbox_id, b"late\n")  # written while the follow waits
            else:
                svc.stop(sandbox_id)  # the follow ends with the sandbox
        return seen

    assert asyncio.run(follow()) == ["oops\n", "late\n"]
    with pytest.raises(ValueError, match="tail"):
        sb.stream_logs(tail=-1)


def test_logs_of_an_unknown_sandbox_raise_not_found(svc: MemoryService) -> None:
    sb = Sandbox.run(base_url=svc.url).wait()
    assert sb.sandbox_id is not None
    del svc.sandboxes[sb.sandbox_id]
    with pytest.raises(aviato.SandboxNotFoundError):
        list(sb.stream_logs())


# --- the image store -------------------------------------------------------------------------


def test_images_pull_list_remove_prune(svc: MemoryService) -> None:
    steps: list[str] = []
    pulled = aviato.Images.pull(
        "python:3.11", base_url=svc.url, progress=lambda p: steps.append(p.phase)
    )
    assert steps == ["resolving", "downloading", "done"]
    assert pulled.names == ["python:3.11"] and pulled.digest.startswith("sha256:")
    assert pulled.pulled_at is not None
    aviato.Images.pull("busybox", base_url=svc.url)
    assert {i.digest for i in aviato.Images.list(base_url=svc.url)} == set(svc.images)
    assert aviato.Images.remove("python:3.11", base_url=svc.url).digest == pulled.digest
    with pytest.raises(aviato.AviatoError, match="no image"):
        aviato.Images.remove("python:3.11", base_url=svc.url)
    assert [i.names for i in aviato.Images.prune(base_url=svc.url)] == [["busybox"]]
    assert aviato.Images.list(base_url=svc.url) == []
