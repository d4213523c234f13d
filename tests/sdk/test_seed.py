"""Every code block of the user's document `sync-vs-async.md` runs verbatim.

The document is copied into `tests/sdk/seed/` so the tests never depend on a sibling directory;
one test checks that the copy still equals the original when the original is present.

- Each ```python block outside the Jupyter section runs as its own `python -c` subprocess
  (a fresh interpreter, as a user would run it), against the session's local service.
- The Jupyter section runs in a real IPython kernel through nbclient: its first block is split
  into cells on the ``# Cell N`` comments, then the top-level-await block is the last cell.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent
SEED_COPY = HERE / "seed" / "sync-vs-async.md"
SEED_ORIGINAL = Path(__file__).resolve().parents[2].parent / "shared" / "seed" / "sync-vs-async.md"

_BLOCK = re.compile(r"```python\n(.*?)```", re.S)


def _sections(text: str) -> list[tuple[str, list[str]]]:
    """[(section title, [python blocks])] in document order."""
    out: list[tuple[str, list[str]]] = []
    for part in re.split(r"^## ", text, flags=re.M)[1:]:
        title = part.splitlines()[0].strip()
        out.append((title, _BLOCK.findall(part)))
    return out


def seed_blocks() -> tuple[list[tuple[str, str]], list[str]]:
    """(non-Jupyter blocks as (id, code), Jupyter blocks)."""
    plain: list[tuple[str, str]] = []
    jupyter: list[str] = []
    for title, blocks in _sections(SEED_COPY.read_text()):
        if "jupyter" in title.lower():
            jupyter.extend(blocks)
        else:
            for i, code in enumerate(blocks):
                slug = re.sub(r"\W+", "-", title.lower()).strip("-")
                plain.append((f"{slug}-{i}", code))
    return plain, jupyter


PLAIN, JUPYTER = seed_blocks()

# What each block prints (a check that it really ran, not only that it exited 0).
EXPECTED_OUTPUT = {
    "sync-pattern-recommended-default-0": ["hello\n"],
    "async-codebases-0": ["hello\n"],
    "parallel-execution-0": ["sandbox-0\n", "sandbox-1\n", "sandbox-2\n"],
}


def test_the_copy_is_the_users_document() -> None:
    if not SEED_ORIGINAL.exists():
        pytest.skip(f"{SEED_ORIGINAL} is not present")
    assert SEED_COPY.read_text() == SEED_ORIGINAL.read_text()


def test_the_document_has_the_expected_blocks() -> None:
    assert [name for name, _ in PLAIN] == list(EXPECTED_OUTPUT)
    assert len(JUPYTER) == 2


@pytest.mark.parametrize(("name", "code"), PLAIN, ids=[name for name, _ in PLAIN])
def test_block_runs_verbatim(name: str, code: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=180,
        env=os.environ.copy(),
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    for expected in EXPECTED_OUTPUT[name]:
        assert expected in proc.stdout, proc.stdout
    assert "Traceback" not in proc.stderr, proc.stderr


def test_the_parallel_blocks_clean_up_really_stops_its_sandboxes() -> None:
    """The block ends with ``for sb in sandboxes: sb.stop()`` and exits without waiting: the
    interpreter's exit must let those stops finish (it used to cancel them)."""
    from aviato import Sandbox

    (code,) = [code for name, code in PLAIN if name == "parallel-execution-0"]
    before = {sb.sandbox_id for sb in Sandbox.list(include_stopped=True).result(timeout=60)}
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=180,
        env=os.environ.copy(),
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, proc.stderr
    made = [
        sb
        for sb in Sandbox.list(include_stopped=True).result(timeout=60)
        if sb.sandbox_id not in before
    ]
    assert len(made) == 3
    assert [sb.status.value if sb.status else None for sb in made] == ["terminated"] * 3


def jupyter_cells() -> list[str]:
    first, top_level_await = JUPYTER
    cells = [c.strip() + "\n" for c in re.split(r"(?m)^(?=# Cell \d+)", first) if c.strip()]
    return [*cells, top_level_await]


def test_jupyter_cells_split() -> None:
    cells = jupyter_cells()
    assert len(cells) == 5
    assert [c.splitlines()[0] for c in cells[:4]] == [
        "# Cell 1 - Create sandbox",
        "# Cell 2 - Execute commands",
        "# Cell 3 - Discovery",
        "# Cell 4 - Cleanup",
    ]


@pytest.mark.slow
def test_jupyter_notebook_in_a_real_kernel() -> None:
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(source) for source in jupyter_cells()]
    client = nbclient.NotebookClient(
        nb, timeout=180, kernel_name="python3", resources={"metadata": {"path": str(HERE)}}
    )
    client.execute()

    def text(cell: object) -> str:
        return "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream")  # type: ignore[attr-defined]

    for cell in nb.cells:
        errors = [o for o in cell.outputs if o.output_type == "error"]
        assert not errors, errors
    assert text(nb.cells[1]) == "2\n\n"  # print(result.stdout) of "print(1+1)"
    assert re.fullmatch(r"Found \d+ sandboxes\n", text(nb.cells[2]))
