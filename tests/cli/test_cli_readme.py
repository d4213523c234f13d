"""README.md tells the truth: its Python examples run verbatim, and CI can find its two commands.

Each ```python block runs as its own `python -c` (a fresh interpreter, as a reader would paste
it) against this session's service. The two shell commands are run by `.ci/run` itself, which
reads them after the `<!-- ci:install -->` and `<!-- ci:test -->` markers.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from clitools import Cli

README = Path(__file__).resolve().parents[2] / "README.md"
_PYTHON_BLOCK = re.compile(r"```python\n(.*?)```", re.S)


def _python_blocks() -> list[str]:
    return _PYTHON_BLOCK.findall(README.read_text()) if README.exists() else []


def test_readme_has_the_two_commands_where_ci_reads_them() -> None:
    text = README.read_text()
    for marker, expected in (("ci:install", "pip install ."), ("ci:test", "pytest")):
        after = text.split(f"<!-- {marker} -->", 1)
        assert len(after) == 2, f"README.md lacks <!-- {marker} -->"
        block = after[1].lstrip().split("```")[1]
        command = block.removeprefix("bash\n").strip()
        assert expected in command and "\n" not in command, command


@pytest.mark.parametrize("code", _python_blocks(), ids=lambda c: c.strip().splitlines()[-1][:40])
def test_readme_python_example_runs(cli: Cli, code: str) -> None:
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=cli.env,
        stdin=subprocess.DEVNULL,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "hello" in result.stdout or "sandbox-" in result.stdout
