"""`aviato.images` never imports `aviato.runtime`: the runtime uses the image store, never the
reverse (the two once imported each other)."""

from __future__ import annotations

import ast
from pathlib import Path

IMAGES = Path(__file__).resolve().parents[2] / "src/aviato/images"


def imported_modules(source: str) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def test_images_does_not_import_the_runtime() -> None:
    offenders = {
        f"{path.name}: {module}"
        for path in sorted(IMAGES.glob("*.py"))
        for module in imported_modules(path.read_text())
        if module == "aviato.runtime" or module.startswith("aviato.runtime.")
    }
    assert not offenders, f"aviato.images imports the runtime: {sorted(offenders)}"


def test_the_check_sees_imports_in_every_form() -> None:
    source = (
        "import aviato.runtime.base\n"
        "from aviato.runtime import image_roots\n"
        "def f():\n    from aviato.runtime.base import SandboxGone\n"
    )
    assert {"aviato.runtime.base", "aviato.runtime.image_roots"} <= imported_modules(source)
    assert "aviato.runtime.base.SandboxGone" in imported_modules(source)
