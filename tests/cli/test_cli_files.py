"""`aviato cp` in both directions, with stdin/stdout, directories as targets, and its errors."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from clitools import Cli, Terminal, assert_one_line_error, aviato_argv


@pytest.mark.slow
def test_round_trip_of_a_large_binary_file(cli: Cli, sandbox: str, tmp_path: Path) -> None:
    original = tmp_path / "blob.bin"
    original.write_bytes(os.urandom(6 * 1024 * 1024 + 7))  # several chunks, odd size
    original.chmod(0o640)
    cli.ok("cp", str(original), f"{sandbox}:/workspace/blob.bin")
    digest = cli.ok("exec", sandbox, "--", "sha256sum", "/workspace/blob.bin").stdout.split()[0]
    import hashlib

    assert digest == hashlib.sha256(original.read_bytes()).hexdigest()
    assert (
        cli.ok("exec", sandbox, "--", "stat", "-c", "%a", "/workspace/blob.bin").stdout == "640\n"
    )

    back = tmp_path / "back.bin"
    cli.ok("cp", f"{sandbox}:/workspace/blob.bin", str(back))
    assert back.read_bytes() == original.read_bytes()
    assert oct(back.stat().st_mode & 0o777) == oct(0o640)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".back.bin")], "temp file left"


@pytest.mark.slow
def test_directory_targets_keep_the_file_name(cli: Cli, sandbox: str, tmp_path: Path) -> None:
    source = tmp_path / "notes.txt"
    source.write_text("hello\n")
    cli.ok("cp", str(source), f"{sandbox}:/tmp/")
    assert cli.ok("exec", sandbox, "--", "cat", "/tmp/notes.txt").stdout == "hello\n"
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    cli.ok("cp", f"{sandbox}:/tmp/notes.txt", str(out_dir))
    assert (out_dir / "notes.txt").read_text() == "hello\n"


@pytest.mark.slow
def test_stdin_and_stdout(cli: Cli, sandbox: str) -> None:
    cli.ok("cp", "-", f"{sandbox}:/workspace/from-stdin.txt", input="piped\n")
    assert cli.ok("cp", f"{sandbox}:/workspace/from-stdin.txt", "-").stdout == "piped\n"


@pytest.mark.slow
def test_parents_are_created_only_when_asked(cli: Cli, sandbox: str, tmp_path: Path) -> None:
    source = tmp_path / "x.txt"
    source.write_text("x")
    assert cli("cp", str(source), f"{sandbox}:/workspace/a/b/x.txt").returncode != 0
    cli.ok("cp", "-p", str(source), f"{sandbox}:/workspace/a/b/x.txt")
    assert cli.ok("exec", sandbox, "--", "cat", "/workspace/a/b/x.txt").stdout == "x"


@pytest.mark.slow
def test_errors(cli: Cli, sandbox: str, tmp_path: Path) -> None:
    assert_one_line_error(cli("cp", str(tmp_path / "missing"), f"{sandbox}:/tmp/x"), "missing")
    assert_one_line_error(cli("cp", str(tmp_path), f"{sandbox}:/tmp/x"), "directory")
    assert_one_line_error(
        cli("cp", f"{sandbox}:/no/such/file", str(tmp_path / "y")), "/no/such/file"
    )
    assert not (tmp_path / "y").exists()
    assert_one_line_error(
        cli("cp", f"{sandbox}:/etc/hostname", str(tmp_path / "nodir" / "y")), "nodir"
    )
    assert_one_line_error(cli("cp", "sb-nope:/etc/hostname", str(tmp_path / "z")), "sb-nope")


@pytest.mark.slow
def test_progress_bar_on_a_terminal_only(cli: Cli, sandbox: str, tmp_path: Path) -> None:
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(20 * 1024 * 1024))
    term = Terminal([*aviato_argv(), "cp", str(big), f"{sandbox}:/tmp/big.bin"], cli.env, 24, 100)
    try:
        assert term.wait(timeout=60) == 0
        shown = term.seen.decode(errors="replace")
        assert "big.bin" in shown and "/21.0 MB" in shown  # rich's "done/total MB" column
    finally:
        term.close()
    piped = cli.ok("cp", str(big), f"{sandbox}:/tmp/big2.bin")
    assert piped.stdout == "" and piped.stderr == ""
    quiet = Terminal(
        [*aviato_argv(), "cp", "-q", str(big), f"{sandbox}:/tmp/big3.bin"], cli.env, 24, 100
    )
    try:
        assert quiet.wait(timeout=60) == 0
        assert "MB" not in quiet.seen.decode(errors="replace")
    finally:
        quiet.close()
