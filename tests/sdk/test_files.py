"""read_file / write_file against the real service: binary safety, errors, large files."""

from __future__ import annotations

import hashlib
import os
import time

import pytest

import aviato
from aviato import Sandbox

from .conftest import slow_tests_enabled


def test_binary_round_trip(sandbox: Sandbox) -> None:
    data = bytes(range(256)) * 17
    sandbox.write_file("/tmp/bin.dat", data).result()
    assert sandbox.read_file("/tmp/bin.dat").result() == data
    sandbox.write_file("/tmp/text.txt", "héllo").result()  # str is UTF-8 encoded
    assert sandbox.read_file("/tmp/text.txt").result() == "héllo".encode()
    sandbox.write_file("/tmp/empty", b"").result()
    assert sandbox.read_file("/tmp/empty").result() == b""


def test_write_creates_parents_and_mode(sandbox: Sandbox) -> None:
    sandbox.write_file("/workspace/deep/er/run.sh", b"#!/bin/sh\necho ran\n", mode=0o755).result()
    assert sandbox.exec(["/workspace/deep/er/run.sh"]).result().stdout == "ran\n"
    with pytest.raises(aviato.SandboxFileError) as info:
        sandbox.write_file("/workspace/nope/x", b"", make_parents=False).result()
    assert info.value.filepath == "/workspace/nope/x"


def test_missing_file_raises_with_filepath(sandbox: Sandbox) -> None:
    with pytest.raises(aviato.SandboxFileError) as info:
        sandbox.read_file("/tmp/does-not-exist").result()
    assert info.value.filepath == "/tmp/does-not-exist"
    assert info.value.sandbox_id == sandbox.sandbox_id
    with pytest.raises(aviato.SandboxFileError):
        sandbox.read_file("/tmp").result()  # a directory


def test_files_written_by_commands_are_readable(sandbox: Sandbox) -> None:
    sandbox.exec(["sh", "-c", "printf abc > /tmp/from-cmd"]).result()
    assert sandbox.read_file("/tmp/from-cmd").result() == b"abc"


def _round_trip(sandbox: Sandbox, size: int) -> float:
    data = os.urandom(1024 * 1024) * (size // (1024 * 1024))
    digest = hashlib.sha256(data).hexdigest()
    t0 = time.monotonic()
    sandbox.write_file("/tmp/big.bin", data).result(timeout=600)
    check = sandbox.exec(["sh", "-c", "sha256sum /tmp/big.bin"]).result(timeout=600)
    assert check.stdout.split()[0] == digest
    # (over read_file's default cap of 64 MiB: raised for this read)
    back = sandbox.read_file("/tmp/big.bin", max_bytes=len(data)).result(timeout=600)
    elapsed = time.monotonic() - t0
    assert len(back) == len(data) and hashlib.sha256(back).hexdigest() == digest
    sandbox.exec(["rm", "-f", "/tmp/big.bin"]).result()
    return elapsed


@pytest.mark.slow
def test_100_mib_round_trip(sandbox: Sandbox) -> None:
    _round_trip(sandbox, 100 * 1024 * 1024)


@pytest.mark.slow
@pytest.mark.skipif(not slow_tests_enabled(), reason="set AVIATO_SLOW_TESTS=1")
def test_1_gib_round_trip() -> None:
    with Sandbox.run(resources={"disk": "3Gi", "memory": "2Gi"}) as sandbox:
        _round_trip(sandbox, 1024 * 1024 * 1024)
