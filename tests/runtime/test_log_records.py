"""The main log's format (runtime/logs.py): parsing, tail and since, following (pure; files)."""

from __future__ import annotations

import asyncio
import os
import struct
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from aviato.runtime.base import LogRecord
from aviato.runtime.logs import encode_record, parse_records, read_log


def record(i: int, stream: int, data: bytes) -> bytes:
    return struct.pack("<QBI", 1_000 + i, stream, len(data)) + data


records_st = st.lists(st.tuples(st.sampled_from([1, 2]), st.binary(max_size=300)), max_size=40)


async def _read(path: Path, **kwargs: object) -> list[LogRecord]:
    return [r async for r in read_log(path, **kwargs)]  # type: ignore[arg-type]


@given(records_st, st.integers(min_value=0, max_value=12))
@settings(max_examples=60, deadline=None)
def test_parse_and_tail(recs: list[tuple[int, bytes]], cut: int) -> None:
    blob = b"".join(record(i, s, d) for i, (s, d) in enumerate(recs))
    partial = blob + record(99, 1, b"partial")[:cut]  # a record still being written
    entries, used = parse_records(partial)
    assert used == len(blob)
    assert [(e.stream, e.data) for e in entries] == recs
    assert [e.time_ns for e in entries] == [1_000 + i for i in range(len(recs))]
    assert b"".join(encode_record(e) for e in entries) == blob

    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"avt-log-{os.getpid()}"
    path.write_bytes(partial)
    try:
        for tail in (0, 1, 3, 100):
            rest = asyncio.run(_read(path, tail=tail))
            expected = recs[-tail:] if tail else []
            assert [(e.stream, e.data) for e in rest] == expected
        since = asyncio.run(_read(path, since_ns=1_003))
        assert [(e.stream, e.data) for e in since] == recs[3:]
        both = asyncio.run(_read(path, since_ns=1_003, tail=2))
        assert [(e.stream, e.data) for e in both] == recs[3:][-2:]
    finally:
        path.unlink()


def test_large_log_tail_is_quick(tmp_path: Path) -> None:
    path = tmp_path / "main.log"
    path.write_bytes(b"".join(record(i, 1, b"x") for i in range(200_000)))
    rest = asyncio.run(_read(path, tail=2))
    assert len(rest) == 2 and rest[-1].time_ns == 1_000 + 199_999


def _append(path: Path, data: bytes) -> None:
    with open(path, "ab") as f:
        f.write(data)


def test_follow_gives_new_records_until_ended(tmp_path: Path) -> None:
    path = tmp_path / "main.log"
    path.write_bytes(record(0, 1, b"first"))
    ended = False

    async def scenario() -> list[bytes]:
        nonlocal ended
        got: list[bytes] = []

        async def follow() -> None:
            async for r in read_log(path, follow=True, ended=lambda: ended):
                got.append(r.data)

        task = asyncio.create_task(follow())
        await asyncio.sleep(0.2)
        _append(path, record(1, 2, b"second"))
        await asyncio.sleep(0.2)
        assert not task.done()
        _append(path, record(2, 1, b"last"))
        ended = True
        await asyncio.wait_for(task, 5)
        return got

    assert asyncio.run(scenario()) == [b"first", b"second", b"last"]


def test_a_missing_log_is_file_not_found(tmp_path: Path) -> None:
    try:
        asyncio.run(_read(tmp_path / "none.log"))
    except FileNotFoundError:
        return
    raise AssertionError("no FileNotFoundError")
