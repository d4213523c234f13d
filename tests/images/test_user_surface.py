"""Images from the user's side: the SDK's `image_pull_credentials` and `image_command`, the
same on `aviato run`, and `aviato image pull`'s progress bar on a terminal.

Real service (a private state directory), real `docker-registry` on 127.0.0.1 (one of them
requiring a login), images built from busybox-static; SDK programs run as `python -c` in a fresh
interpreter, as a user would run them.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import select
import shutil
import struct
import subprocess
import sys
import tempfile
import termios
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from oci_helpers import Entry, Pusher, Registry, busybox_layer, require_image_tools, run_registry
from test_service import ROOT, Service, aviato_argv, running_service

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="these tests run sandboxes as root")

USER, PASSWORD = "bob", "s3cret-pw"


@pytest.fixture(scope="module")
def service() -> Iterator[Service]:
    yield from running_service("avus-")


def _registry(prefix: str, htpasswd: tuple[str, str] | None = None) -> Iterator[Registry]:
    require_image_tools()
    work = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    with run_registry(work, htpasswd=htpasswd) as reg:
        yield reg
    shutil.rmtree(work, ignore_errors=True)


@pytest.fixture(scope="module")
def private_registry() -> Iterator[Registry]:
    """A registry that requires `USER:PASSWORD` (htpasswd, basic auth)."""
    yield from _registry("avup-", htpasswd=(USER, PASSWORD))


@pytest.fixture(scope="module")
def open_registry() -> Iterator[Registry]:
    yield from _registry("avuo-")


def sdk(service: Service, code: str) -> subprocess.CompletedProcess[str]:
    """Runs `code` in a fresh interpreter against `service`; returns the finished process."""
    env = {**service.env, "PYTHONPATH": str(ROOT / "src")}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, env=env, timeout=180)  # fmt: skip


def last_json(out: subprocess.CompletedProcess[str]) -> dict[str, object]:
    assert out.returncode == 0, out.stderr
    result: dict[str, object] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


# --- SDK ----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_sdk_private_registry_needs_and_uses_image_pull_credentials(
    service: Service, private_registry: Registry
) -> None:
    pusher = Pusher(private_registry)
    pusher.image("t/priv-a", "v1", [busybox_layer()], env=["PATH=/bin", "WHO=a"])
    pusher.image("t/priv-b", "v1", [busybox_layer()], env=["PATH=/bin", "WHO=b"])
    host = private_registry.host
    out = sdk(
        service,
        f"""
        import json
        from aviato import (ImagePullCredentials, Sandbox, SandboxDefaults, SandboxFailedError,
                            Session)
        ref_a, ref_b = "{host}/t/priv-a:v1", "{host}/t/priv-b:v1"
        result = {{}}

        # 1. no credentials: the sandbox fails, and says how to give them
        sb = Sandbox.run(container_image=ref_a)
        try:
            sb.wait(timeout=60)
            result["denied"] = "no error: " + str(sb.status)
        except SandboxFailedError as exc:
            result["denied"] = str(exc)
            result["denied_reason"] = sb.status_reason

        # 2. explicit credentials on Sandbox.run
        creds = ImagePullCredentials(username="{USER}", password="{PASSWORD}")
        result["repr"] = repr(creds) + str(creds)
        with Sandbox.run(container_image=ref_a, image_pull_credentials=creds) as sb:
            r = sb.exec(["sh", "-c", "echo $WHO"]).result()
            result["a"] = [sb.container_image, r.stdout.strip(), r.returncode]
            again = Sandbox.from_id(sb.sandbox_id).result()
            result["kept"] = again._record.spec.HasField("registry_auth")

        # 3. credentials from the session's defaults (a dict), to another image of the registry
        defaults = SandboxDefaults(image_pull_credentials={{"username": "{USER}",
                                                            "password": "{PASSWORD}"}})
        result["defaults_repr"] = repr(defaults)
        with Session(defaults) as session:
            sb = session.sandbox(container_image=ref_b)
            r = sb.exec(["sh", "-c", "echo $WHO"]).result()
            result["b"] = [r.stdout.strip(), r.returncode]
        print(json.dumps(result))
    """,
    )
    result = last_json(out)
    denied = str(result["denied"])
    assert "pulling image" in denied and "requires a login" in denied, denied
    assert "image_pull_credentials" in denied
    assert "requires a login" in str(result["denied_reason"])
    assert result["a"] == [f"{host}/t/priv-a:v1", "a", 0]
    assert result["kept"] is False  # the service never stores nor returns them
    assert result["b"] == ["b", 0]
    for shown in (result["repr"], result["defaults_repr"]):
        assert PASSWORD not in str(shown) and "***" in str(shown)
    assert PASSWORD not in out.stderr


def test_sdk_invalid_credentials_and_options_are_clear_errors(service: Service) -> None:
    out = sdk(
        service,
        """
        import json
        from aviato import ImagePullCredentials, Sandbox, SandboxDefaults
        cases = {
            "no password": lambda: ImagePullCredentials(username="bob"),
            "both": lambda: ImagePullCredentials(token="t", username="bob", password="x"),
            "empty": lambda: ImagePullCredentials(),
            "bad key": lambda: Sandbox(image_pull_credentials={"user": "bob", "pass": "x"}),
            "bad type": lambda: Sandbox(image_pull_credentials=("bob", "x")),
            "cmd and image_command": lambda: Sandbox.run("echo", "hi", image_command=True),
            "defaults both": lambda: SandboxDefaults(command="echo", image_command=True),
            "host image_command": lambda: Sandbox.run(container_image="host", image_command=True),
        }
        out = {}
        for name, make in cases.items():
            try:
                make()
                out[name] = "no error"
            except Exception as exc:
                out[name] = f"{type(exc).__name__}: {exc}"
        print(json.dumps(out))
    """,
    )
    got = last_json(out)
    assert got["no password"] == (
        "SandboxValidationError: image_pull_credentials.password: required with a username"
    )
    assert str(got["both"]).startswith("SandboxValidationError: image_pull_credentials: give ")
    assert str(got["empty"]).startswith("SandboxValidationError: image_pull_credentials: empty")
    assert "unknown keys ['pass', 'user']" in str(got["bad key"])
    assert str(got["bad type"]).startswith("TypeError: image_pull_credentials must be")
    for name in ("cmd and image_command", "defaults both"):
        assert str(got[name]).startswith("SandboxValidationError: image_command=True runs"), got
    host = str(got["host image_command"])
    assert (
        host.startswith("SandboxValidationError") and "image_command: the 'host' image" in host
    ), host


@pytest.mark.slow
def test_sdk_image_command_runs_the_images_entrypoint_and_cmd(
    service: Service, open_registry: Registry
) -> None:
    pusher = Pusher(open_registry)
    pusher.image("t/job", "v1", [busybox_layer()], entrypoint=["echo", "entry"],
                 cmd=["cmd-arg", "two"])  # fmt: skip
    script = Entry("bin/job.sh", data=b"#!/bin/sh\necho job ran as $(id -u)\nexit 7\n", mode=0o755)
    pusher.image("t/fail", "v1", [busybox_layer([script])], cmd=["/bin/job.sh"])
    host = open_registry.host
    out = sdk(
        service,
        f"""
        import json
        from aviato import Sandbox, SandboxDefaults, SandboxFailedError, Session
        result = {{}}
        sb = Sandbox.run(container_image="{host}/t/job:v1", image_command=True)
        sb.wait_until_complete(timeout=60).result()
        result["ok"] = [sb.sandbox_id, sb.status.value, sb.returncode]

        sb = Sandbox.run(container_image="{host}/t/fail:v1", image_command=True)
        try:
            sb.wait_until_complete(timeout=60).result()
        except SandboxFailedError:
            pass
        result["fail"] = [sb.sandbox_id, sb.status.value, sb.returncode]

        # a session whose defaults run the image's command; a call's command still wins
        with Session(SandboxDefaults(container_image="{host}/t/job:v1",
                                     image_command=True)) as session:
            own = session.sandbox()
            own.wait_until_complete(timeout=60).result()
            result["session"] = own.returncode
            mine = session.sandbox(command="sleep", args=["30"])
            result["call_wins"] = mine.wait(timeout=60).status.value
        print(json.dumps(result))
    """,
    )
    result = last_json(out)
    ok_id, ok_status, ok_code = result["ok"]  # type: ignore[misc]
    assert (ok_status, ok_code) == ("completed", 0)
    assert service.cli("logs", str(ok_id)).stdout == "entry cmd-arg two\n"
    fail_id, fail_status, fail_code = result["fail"]  # type: ignore[misc]
    assert (fail_status, fail_code) == ("failed", 7)
    assert service.cli("logs", str(fail_id)).stdout == "job ran as 0\n"
    assert result["session"] == 0
    assert result["call_wins"] == "running"


# --- CLI ----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_cli_run_image_command(service: Service, open_registry: Registry) -> None:
    pusher = Pusher(open_registry)
    pusher.image("t/clijob", "v1", [busybox_layer()], cmd=["sh", "-c", "echo hi from $0; exit 3"])
    ref = f"{open_registry.host}/t/clijob:v1"
    ran = service.cli("run", "--image", ref, "--image-command")
    assert ran.returncode == 0, ran.stderr
    sid = ran.stdout.strip()
    deadline = time.monotonic() + 60
    while True:
        record = json.loads(service.cli("get", "--json", sid).stdout)
        if record["status"] in ("completed", "failed") or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert (record["status"], record["exit_code"]) == ("failed", 3)
    assert service.cli("logs", sid).stdout == "hi from sh\n"

    both = service.cli("run", "--image", ref, "--image-command", "--", "echo", "x")
    assert both.returncode != 0
    assert both.stderr.strip().count("\n") == 0 and "--image-command" in both.stderr

    host = service.cli("run", "--image", "host", "--image-command")
    assert host.returncode != 0 and "image_command" in host.stderr
    assert host.stderr.strip().count("\n") == 0, host.stderr


@pytest.mark.slow
def test_cli_run_with_registry_credentials(service: Service, private_registry: Registry) -> None:
    pusher = Pusher(private_registry)
    pusher.image("t/cli-priv", "v1", [busybox_layer()], env=["PATH=/bin", "WHO=cli"])
    pusher.image("t/cli-priv", "v2", [busybox_layer()], cmd=["echo", "private cmd"])
    ref = f"{private_registry.host}/t/cli-priv:v1"

    denied = service.cli("run", "--image", ref)
    assert denied.returncode != 0
    assert "requires a login" in denied.stderr and "--password-stdin" in denied.stderr
    assert denied.stderr.strip().count("\n") == 0, denied.stderr

    ran = service.cli("run", "--image", ref, "--username", USER, "--password-stdin",
                      input=PASSWORD + "\n")  # fmt: skip
    assert ran.returncode == 0, ran.stderr
    sid = ran.stdout.strip()
    assert service.cli("exec", sid, "--", "sh", "-c", "echo $WHO").stdout == "cli\n"
    record = service.cli("get", "--json", sid).stdout
    assert PASSWORD not in record

    ref2 = f"{private_registry.host}/t/cli-priv:v2"
    job = service.cli("run", "--image", ref2, "--image-command", "--username", USER,
                      "--password-stdin", input=PASSWORD + "\n")  # fmt: skip
    assert job.returncode == 0, job.stderr
    deadline = time.monotonic() + 60
    while json.loads(service.cli("get", "--json", job.stdout.strip()).stdout)["status"] not in (
        "completed", "failed") and time.monotonic() < deadline:  # fmt: skip
        time.sleep(0.2)
    assert service.cli("logs", job.stdout.strip()).stdout == "private cmd\n"

    no_stdin = service.cli("run", "--image", ref, "--username", USER)
    assert no_stdin.returncode != 0
    assert "--username needs --password-stdin" in no_stdin.stderr
    empty = service.cli("run", "--image", ref, "--username", USER, "--password-stdin", input="")
    assert empty.returncode != 0 and "empty password" in empty.stderr
    service.cli("rm", "-y", sid)

    # the service kept the password nowhere: records, logs, runtime state
    for path in service.state.rglob("*"):
        if path.is_file() and not path.is_symlink() and path.stat().st_size < 16 * 1024 * 1024:
            assert PASSWORD.encode() not in path.read_bytes(), path


@pytest.mark.slow
def test_cli_help_shows_the_image_options(service: Service) -> None:
    helptext = service.cli("run", "--help").stdout
    for part in ("--image-command", "--username USER", "--password-stdin", "Entrypoint + Cmd"):
        assert part in helptext
    assert "--password-stdin" in service.cli("image", "pull", "--help").stdout


# --- the progress bar of `aviato image pull` ----------------------------------------------------


def run_in_pty(
    argv: list[str], env: dict[str, str], *, stdout_file: Path | None = None, timeout: float = 120
) -> tuple[int, str]:
    """Runs `argv` with stdin, stdout and stderr on a pseudo-terminal (100x30) — stdout in
    `stdout_file` instead when given, as in ``x=$(cmd)`` typed at a terminal; returns its exit
    status and everything it wrote to the terminal."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 100, 0, 0))
    env = {**env, "TERM": "xterm-256color", "COLUMNS": "100", "LINES": "30"}
    env.pop("NO_COLOR", None)
    out = open(stdout_file, "wb") if stdout_file is not None else None  # noqa: SIM115
    proc = subprocess.Popen(argv, stdin=slave, stdout=out or slave, stderr=slave, env=env,
                            start_new_session=True)  # fmt: skip
    os.close(slave)
    if out is not None:
        out.close()
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if not ready:
                if proc.poll() is not None:
                    break
                continue
            try:
                data = os.read(master, 65536)
            except OSError as exc:  # EIO: the child closed the terminal
                if exc.errno != errno.EIO:
                    raise
                break
            if not data:
                break
            chunks.append(data)
        code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
    return code, b"".join(chunks).decode(errors="replace")


ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07")


@pytest.mark.slow
def test_image_pull_draws_a_progress_bar_on_a_terminal(
    service: Service, open_registry: Registry
) -> None:
    big = Entry("opt/blob.bin", data=os.urandom(3 * 1024 * 1024))  # incompressible: a real bar
    pushed = Pusher(open_registry).image("t/bar", "v1", [busybox_layer([big])])
    ref = f"{open_registry.host}/t/bar:v1"
    code, raw = run_in_pty([*aviato_argv(), "image", "pull", ref], service.env)
    assert code == 0, raw
    text = ANSI.sub("", raw).replace("\r", "\n")
    assert "\x1b[" in raw  # drawn with terminal control sequences (a live display)
    layer_hex = pushed.layers[0].split(":", 1)[1][:12]
    assert layer_hex in text  # one bar per layer, labelled with its short digest
    assert "━" in text  # the bar itself
    assert re.search(r"\d+(\.\d+)?/\d+(\.\d+)? MB", text), text  # bytes done / total
    assert "done" in text
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    assert lines[-1] == pushed.digest  # the final line: the digest

    # `digest=$(aviato image pull X)` at a terminal: the bar on the terminal, stdout the digest
    captured = service.state / "pull.out"
    code, raw = run_in_pty([*aviato_argv(), "image", "pull", ref], service.env,
                           stdout_file=captured)  # fmt: skip
    assert code == 0, raw
    assert "━" in raw and "done" in ANSI.sub("", raw)  # (the layers are in the store now)
    assert captured.read_text() == pushed.digest + "\n"

    # not a terminal: no bar, only the digest on stdout
    plain = service.cli("image", "pull", ref)
    assert plain.returncode == 0, plain.stderr
    assert plain.stdout == pushed.digest + "\n"


@pytest.mark.slow
def test_sdk_private_image_in_the_store_needs_credentials_on_every_use(
    service: Service, private_registry: Registry
) -> None:
    pusher = Pusher(private_registry)
    pusher.image("t/priv-c", "v1", [busybox_layer()], env=["PATH=/bin", "WHO=c"])
    host = private_registry.host
    out = sdk(
        service,
        f"""
        import json
        from aviato import ImagePullCredentials, Sandbox, SandboxFailedError
        ref = "{host}/t/priv-c:v1"
        result = {{}}
        good = ImagePullCredentials(username="{USER}", password="{PASSWORD}")
        with Sandbox.run(container_image=ref, image_pull_credentials=good) as sb:
            result["first"] = sb.exec(["sh", "-c", "echo $WHO"]).result().stdout.strip()
        for name, creds in (("none", None),
                            ("wrong", ImagePullCredentials(username="{USER}", password="nope"))):
            sb = Sandbox.run("sh", "-c", "echo ran", container_image=ref,
                             image_pull_credentials=creds)
            try:
                sb.wait(timeout=60)
                result[name] = "no error: " + str(sb.status)
            except SandboxFailedError:
                result[name] = sb.status_reason
        with Sandbox.run(container_image=ref, image_pull_credentials=good) as sb:
            result["again"] = sb.exec(["sh", "-c", "echo $WHO"]).result().stdout.strip()
        print(json.dumps(result))
    """,
    )
    result = last_json(out)
    assert result["first"] == "c" and result["again"] == "c", result
    for name in ("none", "wrong"):
        reason = str(result[name])
        assert "private image" in reason and "image_pull_credentials" in reason, reason
