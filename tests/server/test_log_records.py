"""Parsing of main.log records and tail offsets (pure)."""

from __future__ import annotations

import asyncio
import os
import struct
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from aviato.server.logs_api import _tail_offset, parse_log_records


def record(i: int, stream: int, data: bytes) -> bytes:
    return struct.pack("<QBI", 1_000 + i, stream, len(data)) + data


records_st = st.lists(st.tuples(st.sampled_from([1, 2]), st.binary(max_size=300)), max_size=40)


@given(records_st, st.integers(min_value=0, max_value=12))
@settings(max_examples=60, deadline=None)
def test_parse_and_tail(recs: list[tuple[int, bytes]], cut: int) -> None:
    blob = b"".join(record(i, s, d) for i, (s, d) in enumerate(recs))
    partial = blob + record(99, 1, b"partial")[:cut]  # a record still being written
    entries, used = parse_log_records(partial)
    assert used == len(blob)
    assert [(e.stream, e.data) for e in entries] == recs
    assert [e.time.ToNanoseconds() for e in entries] == [1_000 + i for i in range(len(recs))]

    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"avt-log-{os.getpid()}"
    path.write_bytes(partial)
    fd = os.open(path, os.O_RDONLY)
    try:
        for tail in (0, 1, 3, 100):
            offset = asyncio.run(_tail_offset(fd, tail))
            rest, _ = parse_log_records(os.pread(fd, len(partial), offset))
            expected = recs[-tail:] if tail else []
            assert [(e.stream, e.data) for e in rest] == expected
    finally:
        os.close(fd)
        path.unlink()


def test_large_log_tail_is_quick(tmp_path: Path) -> None:
    path = tmp_path / "main.log"
    path.write_bytes(b"".join(record(i, 1, b"x") for i in range(200_000)))
    fd = os.open(path, os.O_RDONLY)
    try:
        offset = asyncio.run(_tail_offset(fd, 2))
        rest, _ = parse_log_records(os.pread(fd, 1 << 20, offset))
        assert len(rest) == 2 and rest[-1].time.ToNanoseconds() == 1_000 + 199_999
    finally:
        os.close(fd)
