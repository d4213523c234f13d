"""The finish a new user notices (issue 18), from the SDK, each as the user sees it:

- resource values refused in words ("a size such as 512Mi or 2G"), before the call;
- a service's refusal names the argument as the user wrote it (no wire paths, no status names);
- the original SDK's API where it costs little: unsupported arguments are a
  `SandboxValidationError` naming them, empty placement pins pass, `list(show_terminated=)`,
  `SandboxFileError.reason`;
- `AVIATO_API_KEY` changed after the first call is used;
- SIGTERM to a program holding a `Session` after its local service was stopped does not start
  a service.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from reliability.harness import Service, free_port, short_tempdir

from aviato import AviatoAuthenticationError, Sandbox, SandboxFileError
from aviato.exceptions import SandboxValidationError
from aviato.server import auth
from aviato.server.registry import Registry

from .conftest import TEST_TAG


def test_resource_values_are_refused_in_words_before_the_call() -> None:
    cases = {
        "memory": ("lots", "is not a size such as 512Mi or 2G"),
        "disk": ("1 GB", "is not a size such as 512Mi or 2G"),
        "cpu": ("fast", "is not a number of CPUs such as 0.5, 500m or 2"),
    }
    for key, (value, words) in cases.items():
        with pytest.raises(SandboxValidationError) as err:
            Sandbox(resources={key: value})
        assert str(err.value).startswith(f'resources["{key}"]: {value!r} {words}'), err.value
        assert err.value.code is None  # refused here, nothing was sent


def test_a_service_refusal_names_the_argument_as_written() -> None:
    cases = [
        ({"resources": {"memory": "1Ki"}}, 'resources["memory"]: '),
        ({"environment_variables": {"A=B": "x"}}, "environment_variables['A=B']: "),
        ({"network": {"egress": [{"dns_name": "bad name!"}]}}, "network.egress[0].dns_name: "),
        ({"max_lifetime_seconds": 10**9}, "max_lifetime_seconds: 1000000000 is outside [0, "),
        ({"tags": [TEST_TAG, "bad tag"]}, "tags[1]: "),
    ]
    for options, lead in cases:
        options.setdefault("tags", [TEST_TAG])
        with pytest.raises(SandboxValidationError) as err:
            Sandbox.run(**options)  # type: ignore[arg-type]
        text = str(err.value)
        assert text.startswith("create sandbox failed: " + lead), text
        assert "spec." not in text and "INVALID_ARGUMENT" not in text


def test_an_empty_command_says_so(sandbox: Sandbox) -> None:
    for argv in ([""], ["", "x"]):
        with pytest.raises(SandboxValidationError) as err:
            sandbox.exec(argv).result()
        assert str(err.value).startswith("exec failed: the command is empty"), err.value
        assert "init.argv" not in str(err.value)


def test_the_original_sdks_arguments() -> None:
    for name, value, advice in (
        ("ports", [{"container_port": 8080}], "exposed_ports"),
        ("s3_mount", {"bucket": "b"}, "volume"),
        ("max_timeout_seconds", 30, "max_lifetime_seconds"),
        ("runway_ids", ["rw-1"], "node_selector"),
        ("tower_ids", ["tw-1"], "node_selector"),
    ):
        with pytest.raises(SandboxValidationError) as err:
            Sandbox.run(**{name: value})  # type: ignore[arg-type]
        assert f"{name}= is not supported" in str(err.value) and advice in str(err.value)
    with pytest.raises(TypeError, match="containr_image"):  # a typo stays a TypeError
        Sandbox(containr_image="x")  # type: ignore[call-arg]
    # Empty placement pins, as code written for the original passes them, are ignored.
    with Sandbox.run(tags=[TEST_TAG], runway_ids=[], tower_ids=[]) as sb:  # type: ignore[call-arg]
        sid = sb.sandbox_id
        assert sb.exec(["true"]).result().returncode == 0
        with pytest.raises(SandboxFileError) as err:
            sb.read_file("/nonexistent/file").result()
        assert err.value.reason == "FILE_NOT_FOUND" and err.value.filepath == "/nonexistent/file"
    listed = Sandbox.list(tags=[TEST_TAG], show_terminated=True, runway_ids=[]).result()
    assert sid in [s.sandbox_id for s in listed]
    assert sid not in [s.sandbox_id for s in Sandbox.list(tags=[TEST_TAG]).result()]
    with pytest.raises(SandboxValidationError, match="runway_ids= is not supported"):
        Sandbox.list(runway_ids=["rw-1"])


@pytest.fixture
def keyed_service() -> Iterator[tuple[Service, int, dict[str, str]]]:
    port = free_port()
    svc = Service("--listen", f"127.0.0.1:{port}")
    svc.state_dir.mkdir(mode=0o700)
    reg = Registry(svc.state_dir / "registry.db")
    keys = {name: auth.create_key(reg, name, "finish")[1] for name in ("alice", "bob")}
    reg.close()
    try:
        svc.start()
        yield svc, port, keys
    finally:
        svc.finish()


KEY_SCRIPT = textwrap.dedent(
    """
    import os, sys
    from aviato import Sandbox, AviatoAuthenticationError
    os.environ["AVIATO_API_KEY"] = "not-a-key"
    try:
        Sandbox.list().result()
        print("accepted")
    except AviatoAuthenticationError:
        print("refused")
    os.environ["AVIATO_API_KEY"] = sys.argv[1]
    sb = Sandbox.run()
    print(sb.sandbox_id)
    os.environ["AVIATO_API_KEY"] = sys.argv[2]
    print(len(Sandbox.list().result()))
    sb.stop().result()  # the sandbox keeps the key it was made with
    print("stopped")
    """
)


@pytest.mark.slow
def test_an_api_key_changed_after_the_first_call_is_used(
    keyed_service: tuple[Service, int, dict[str, str]],
) -> None:
    _, port, keys = keyed_service
    env = {k: v for k, v in os.environ.items() if not k.startswith("AVIATO_")}
    env["AVIATO_BASE_URL"] = f"http://127.0.0.1:{port}"
    out = subprocess.run(
        [sys.executable, "-c", KEY_SCRIPT, keys["alice"], keys["bob"]],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    lines = out.stdout.split()
    assert out.returncode == 0, out.stderr
    assert lines[0] == "refused" and lines[1].startswith("sbx-")
    assert lines[2] == "0"  # bob sees none of alice's sandboxes
    assert lines[3] == "stopped"
    assert AviatoAuthenticationError  # (imported for the reader: the first call's error)


SESSION_SCRIPT = textwrap.dedent(
    f"""
    import time
    from aviato import Session, SandboxDefaults
    session = Session(SandboxDefaults(tags=({TEST_TAG!r},), lease_ttl_seconds=5))
    sb = session.sandbox()
    sb.start().result()
    sb.exec(["true"]).result()
    print(sb.sandbox_id, flush=True)
    time.sleep(600)
    """
)


def _aviato(state: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AVIATO_")}
    env["AVIATO_STATE_DIR"] = str(state)
    script = Path(sys.executable).with_name("aviato")
    return subprocess.run(
        [str(script), *args], capture_output=True, text=True, env=env, timeout=120
    )


@pytest.mark.slow
def test_sigterm_after_the_service_stopped_does_not_start_one() -> None:
    state = short_tempdir("avt-fin-")
    env = {k: v for k, v in os.environ.items() if not k.startswith("AVIATO_")}
    env["AVIATO_STATE_DIR"] = str(state)
    proc = subprocess.Popen(
        [sys.executable, "-c", SESSION_SCRIPT],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        sandbox_id = proc.stdout.readline().strip()
        assert sandbox_id.startswith("sbx-"), proc.stderr.read() if proc.stderr else ""
        # The service is the session's child (a zombie until the session reaps it): the stop
        # must see it ended, not wait out its timeout and "kill" it.
        stopped = _aviato(state, "server", "stop")
        assert stopped.returncode == 0 and "did not stop" not in stopped.stderr, stopped.stderr
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        assert time.monotonic() - started < 10
        assert proc.returncode == -signal.SIGTERM
        time.sleep(1)
        status = _aviato(state, "server", "status")
        assert status.returncode == 3, status.stdout  # not running: nothing started it
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        _aviato(state, "server", "start")
        _aviato(state, "rm", "--all", "-y")
        _aviato(state, "server", "stop")
        shutil.rmtree(state, ignore_errors=True)
