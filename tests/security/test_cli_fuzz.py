"""Hostile command lines for the `aviato` CLI, property-based, against a real service.

The CLI runs in-process (`aviato.cli.main.run`, what the console script calls) inside click's
stream isolation, with `AVIATO_BASE_URL` pointing at a private service. Arguments are
malformed, oversized, non-UTF-8 (as Python presents undecodable argv: surrogate escapes),
contain NUL bytes, negative and huge numbers, unknown choices, paths with `..` and absolute
paths. Every invocation must end with an exit status (0, 1, 2, 124, 125, or the status of the
command `exec` ran) and, when it fails, one "aviato: ..." line on stderr per failure (`rm A B`
may report each id) and no traceback; the service must keep running. Local files are only
ever written inside a temporary directory.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reliability.harness import Service

SETTINGS = settings(
    max_examples=120, deadline=None, database=None, suppress_health_check=list(HealthCheck)
)


class Cli:
    def __init__(self, svc: Service, sandbox_id: str, workdir: Path) -> None:
        self.svc = svc
        self.sandbox_id = sandbox_id
        self.workdir = workdir

    def __call__(self, argv: list[str]) -> tuple[int, str, str]:
        from aviato.cli.main import run

        env = {
            "AVIATO_BASE_URL": f"unix://{self.svc.socket_path}",
            "AVIATO_API_KEY": None,
            "AVIATO_STATE_DIR": str(self.svc.state_dir),
            "COLUMNS": "100",
        }
        old = os.getcwd()
        os.chdir(self.workdir)
        try:
            with CliRunner().isolation(input=b"", env=env) as (out, err, _):
                code = run(argv)
                return (
                    code,
                    out.getvalue().decode(errors="replace"),
                    err.getvalue().decode(errors="replace"),
                )
        finally:
            os.chdir(old)


@pytest.fixture(scope="module")
def cli(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cli]:
    svc = Service()
    try:
        svc.start()
        sb = svc.client().running(tags=["cli-fuzz"])
        yield Cli(svc, sb.id, tmp_path_factory.mktemp("cli-cwd"))
        assert svc.running(), svc.log_tail()
        assert "Traceback" not in svc.log_text()
    finally:
        svc.finish()


NON_UTF8 = st.binary(min_size=1, max_size=12).map(os.fsdecode)  # how Python shows such argv
TEXT = st.one_of(
    st.text(st.characters(blacklist_categories=("Cs",)), max_size=20),
    NON_UTF8,
    st.sampled_from(
        [
            "",
            "-",
            "--",
            "-1",
            "-9999999999999999999",
            "99999999999999999999999",
            "1e309",
            "nan",
            "inf",
            "0x10",
            "..",
            "../../etc/passwd",
            "/etc/shadow",
            "/proc/1/root/etc/shadow",
            "a\x00b",
            "x" * 100_000,
            "--help=1",
            "-h1",
            "=",
            "A=",
            "=B",
            "K=\x00",
            "1Qi",
            "-5Mi",
            "1h1h",
            "🙂",
        ]
    ),
)
LOCAL = st.text("abcdefghijklmnopqrstuvwxyz0123456789_", min_size=1, max_size=12)


def _ids(cli: Cli) -> st.SearchStrategy[str]:
    return st.one_of(TEXT, st.just(cli.sandbox_id), st.just("sbx-000000000000"))


@st.composite
def command_lines(draw: st.DrawFn, sandbox_id: str) -> list[str]:
    ident = draw(st.one_of(TEXT, st.just(sandbox_id), st.just("sbx-000000000000")))
    path = draw(
        st.one_of(
            TEXT,
            st.sampled_from(
                ["/workspace/f", "/etc/passwd", "/proc/1/mem", "/workspace/../../etc", "/dev/zero"]
            ),
        )
    )
    kind = draw(
        st.sampled_from(
            ["get", "stop", "rm", "logs", "exec", "cp-in", "cp-out", "run", "ls", "keys", "soup"]
        )
    )
    if kind == "get":
        return ["get", *draw(st.lists(st.just("--json"), max_size=1)), ident]
    if kind == "stop":
        return ["stop", "--grace", draw(TEXT), draw(TEXT)]
    if kind == "rm":
        return ["rm", "-y", *draw(st.lists(TEXT, min_size=1, max_size=3))]
    if kind == "logs":
        return ["logs", "--tail", draw(TEXT), ident]
    if kind == "exec":
        opts = draw(st.lists(st.sampled_from(["-w", "-e", "--timeout"]), max_size=3))
        argv = ["exec"]
        for opt in opts:
            argv += [opt, draw(TEXT)]
        program = draw(
            st.sampled_from(["/bin/echo", "/bin/true", "/bin/false", "nonexistent", "/etc", "sh"])
        )
        return [*argv, ident, "--", program, *draw(st.lists(TEXT, max_size=3))]
    if kind == "cp-in":
        name = draw(LOCAL)
        (Path.cwd() / name).write_bytes(b"local content")
        return ["cp", "-q", *draw(st.lists(st.just("-p"), max_size=1)), name, f"{ident}:{path}"]
    if kind == "cp-out":
        return ["cp", "-q", f"{ident}:{path}", draw(LOCAL)]
    if kind == "run":
        argv = ["run", "--no-wait", "--tag", "cli-fuzz"]
        for opt in draw(
            st.lists(
                st.sampled_from(["--image", "-t", "-e", "--cpu", "--memory", "--lifetime", "-w"]),
                max_size=3,
            )
        ):
            argv += [opt, draw(TEXT)]
        return [*argv, "--", *draw(st.lists(TEXT, max_size=2))]
    if kind == "ls":
        argv = ["ls"]
        for opt in draw(st.lists(st.sampled_from(["-t", "-s"]), max_size=2)):
            argv += [opt, draw(TEXT)]
        return argv + draw(st.lists(st.sampled_from(["-a", "--json", "-q"]), max_size=2))
    if kind == "keys":
        return draw(
            st.sampled_from(
                [
                    ["keys", "create", draw(TEXT), "--name", draw(TEXT)],
                    ["keys", "revoke", draw(TEXT)],
                    ["keys", "list"],
                ]
            )
        )
    return draw(st.lists(TEXT, min_size=1, max_size=4))


EXIT_OF_ITS_OWN = {0, 1, 2, 124, 125}


@pytest.mark.slow
@SETTINGS
@given(data=st.data())
def test_hostile_command_lines(cli: Cli, data: st.DataObject) -> None:
    os.chdir(cli.workdir)
    argv = data.draw(command_lines(cli.sandbox_id))
    code, _, err = cli(argv)
    assert isinstance(code, int) and 0 <= code <= 255, (argv, code)
    assert "Traceback" not in err, (argv, err)
    # exec exits with its command's status (1 and 2 included), then without a message.
    is_exec_status = argv[:1] == ["exec"] and (code not in EXIT_OF_ITS_OWN or not err.strip())
    if code != 0 and not is_exec_status:
        lines = [ln for ln in err.splitlines() if ln.strip()]
        # One line per failure: `rm A B` may report each id it could not delete.
        per_item = len(argv) - 2 if argv[:1] == ["rm"] else 1
        assert 1 <= len(lines) <= per_item, (argv, code, err)
        assert all(ln.startswith("aviato: ") for ln in lines), (argv, err)
        assert "internal error" not in err, (argv, err)
        # An exception the CLI did not expect is shown with its class name and a debug hint;
        # the SDK's own argument checks raise ValueError with a message naming the argument.
        unexpected = "AVIATO_DEBUG" in err and "aviato: error: ValueError: " not in err
        assert not unexpected, (argv, err)
        assert "out of range" not in err, (argv, err)
        assert "Exception iterating" not in err, (argv, err)
    assert cli.svc.running()


@pytest.mark.slow
def test_non_utf8_argv_as_a_real_process(cli: Cli, tmp_path: Path) -> None:
    """Real argv bytes that are not UTF-8 (what a shell can pass), through the console script."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("AVIATO_")}
    env["AVIATO_BASE_URL"] = f"unix://{cli.svc.socket_path}"
    for argv in (
        [b"get", b"\xff\xfe"],
        [b"exec", cli.sandbox_id.encode(), b"--", b"/bin/echo", b"\xff\xc3("],
        [b"run", b"--no-wait", b"-t", b"\xff"],
        [b"cp", b"-q", cli.sandbox_id.encode() + b":/\xff", b"out"],
        [b"cp", b"-q", b"local", cli.sandbox_id.encode() + b":/workspace/\xff"],
        [b"logs", b"--tail", b"-1", cli.sandbox_id.encode()],
    ):
        (tmp_path / "local").write_bytes(b"data")
        proc = subprocess.run(
            [sys.executable, "-m", "aviato", *argv],
            capture_output=True,
            env=env,
            cwd=tmp_path,
            timeout=60,
        )
        assert b"Traceback" not in proc.stderr and b"AVIATO_DEBUG" not in proc.stderr, proc
        assert b"Exception iterating" not in proc.stderr, proc
        assert proc.returncode in (1, 2), (argv, proc)
        assert len(proc.stderr.strip().splitlines()) == 1, (argv, proc.stderr)
        if argv[0] in (b"exec", b"run", b"cp"):
            assert b"is not valid UTF-8" in proc.stderr, proc.stderr
