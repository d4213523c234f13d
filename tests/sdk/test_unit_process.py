"""StreamReader, StreamWriter, Process and ProcessResult without a service.

The streams are fed from the background loop as the exec driver does.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from collections.abc import Callable
from typing import TypeVar

import pytest
from _wait import wait_until

from aviato import ProcessResult, SandboxExecutionError
from aviato._bridge import get_bridge
from aviato._output import MAX_LINE_CHARS, STREAM_WINDOW_BYTES, OutputBuffer, StreamReader
from aviato._process import ExecState, Process

T = TypeVar("T")


def feed(
    buffer: OutputBuffer, chunks: list[bytes], delay: float, error: BaseException | None = None
) -> None:
    async def produce() -> None:
        for chunk in chunks:
            await asyncio.sleep(delay)
            buffer.append(chunk)
        buffer.close(error)

    get_bridge().submit(produce())


def test_sync_iteration_is_live() -> None:
    buf = OutputBuffer()
    reader = StreamReader(buf, "stdout")
    feed(buf, [f"line{i}\n".encode() for i in range(5)], 0.1)
    stamps = []
    text = ""
    for chunk in reader:
        stamps.append(time.monotonic())
        text += chunk
    assert text == "".join(f"line{i}\n" for i in range(5))
    assert stamps[-1] - stamps[0] > 0.3  # arrived over time, not at the end


def test_async_iteration_from_another_thread_and_loop() -> None:
    buf = OutputBuffer()
    reader = StreamReader(buf, "stdout")
    got: list[str] = []

    async def consume() -> None:
        async for chunk in reader:
            got.append(chunk)

    t = threading.Thread(target=lambda: asyncio.run(consume()))
    t.start()
    feed(buf, [b"a", b"b", b"c"], 0.05)
    t.join(5)
    assert "".join(got) == "abc"


def test_utf8_split_across_chunks() -> None:
    buf = OutputBuffer()
    reader = StreamReader(buf, "stdout")
    data = "héllo wörld ✓\n".encode()
    feed(buf, [data[i : i + 1] for i in range(len(data))], 0.0)
    assert reader.read() == "héllo wörld ✓\n"


def test_lines_sync_and_async() -> None:
    buf = OutputBuffer()
    reader = StreamReader(buf, "stdout")
    feed(buf, [b"one\ntw", b"o\nthr", b"ee"], 0.02)
    assert list(reader.lines()) == ["one\n", "two\n", "three"]

    buf2 = OutputBuffer()
    reader2 = StreamReader(buf2, "stdout")
    feed(buf2, [b"x\ny", b"\n"], 0.02)

    async def collect() -> list[str]:
        return [line async for line in reader2.lines()]

    assert asyncio.run(collect()) == ["x\n", "y\n"]


def test_stream_error_is_raised_after_the_data() -> None:
    buf = OutputBuffer()
    reader = StreamReader(buf, "stdout")
    feed(buf, [b"partial"], 0.0, error=SandboxExecutionError("stream broke"))
    chunks = []
    with pytest.raises(SandboxExecutionError, match="stream broke"):
        for chunk in reader:
            chunks.append(chunk)
    assert "".join(chunks) == "partial"
    assert list(reader) == []  # exhausted afterwards


def test_reader_close_stops_iteration() -> None:
    buf = OutputBuffer()
    reader = StreamReader(buf, "stdout")

    def closer() -> None:
        time.sleep(0.1)
        reader.close()

    threading.Thread(target=closer).start()
    assert list(reader) == []


def _drain_writer(state: ExecState, delay: float) -> concurrent.futures.Future[list[bytes]]:
    writer = state.writer
    assert writer is not None

    async def sink() -> list[bytes]:
        out = []
        while True:
            item = await writer._next_item()
            if item is None:
                return out
            await asyncio.sleep(delay)
            out.append(item)
            writer._mark_sent(len(item))

    return get_bridge().submit(sink())


def test_writer_order_and_eof() -> None:
    state = ExecState(["cat"], stdin=True)
    writer = state.writer
    assert writer is not None
    sink = _drain_writer(state, 0.0)
    refs = [writer.write(f"{i},".encode()) for i in range(50)]
    refs.append(writer.writeline("end"))
    writer.close()
    assert writer.closed
    assert writer.close() is writer.close()  # idempotent
    for ref in refs:
        ref.result(timeout=5)
    assert (
        b"".join(sink.result(timeout=5)) == b"".join(f"{i},".encode() for i in range(50)) + b"end\n"
    )


def test_writer_backpressure() -> None:
    state = ExecState(["cat"], stdin=True)
    writer = state.writer
    assert writer is not None
    block = b"x" * (512 * 1024)
    first = [writer.write(block) for _ in range(2)]  # 1 MiB: within the buffer
    for ref in first:
        ref.result(timeout=2)
    blocked = writer.write(block)
    time.sleep(0.2)
    assert not blocked.done()  # nobody drains: the writer waits
    sink = _drain_writer(state, 0.0)
    blocked.result(timeout=5)
    writer.close().result(timeout=5)
    assert sum(map(len, sink.result(timeout=5))) == 3 * len(block)


def test_writer_errors() -> None:
    state = ExecState(["cat"], stdin=True)
    writer = state.writer
    assert writer is not None
    with pytest.raises(TypeError):
        writer.write("text")  # type: ignore[arg-type]
    writer.close()
    with pytest.raises(SandboxExecutionError, match="closed"):
        writer.write(b"late")
    state2 = ExecState(["cat"], stdin=True)
    get_bridge().run(_finish(state2))
    assert state2.writer is not None
    with pytest.raises(SandboxExecutionError, match="exited"):
        state2.writer.write(b"after exit")


async def _finish(state: ExecState) -> None:
    state.finish(None)


def test_process_returncode_poll_wait() -> None:
    state = ExecState(["false"], stdin=False)
    result = ProcessResult("", "oops\n", 1, b"", b"oops\n", ["false"])

    async def run() -> ProcessResult:
        await asyncio.sleep(0.1)
        state.finish(None)
        result.check_returncode()
        return result

    process = Process(get_bridge().submit(run()), state)
    assert process.returncode is None and process.poll() is None
    assert process.wait(timeout=5) == 1  # check failure still yields the code
    assert process.returncode == 1 and process.poll() == 1
    with pytest.raises(SandboxExecutionError) as info:
        process.result()
    assert info.value.exec_result is result
    assert "exited with code 1" in str(info.value)


def test_process_result_fields() -> None:
    r = ProcessResult("out", "", 0, b"out", b"", ["echo", "out"])
    assert r.ok and r.check_returncode() is r
    assert r.usage is None and r.signal == 0 and not r.timed_out


# --- bounded output (aviato._output) ---------------------------------------------------------


def on_loop(fn: Callable[[], T]) -> T:
    async def call() -> T:
        return fn()

    return get_bridge().run(call())


def test_the_head_is_kept_and_the_rest_only_streamed() -> None:
    buf = OutputBuffer(4, "stdout")
    reader = StreamReader(buf, "stdout")
    feed(buf, [b"ab", b"cdef", b"gh"], 0.0)
    assert reader.read() == "abcdefgh"
    assert on_loop(lambda: (bytes(buf.head), buf.total, buf.truncated)) == (b"abcd", 8, True)
    exact = OutputBuffer(4, "stdout")
    feed(exact, [b"abcd"], 0.0)
    assert StreamReader(exact, "stdout").read() == "abcd"
    assert not on_loop(lambda: exact.truncated)


def test_output_nobody_reads_is_dropped_past_the_window_and_a_late_reader_is_told() -> None:
    buf = OutputBuffer(0, "stdout")
    chunk = b"x" * (1024 * 1024)
    chunks = STREAM_WINDOW_BYTES // len(chunk) + 3
    feed(buf, [chunk] * chunks, 0.0)
    reader = StreamReader(buf, "stdout")
    wait_until(  # all of it arrived before any loop
        lambda: on_loop(lambda: buf.total) == chunks * len(chunk), "all the output to arrive", 10
    )
    got = 0
    with pytest.raises(SandboxExecutionError, match=f"from byte {STREAM_WINDOW_BYTES} on"):
        for text in reader:
            got += len(text)
    assert got == STREAM_WINDOW_BYTES  # what was kept, then the error: never a silent gap
    assert on_loop(lambda: buf.total) == STREAM_WINDOW_BYTES + 3 * len(chunk)


def test_an_open_loop_holds_the_producer_back_and_a_dropped_one_releases_it() -> None:
    buf = OutputBuffer(0, "stdout")
    reader = StreamReader(buf, "stdout")
    loop = iter(reader)
    chunk = b"y" * STREAM_WINDOW_BYTES

    async def produce() -> bool:
        buf.append(chunk)
        return buf.full()

    assert get_bridge().run(produce())  # a loop is open: the driver must wait
    assert len(next(loop)) == 1024 * 1024  # reading makes room
    assert not on_loop(buf.full)
    assert get_bridge().run(produce())
    del loop  # the loop is dropped (as after `break`): nobody holds the command back
    wait_until(lambda: not on_loop(buf.full), "the dropped loop to release the buffer", 5)
    assert on_loop(lambda: buf.loops) == 0


def test_a_line_without_end_comes_in_bounded_pieces() -> None:
    buf = OutputBuffer(0, "stdout")
    reader = StreamReader(buf, "stdout")
    half = MAX_LINE_CHARS // 2
    feed(buf, [b"a" * half] * 5 + [b"\nb"], 0.0)
    assert [len(line) for line in reader.lines()] == [
        MAX_LINE_CHARS,
        MAX_LINE_CHARS,
        half + 1,
        1,
    ]
