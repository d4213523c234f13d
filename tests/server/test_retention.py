"""`--keep-stopped`: a real service removes ended sandboxes' records and kept logs once they are
older than its retention, and nothing else (the passes' logic is in test_retention_logic.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from _wait import wait_until
from server_helpers import SRC, ServerProcess

import aviato
from aviato import Sandbox
from aviato.exceptions import SandboxNotFoundError

KEEP = 3.0  # seconds: short for the test, long enough that a loaded machine sees "just now"


def _listed(url: str) -> dict[str, Sandbox]:
    return {
        sb.sandbox_id or "": sb for sb in Sandbox.list(include_stopped=True, base_url=url).result()
    }


def _ended_at(url: str, sandbox_id: str) -> float:
    """When the listed sandbox ended (unix seconds, the service's clock: this machine's)."""
    ended = _listed(url)[sandbox_id].ended_at
    assert ended is not None
    return ended.timestamp()


def test_ended_sandboxes_go_after_their_time_and_live_ones_stay(
    fresh_server: ServerProcess,
) -> None:
    fresh_server.args += ["--keep-stopped", f"{KEEP:g}s"]
    fresh_server.start()
    url = f"unix://{fresh_server.socket_path}"
    logs = fresh_server.state_dir / "logs"
    # Started first, so older than the retention by the time the others go: never removed.
    running = Sandbox.run(base_url=url)
    assert running.exec(["echo", "up"]).result().stdout == "up\n"
    first = Sandbox.run("sh", "-c", "echo from-first; exec sleep 300", base_url=url)
    wait_until(lambda: list(first.stream_logs()), "the first sandbox's log")
    first.stop().result(timeout=30)
    first_id = first.sandbox_id or ""
    assert (logs / f"{first_id}.log").exists()  # kept when it ended
    first_ended = _ended_at(url, first_id)

    wait_until(lambda: first_id not in _listed(url), "the first record to go", timeout=30)
    assert time.time() >= first_ended + KEEP  # not before its time
    assert not (logs / f"{first_id}.log").exists()
    with pytest.raises(SandboxNotFoundError):
        Sandbox.from_id(first_id, base_url=url).result(timeout=30)
    with pytest.raises(SandboxNotFoundError):
        Sandbox.delete(first_id, base_url=url).result(timeout=30)

    # The running sandbox, created before the retention's time, is untouched and works.
    assert _listed(url)[running.sandbox_id or ""].status == aviato.SandboxStatus.RUNNING
    assert running.exec(["echo", "still"]).result().stdout == "still\n"

    # One stopped just now is listed, with its log, until its own time has passed.
    second = Sandbox.run("sh", "-c", "echo from-second; exec sleep 300", base_url=url)
    wait_until(lambda: list(second.stream_logs()), "the second sandbox's log")
    second.stop().result(timeout=30)
    second_id = second.sandbox_id or ""
    second_ended = _ended_at(url, second_id)
    assert [r.text for r in second.stream_logs()] == ["from-second\n"]
    wait_until(lambda: second_id not in _listed(url), "the second record to go", timeout=30)
    assert time.time() >= second_ended + KEEP
    assert not (logs / f"{second_id}.log").exists()

    assert running.sandbox_id in _listed(url)
    info = aviato.server_info(url, start_local=False)
    assert info.kept_stopped == f"{KEEP:g}s (2 removed since the service started)"
    running.stop().result(timeout=30)


def test_the_default_and_zero_keep_ended_sandboxes(fresh_server: ServerProcess) -> None:
    """A default service keeps ended sandboxes a week; `0` forever (no pass runs at all)."""
    url = f"unix://{fresh_server.socket_path}"
    fresh_server.start()
    assert aviato.server_info(url, start_local=False).kept_stopped.startswith("7d (0 removed")
    fresh_server.stop()
    fresh_server.args += ["--keep-stopped", "0"]
    fresh_server.start()
    sb = Sandbox.run("echo", "done", base_url=url)
    sb.wait_until_complete().result(timeout=30)
    sb_id = sb.sandbox_id or ""
    time.sleep(2.0)  # several passes' worth of a 1 s retention
    assert sb_id in _listed(url)
    assert (fresh_server.state_dir / "logs" / f"{sb_id}.log").exists()
    assert aviato.server_info(url, start_local=False).kept_stopped == "forever"


@pytest.mark.parametrize("value", ["-1", "5x", "", "1e3", "200000d"])
def test_bad_values_are_refused_naming_the_option(value: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "aviato.server", "--keep-stopped", value],
        capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": SRC},
    )  # fmt: skip
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert "--keep-stopped" in last and repr(value) in last, last
    assert "Traceback" not in result.stderr


def test_readers_racing_the_removal_see_the_record_or_not_found(
    fresh_server: ServerProcess,
) -> None:
    """Gets, log reads and listings of sandboxes while the retention removes them: each call
    answers with the sandbox as it was, or NOT_FOUND in the user's words; the service lives."""
    fresh_server.args += ["--keep-stopped", "1s"]
    fresh_server.start()
    url = f"unix://{fresh_server.socket_path}"
    ended = [Sandbox.run("echo", f"run-{i}", base_url=url) for i in range(12)]
    ids = []
    for sb in ended:
        sb.wait_until_complete().result(timeout=30)
        ids.append(sb.sandbox_id or "")
    answers: list[str] = []
    unexpected: list[BaseException] = []

    def read(sandbox_id: str) -> None:
        while True:
            try:
                found = Sandbox.from_id(sandbox_id, base_url=url).result(timeout=30)
                texts = [r.text for r in found.stream_logs()]
                assert texts in ([], [f"run-{ids.index(sandbox_id)}\n"]), texts
                _listed(url)
                answers.append("found")
            except SandboxNotFoundError as e:
                assert sandbox_id in str(e) and "Traceback" not in str(e), str(e)
                answers.append("not found")
                return
            except BaseException as e:  # reported below, with the others
                unexpected.append(e)
                return

    with ThreadPoolExecutor(len(ids)) as pool:
        list(pool.map(read, ids, timeout=60))
    assert not unexpected, unexpected
    assert answers.count("not found") == len(ids)
    assert "found" in answers  # some were read while there, then gone: the race ran
    assert not set(ids) & set(_listed(url))
    assert aviato.server_info(url, start_local=False).kept_stopped == (
        f"1s ({len(ids)} removed since the service started)"
    )
