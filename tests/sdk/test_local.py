"""Finding and starting the embedded local service (`aviato._local_service`)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from aviato import AviatoConnectionError, _local_service


@pytest.fixture
def fresh_dir() -> Iterator[Path]:
    directory = Path(tempfile.mkdtemp(prefix="avl", dir="/tmp"))
    yield directory
    pid_file = directory / "server.pid"
    with contextlib.suppress(OSError, ValueError):
        pid = int(pid_file.read_text().split()[0])
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        while pid_file.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
    shutil.rmtree(directory, ignore_errors=True)


def _server_pid(directory: Path) -> int:
    return int((directory / "server.pid").read_text().split()[0])


@pytest.mark.slow
def test_many_processes_start_exactly_one_service(fresh_dir: Path) -> None:
    code = textwrap.dedent(
        """
        import sys
        from aviato._local_service import ensure_local_service
        print(ensure_local_service(sys.argv[1]))
        """
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(fresh_dir)], stdout=subprocess.PIPE, text=True
        )
        for _ in range(6)
    ]
    outputs = [p.communicate(timeout=60)[0].strip() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert set(outputs) == {str(fresh_dir / "aviato.sock")}
    log = (fresh_dir / "server.log").read_text()
    assert log.count("started by pid") == 1, log
    pid = _server_pid(fresh_dir)
    assert _local_service.ensure_local_service(fresh_dir) == str(fresh_dir / "aviato.sock")
    assert _server_pid(fresh_dir) == pid  # answered: nothing new started


def test_stale_socket_is_replaced(fresh_dir: Path) -> None:
    stale = fresh_dir / "aviato.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(stale))
    s.close()  # the file stays, nobody listens: connection refused
    assert stale.exists()
    t0 = time.monotonic()
    assert _local_service.ensure_local_service(fresh_dir) == str(stale)
    assert time.monotonic() - t0 < 15
    assert _local_service._answers(stale)


def test_a_service_that_cannot_start_reports_its_log(
    fresh_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_python = fresh_dir / "python"
    fake_python.write_text("#!/bin/sh\necho 'boom: cannot start the service' >&2\nexit 3\n")
    fake_python.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(fake_python))
    t0 = time.monotonic()
    with pytest.raises(AviatoConnectionError) as info:
        _local_service.ensure_local_service(fresh_dir)
    assert time.monotonic() - t0 < 10
    assert "exited with code 3" in str(info.value)
    assert "boom: cannot start the service" in str(info.value)


def test_too_long_socket_path() -> None:
    with pytest.raises(AviatoConnectionError, match="too long"):
        _local_service.ensure_local_service("/tmp/" + "x" * 120)


def test_state_dir_resolution(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AVIATO_STATE_DIR", "/tmp/a")
    assert _local_service.state_dir() == Path("/tmp/a")
    monkeypatch.delenv("AVIATO_STATE_DIR")
    monkeypatch.setenv("XDG_STATE_HOME", "/tmp/xdg")
    assert _local_service.state_dir() == Path("/tmp/xdg/aviato")
    monkeypatch.delenv("XDG_STATE_HOME")
    assert _local_service.state_dir() == Path.home() / ".local/state/aviato"


@pytest.mark.slow
def test_the_sdk_restarts_a_service_that_died(fresh_dir: Path) -> None:
    code = textwrap.dedent(
        """
        import os, signal, time
        from aviato import Sandbox
        assert Sandbox.list().result() == []
        pid = int(open(os.environ["AVIATO_STATE_DIR"] + "/server.pid").read().split()[0])
        os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)
        assert Sandbox.list().result() == []  # retried; the service was started again
        new = int(open(os.environ["AVIATO_STATE_DIR"] + "/server.pid").read().split()[0])
        assert new != pid
        print("ok")
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "AVIATO_STATE_DIR": str(fresh_dir)},
    )
    assert out.stdout == "ok\n", out.stderr


def test_a_sandbox_stays_on_its_service_when_the_environment_changes(
    fresh_dir: Path, tmp_path: Path
) -> None:
    other = tmp_path / "other-state"
    code = textwrap.dedent(
        """
        import os, sys
        from aviato import Sandbox
        sb = Sandbox.run()
        assert sb.exec(["true"]).result().returncode == 0
        os.environ["AVIATO_STATE_DIR"] = sys.argv[1]  # later sandboxes go to another service
        print(sb.exec(["echo", "still here"]).result().stdout, end="")
        sb.stop().result()
        """
    )
    try:
        out = subprocess.run(
            [sys.executable, "-c", code, str(other)],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "AVIATO_STATE_DIR": str(fresh_dir)},
        )
        assert out.stdout == "still here\n", out.stderr
        assert not (other / "server.pid").exists()  # no second service was started for it
    finally:
        with contextlib.suppress(OSError, ValueError):
            os.kill(_server_pid(other), signal.SIGTERM)
