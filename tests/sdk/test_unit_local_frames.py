"""The lean local protocol's frames and its connection's bounded buffers (pure logic: a fake
transport stands in for the socket)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from aviato.v1 import local_frames as lf


class FakeTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.paused = False
        self.aborted = False
        self.written: list[bytes] = []

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def write(self, data: Any) -> None:
        self.written.append(bytes(data))

    def abort(self) -> None:
        self.aborted = True

    def close(self) -> None:
        self.aborted = True


def _connection(max_frame: int = 8 << 20) -> tuple[lf.FrameConnection, FakeTransport]:
    conn = lf.FrameConnection(max_frame)
    transport = FakeTransport()
    conn.connection_made(transport)
    return conn, transport


def test_the_encodings_round_trip() -> None:
    metadata = (("authorization", "Bearer x"), ("aviato-error-detail-bin", b"\x00\xff"))
    assert lf.decode_call(lf.encode_call("/a.B/C", 2.5, metadata)) == ("/a.B/C", 2.5, metadata)
    assert lf.decode_call(lf.encode_call("/a.B/C", None, ())) == ("/a.B/C", None, ())
    assert lf.decode_status(lf.encode_status(5, "gone", metadata)) == (5, "gone", metadata)


@pytest.mark.parametrize(
    "payload",
    [b"", b"\x00", b"\x00" * 8 + b"\xff\xff", lf.encode_call("/x", 1, ()) + b"extra"],
)
def test_a_truncated_or_padded_payload_is_a_frame_error(payload: bytes) -> None:
    with pytest.raises(lf.FrameError):
        lf.decode_call(payload)


def test_frames_split_anywhere_are_reassembled() -> None:
    async def main() -> None:
        conn, _ = _connection()
        data = lf.frame(lf.MESSAGE, b"a" * 1000) + lf.frame(lf.HALF_CLOSE)
        for i in range(0, len(data), 7):
            conn.data_received(data[i : i + 7])
        assert await conn.next_frame() == (lf.MESSAGE, b"a" * 1000)
        assert await conn.next_frame() == (lf.HALF_CLOSE, b"")

    asyncio.run(main())


def test_an_oversized_or_unknown_frame_ends_the_connection_without_buffering_it() -> None:
    async def main() -> None:
        conn, transport = _connection(max_frame=1024)
        conn.data_received(b"\x02\xff\xff\xff\xff")  # a 4 GiB message announced
        assert transport.aborted and conn.closed and len(conn._buffer) == 0
        with pytest.raises(lf.FrameError):
            await conn.next_frame()
        conn, transport = _connection()
        conn.data_received(b"GET / HTTP/1.1\r\n")
        assert transport.aborted and isinstance(conn.error, lf.FrameError)

    asyncio.run(main())


def test_reading_pauses_above_the_high_water_and_resumes_with_a_large_partial_frame() -> None:
    """A partial frame larger than the low water must not keep reading paused once the whole
    frames are consumed: only more reading can complete it (this deadlocked an upload)."""

    async def main() -> None:
        conn, transport = _connection()
        chunk = lf.frame(lf.MESSAGE, b"x" * (300 * 1024))
        whole = chunk * 4  # 1.2 MiB of whole frames: above the high water
        conn.data_received(whole + chunk[: len(chunk) - 10])
        assert transport.paused
        for _ in range(4):
            await conn.next_frame()
        assert not transport.paused
        conn.data_received(chunk[len(chunk) - 10 :])
        assert (await conn.next_frame())[1] == b"x" * (300 * 1024)

    asyncio.run(main())


def test_frames_sent_in_one_turn_leave_in_one_write() -> None:
    async def main() -> None:
        conn, transport = _connection()
        conn.send(lf.frame(lf.MESSAGE, b"exit"))
        conn.send(lf.frame(lf.STATUS, lf.encode_status(0, "", ())))
        assert transport.written == []
        await asyncio.sleep(0)
        assert len(transport.written) == 1

    asyncio.run(main())
