"""2 GiB each way through the streaming file calls, in a client subprocess whose peak RSS is
measured (ru_maxrss): the client must not grow with the file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

CLIENT = textwrap.dedent(
    """
    import json, os, resource, sys, time
    from aviato import Sandbox

    SIZE = 2 << 30
    CHUNK = bytes(1 << 20)
    local = sys.argv[1]

    def peak_mib():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def zeros():
        for _ in range(SIZE // len(CHUNK)):
            yield CHUNK

    out = {}
    with Sandbox.run(resources={"memory": "3Gi", "disk": "3Gi"}) as sb:
        sb.wait()
        sb.write_file("/tmp/warm", b"x" * 300_000).result()  # every code path loaded once
        sb.read_file("/tmp/warm").result()
        out["baseline_mib"] = peak_mib()
        t = time.monotonic()
        assert sb.write_file_streaming("/tmp/big", zeros()).result() == SIZE
        out["up_s"] = time.monotonic() - t
        out["after_up_mib"] = peak_mib()
        t = time.monotonic()
        got = 0
        with sb.read_file_streaming("/tmp/big") as chunks:
            for chunk in chunks:
                got += len(chunk)
        assert got == SIZE, got
        out["down_iter_s"] = time.monotonic() - t
        t = time.monotonic()
        assert sb.download_file("/tmp/big", local).result() == SIZE
        out["down_file_s"] = time.monotonic() - t
        out["after_down_mib"] = peak_mib()
    print(json.dumps(out))
    """
)


@pytest.mark.slow
def test_two_gib_each_way_in_bounded_client_memory(tmp_path: Path) -> None:
    local = tmp_path / "big.bin"
    proc = subprocess.run(
        [sys.executable, "-c", CLIENT, str(local)],
        capture_output=True,
        text=True,
        timeout=600,
        env=dict(os.environ),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    figures = json.loads(proc.stdout.strip().splitlines()[-1])
    print(figures)
    assert local.stat().st_size == 2 << 30
    growth = figures["after_down_mib"] - figures["baseline_mib"]
    assert growth < 64, figures  # a few tens of MiB at most, whatever the file's size
