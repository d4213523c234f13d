"""The small internet cleans up after itself, also after its owner was killed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from small_internet import SmallInternet, remove_stale

SCRIPT = Path(__file__).parent / "small_internet.py"


def namespaces() -> set[str]:
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in listed.splitlines() if line.split()}


@pytest.mark.slow
def test_namespaces_left_by_a_killed_owner_are_removed(small_internet: SmallInternet) -> None:
    owner = subprocess.Popen(
        [sys.executable, str(SCRIPT)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert owner.stdout is not None
        line = owner.stdout.readline()
        assert line, owner.stderr.read() if owner.stderr else "no output"
        assert json.loads(line)["dns"] == "192.0.2.1"
        directory = Path(json.loads(line)["ca_file"]).parent  # its certificates, its index
    except BaseException:
        owner.terminate()  # tears down
        owner.wait(10)
        raise
    left = {f"avn{owner.pid}{role}" for role in "ihs"}  # pids of the servers die with them
    os.kill(owner.pid, signal.SIGKILL)  # no teardown runs
    owner.wait()
    assert left <= namespaces() and directory.is_dir()
    removed = remove_stale()
    assert left <= set(removed)
    assert not left & namespaces()
    assert not directory.exists()  # each CI run left one behind before
    assert set(small_internet.namespaces.values()) <= namespaces()  # a live owner's stay
