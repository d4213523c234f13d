"""Where the compiled supervisor is (`supervisor_binary()`), and which C library it was built
against (`c_library()`)."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

from aviato.runtime.base import SandboxRuntimeError

# setup.py compiles runtime/native/*.c to runtime/_bin/aviato-supervisor.
_BUILT = Path(__file__).resolve().parent.parent / "_bin" / "aviato-supervisor"


class SupervisorMissing(SandboxRuntimeError):
    """The compiled supervisor is not where the package expects it."""


def supervisor_binary() -> Path:
    """The `aviato-supervisor` built with the package; `$AVIATO_SUPERVISOR` overrides it."""
    override = os.environ.get("AVIATO_SUPERVISOR")
    path = Path(override) if override else _BUILT
    if not (path.is_file() and os.access(path, os.X_OK)):
        raise SupervisorMissing(
            f"the sandbox supervisor binary is missing or not executable: {path}. It is compiled "
            "when aviato is installed (this needs a C compiler): reinstall with "
            "`pip install --force-reinstall --no-deps aviato` or, in a checkout, `pip install -e .`"
        )
    return path


def c_library(path: str | Path) -> str:
    """ "musl" or "glibc": what the supervisor at `path` was built against (setup.py says why it
    matters), from its `--version`; "" when it does not say (an older build) or does not run."""
    try:
        out = subprocess.run(
            [str(path), "--version"], capture_output=True, text=True, timeout=10, check=False
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return ""
    found = re.search(r"protocol \d+ \((musl|glibc)\)", out)
    return found.group(1) if found else ""
