"""`aviato files ls|stat|rm|mkdir|mv` and `aviato cp -r` both ways."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from clitools import Cli, assert_one_line_error


@pytest.mark.slow
def test_files_commands(cli: Cli, sandbox: str) -> None:
    cli.ok("files", "mkdir", "-p", "-m", "750", sandbox, "/tmp/c/a/b")
    cli.ok("cp", "-", f"{sandbox}:/tmp/c/a/f.txt", input="hi\n")
    listing = cli.ok("files", "ls", sandbox, "/tmp/c/a").stdout
    assert "b/" in listing and "f.txt" in listing and "drwxr-x---" in listing
    assert '"type": "file"' in cli.ok("files", "stat", "--json", sandbox, "/tmp/c/a/f.txt").stdout
    cli.ok("files", "mv", sandbox, "/tmp/c/a/f.txt", "/tmp/c/a/b/g.txt")
    assert cli.ok("cp", f"{sandbox}:/tmp/c/a/b/g.txt", "-").stdout == "hi\n"
    assert_one_line_error(cli("files", "rm", sandbox, "/tmp/c"), "/tmp/c")
    assert_one_line_error(cli("files", "rm", "-r", sandbox, "/"), "never removed")
    cli.ok("files", "rm", "-r", sandbox, "/tmp/c")
    assert_one_line_error(cli("files", "stat", sandbox, "/tmp/c"), "/tmp/c")


@pytest.mark.slow
def test_cp_r_both_ways(cli: Cli, sandbox: str, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    (repo / "src").mkdir(parents=True)
    (repo / "src" / "main.py").write_text("print(1)\n")
    os.chmod(repo / "src" / "main.py", 0o755)
    (repo / "link").symlink_to("src/main.py")
    cli.ok("cp", "-r", str(repo), f"{sandbox}:/tmp/repo")
    assert cli.ok("exec", sandbox, "--", "cat", "/tmp/repo/link").stdout == "print(1)\n"
    out = tmp_path / "out"
    cli.ok("cp", "-r", f"{sandbox}:/tmp/repo", str(out))
    assert (out / "src" / "main.py").read_text() == "print(1)\n"
    assert os.readlink(out / "link") == "src/main.py"
    assert (out / "src" / "main.py").stat().st_mode & 0o777 == 0o755
    assert_one_line_error(cli("cp", str(repo), f"{sandbox}:/tmp/x"), "cp -r")
