"""The public API is precisely typed: mypy --strict on a user snippet."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

SNIPPET = textwrap.dedent(
    """
    import asyncio
    import aviato
    from aviato import OperationRef, Process, ProcessResult, Sandbox, Session

    sandbox = Sandbox.run()
    reveal_type(sandbox.exec(["echo"]).result())
    reveal_type(sandbox.exec(["echo"]))
    reveal_type(sandbox.read_file("/x"))
    reveal_type(Sandbox.list().get())
    reveal_type(sandbox.wait())
    reveal_type(sandbox.returncode)
    for chunk in sandbox.exec(["echo"]).stdout:
        reveal_type(chunk)

    session = Session()

    @session.function()
    def add(a: int, b: int) -> int:
        return a + b

    reveal_type(add.remote(1, 2))
    reveal_type(add.map([(1, 2)]))
    reveal_type(add.local(1, 2))
    reveal_type(aviato.results(add.remote(1, 2)))

    async def main() -> None:
        result = await sandbox.exec(["ls"])
        reveal_type(result)
        same = await sandbox
        reveal_type(same)
        files = await Sandbox.list()
        reveal_type(files)
    """
)

EXPECTED = [
    '"aviato.exceptions.ProcessResult"',
    '"aviato._process.Process"',
    '"aviato._operation.OperationRef[builtins.bytes]"',
    '"builtins.list[aviato._sandbox.Sandbox]"',
    '"aviato._sandbox.Sandbox"',
    '"builtins.int | None"',
    '"builtins.str"',
    '"aviato._operation.OperationRef[builtins.int]"',
    '"builtins.list[aviato._operation.OperationRef[builtins.int]]"',
    '"builtins.int"',
    '"builtins.int"',
    '"aviato.exceptions.ProcessResult"',
    '"aviato._sandbox.Sandbox"',
    '"builtins.list[aviato._sandbox.Sandbox]"',
]


@pytest.mark.slow
def test_reveal_types(tmp_path: Path) -> None:
    pytest.importorskip("mypy")
    snippet = tmp_path / "snippet.py"
    snippet.write_text(SNIPPET)
    src = Path(__file__).resolve().parents[2] / "src"
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--strict",
            "--no-incremental",
            "--follow-imports=silent",
            "--cache-dir",
            str(tmp_path / ".mypy_cache"),
            str(snippet),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "MYPYPATH": str(src)},
        cwd=tmp_path,
    )
    revealed = [
        line.split("Revealed type is ", 1)[1].replace("builtins.", "")
        for line in out.stdout.splitlines()
        if "Revealed type is" in line
    ]
    assert revealed == [e.replace("builtins.", "") for e in EXPECTED], out.stdout
    errors = [line for line in out.stdout.splitlines() if ": error:" in line]
    assert errors == [], out.stdout
