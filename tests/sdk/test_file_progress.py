"""Streaming uploads and downloads with progress callbacks, against the real service."""

from __future__ import annotations

import io
import os
import stat
from pathlib import Path

from aviato import Sandbox


def test_upload_and_download_report_progress_and_keep_bytes_and_mode(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    payload = os.urandom(3 * 1024 * 1024 + 17)
    local = tmp_path / "blob.bin"
    local.write_bytes(payload)
    local.chmod(0o750)
    up: list[tuple[int, int | None]] = []
    written = sandbox.upload_file(
        local, "/tmp/progress/blob.bin", progress=lambda d, t: up.append((d, t))
    ).result(timeout=60)
    assert written == len(payload)
    assert up[0] == (0, len(payload)) and up[-1] == (len(payload), len(payload))
    assert [d for d, _ in up] == sorted(d for d, _ in up) and len(up) > 3  # chunk by chunk
    mode = sandbox.exec(["stat", "-c", "%a", "/tmp/progress/blob.bin"]).result().stdout
    assert mode.strip() == "750"

    down: list[tuple[int, int | None]] = []
    target = tmp_path / "back.bin"
    received = sandbox.download_file(
        "/tmp/progress/blob.bin", target, progress=lambda d, t: down.append((d, t))
    ).result(timeout=60)
    assert received == len(payload) and target.read_bytes() == payload
    assert down[0] == (0, len(payload)) and down[-1] == (len(payload), len(payload))
    assert stat.S_IMODE(target.stat().st_mode) == 0o750


def test_upload_from_a_stream_of_unknown_size(sandbox: Sandbox) -> None:
    seen: list[tuple[int, int | None]] = []
    source = io.BytesIO(b"streamed\n" * 1000)
    size = sandbox.upload_file(
        source, "/tmp/progress/stream.txt", progress=lambda d, t: seen.append((d, t))
    ).result(timeout=60)
    assert size == 9000 and not source.closed  # the caller's file object stays open
    assert seen[-1] == (9000, None)
    assert sandbox.read_file("/tmp/progress/stream.txt").result() == b"streamed\n" * 1000
    mode = sandbox.exec(["stat", "-c", "%a", "/tmp/progress/stream.txt"]).result().stdout
    assert mode.strip() == "644"
