"""docs/api.md is generated from the docstrings and covers every public name."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_api_reference_is_up_to_date() -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_api_docs.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr + out.stdout


def test_public_surface() -> None:
    import aviato

    assert sorted(aviato.__all__) == sorted(set(aviato.__all__))
    for name in aviato.__all__:
        assert getattr(aviato, name) is not None
    assert isinstance(aviato.__version__, str) and aviato.__version__
    # the aviato-era names a user imports
    from aviato import (  # noqa: F401
        NetworkOptions,
        OperationRef,
        Process,
        ProcessResult,
        Sandbox,
        SandboxDefaults,
        SandboxStatus,
        Serialization,
        Session,
        StreamReader,
        StreamWriter,
        results,
        wait,
    )
    from aviato.exceptions import (  # noqa: F401
        AsyncFunctionError,
        AviatoAuthenticationError,
        AviatoError,
        FunctionError,
        FunctionSerializationError,
        SandboxError,
        SandboxExecutionError,
        SandboxFailedError,
        SandboxFileError,
        SandboxNotFoundError,
        SandboxNotRunningError,
        SandboxTerminatedError,
        SandboxTimeoutError,
        WandbAuthError,
    )


def test_import_has_no_side_effects() -> None:
    code = (
        "import signal, threading, aviato\n"
        "assert [t.name for t in threading.enumerate()] == ['MainThread']\n"
        "assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout == "ok\n", out.stderr
