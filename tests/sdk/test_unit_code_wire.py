"""The client's side of the code-context wire, as pure logic: `FrameReader` against garbage,
forged frames and lying lengths; `RunCollector` against frames that break their bounds."""

from __future__ import annotations

import ast
import json
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from aviato._code_results import MAX_DISPLAYS_PER_RUN, RichOutput, RunCollector
from aviato._code_wire import (
    DRIVER_MODULES,
    MAGIC,
    FrameReader,
    driver_sources,
    encode_request,
    new_token,
)

TOKEN = bytes(range(16))


def frame(message: object, token: bytes = TOKEN, body: bytes | None = None) -> bytes:
    data = json.dumps(message).encode() if body is None else body
    return MAGIC + token + struct.pack(">I", len(data)) + data


def messages(reader: FrameReader, data: bytes) -> list[object]:
    return [f for f, _ in reader.feed(data)]


def test_frames_split_anywhere_are_reassembled() -> None:
    stream = frame({"k": "a"}) + frame({"k": "b", "n": [1, 2]})
    for cut in range(len(stream) + 1):
        reader = FrameReader(TOKEN)
        got = messages(reader, stream[:cut]) + messages(reader, stream[cut:])
        assert got == [{"k": "a"}, {"k": "b", "n": [1, 2]}]


def test_garbage_and_other_tokens_are_skipped_never_parsed() -> None:
    reader = FrameReader(TOKEN)
    forged = frame({"k": "done"}, token=new_token())
    data = b"\xff" * 50 + forged + MAGIC + b"junk" + frame({"k": "real"}) + forged[:7]
    assert messages(reader, data) == [{"k": "real"}]
    assert reader.skipped_bytes >= 50 + len(forged)


def test_a_lying_length_does_not_swallow_the_next_frame() -> None:
    reader = FrameReader(TOKEN)
    liar = MAGIC + TOKEN + struct.pack(">I", 10_000_000) + b'{"k":"partial'
    assert messages(reader, liar + frame({"k": "done"})) == [{"k": "done"}]
    assert reader.bad_frames == 1


def test_an_oversized_length_is_refused_without_waiting() -> None:
    reader = FrameReader(TOKEN, max_frame_bytes=1024)
    huge = MAGIC + TOKEN + struct.pack(">I", 1 << 31)
    assert messages(reader, huge + frame({"k": "next"})) == [{"k": "next"}]


@pytest.mark.parametrize(
    "body", [b"\xc3\xa9", b"not json", b"[1, 2]", b"[" * 100_000, b'{"k": 1' + b"\x00"]
)
def test_bodies_that_are_not_ascii_json_objects_are_dropped(body: bytes) -> None:
    reader = FrameReader(TOKEN)
    assert messages(reader, frame(None, body=body) + frame({"k": "ok"})) == [{"k": "ok"}]


@given(st.binary(max_size=4096))
def test_any_bytes_keep_the_reader_bounded(data: bytes) -> None:
    reader = FrameReader(TOKEN, max_frame_bytes=256)
    for _ in range(4):
        reader.feed(data)
    assert len(reader._buffer) <= 256 + 24 + len(data)


def test_requests_are_length_prefixed_json() -> None:
    encoded = encode_request({"op": "run", "code": "é"})
    (size,) = struct.unpack(">I", encoded[:4])
    assert json.loads(encoded[4 : 4 + size]) == {"op": "run", "code": "é"}


def test_collector_bounds_output_and_types() -> None:
    collector = RunCollector(1, max_output_chars=10)
    collector.add({"k": "out", "run": 1, "name": "stdout", "text": "x" * 25}, 40)
    collector.add({"k": "out", "run": 1, "name": "stdout", "text": ["not", "text"]}, 40)
    collector.add({"k": "out", "run": 1, "name": "elsewhere", "text": "y"}, 40)
    collector.add({"k": "error", "run": 1, "name": 7, "value": None, "traceback": "x" * 9}, 40)
    collector.add({"k": "done", "run": 1, "count": -3, "frames": 4, "stdout_bytes": 25}, 40)
    execution = collector.execution()
    assert execution.stdout == "x" * 10 and execution.stdout_truncated
    assert execution.error is not None and execution.error.name == "Error"
    assert execution.error.traceback == () and execution.execution_count == 0


def test_collector_bounds_rich_outputs() -> None:
    collector = RunCollector(1, max_output_chars=10)
    for _ in range(MAX_DISPLAYS_PER_RUN + 5):
        collector.add({"k": "display", "run": 1, "data": {"text/plain": "1", "x/evil": "2"}}, 10)
    collector.add({"k": "display", "run": 1, "data": {"image/png": 5}}, 10)
    collector.add({"k": "done", "run": 1, "frames": MAX_DISPLAYS_PER_RUN + 6}, 10)
    execution = collector.execution()
    assert len(execution.outputs) == MAX_DISPLAYS_PER_RUN
    assert all(o.formats == ["text/plain"] for o in execution.outputs)
    assert any("left out" in note for note in execution.notes)


def test_collector_reports_frames_lost_on_the_way() -> None:
    collector = RunCollector(3, max_output_chars=10)
    collector.add({"k": "out", "run": 3, "name": "stdout", "text": "a"}, 10)
    collector.add({"k": "done", "run": 3, "frames": 3}, 10)
    assert any("damaged" in note for note in collector.execution().notes)


@pytest.mark.parametrize("name", DRIVER_MODULES)
def test_the_driver_is_python_3_8(name: str) -> None:
    """The driver runs on the sandbox's Python, which may be older than ours."""
    source = dict(driver_sources())[name].decode()
    ast.parse(source, f"{name}.py", feature_version=(3, 8))
    tree = ast.parse(source)
    imported = {
        (node.module or "").split(".")[0] if isinstance(node, ast.ImportFrom) else alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.Import | ast.ImportFrom)
        for alias in node.names
    }
    assert "aviato" not in imported  # nothing of aviato exists in the sandbox


def test_a_rich_output_shows_in_the_users_notebook_without_markup() -> None:
    output = RichOutput(
        {"text/plain": "<Fig>", "image/png": "iVBORw0=", "text/html": "<script>x</script>"}
    )
    assert output._repr_mimebundle_() == {"text/plain": "<Fig>", "image/png": "iVBORw0="}
    assert RichOutput({"image/svg+xml": "<svg onload=x/>"})._repr_mimebundle_() == {
        "text/plain": ""
    }
