"""IPython inside a real sandbox: the `host` image's Python has no IPython, so the test copies
this environment's IPython (pure Python) and the packages it imports into the sandbox, puts
them on PYTHONPATH, and checks that ``kernel="auto"`` picks IPython and that it behaves as in a
notebook there: magics, shell escapes, display objects, errors, interrupts."""

from __future__ import annotations

import importlib.util
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from aviato import CodeContext, Sandbox

from .conftest import TEST_TAG

# What IPython imports to start, run cells, show tracebacks and run `!cmd` (measured).
PACKAGES = (
    "IPython",
    "traitlets",
    "pygments",
    "stack_data",
    "executing",
    "asttokens",
    "pure_eval",
    "pexpect",
    "ptyprocess",
    "decorator",
)


def _package_dir(name: str) -> Path | None:
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        return None
    origin = Path(spec.origin)
    return origin.parent if origin.name == "__init__.py" else origin


@pytest.fixture(scope="module")
def ctx() -> Iterator[CodeContext]:
    if _package_dir("IPython") is None:
        pytest.skip("IPython is not installed here")
    staging = Path(tempfile.mkdtemp(prefix="avt-ipy-"))
    try:
        for name in PACKAGES:
            source = _package_dir(name)
            if source is None:
                continue
            target = staging / source.name
            if source.is_dir():
                shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                shutil.copy2(source, target)
        with Sandbox.run(tags=[TEST_TAG]) as sb:
            sb.upload_dir(staging, "/opt/ipython").result(120)
            with sb.code_context(env={"PYTHONPATH": "/opt/ipython"}) as context:
                context.ready().result(120)
                yield context
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@pytest.mark.slow
def test_auto_picks_ipython_in_the_sandbox(ctx: CodeContext) -> None:
    assert ctx.kernel == "ipython"
    ctx.run("x = 20").result(60)
    assert ctx.run("x + 22").result(60).value == 42
    assert ctx.run("!echo from-the-sandbox-shell").result(60).stdout.strip() == (
        "from-the-sandbox-shell"
    )
    assert ctx.run("%who_ls").result(60).value == ["x"]


@pytest.mark.slow
def test_ipython_display_errors_and_interrupts_in_the_sandbox(ctx: CodeContext) -> None:
    shown = ctx.run("from IPython.display import HTML, display\ndisplay(HTML('<i>hi</i>'))")
    (html,) = shown.result(60).outputs
    assert html.html == "<i>hi</i>"
    error = ctx.run("1 / 0").result(60).error
    assert error is not None and error.name == "ZeroDivisionError"
    run = ctx.run("while True: pass")
    time.sleep(0.3)
    ctx.interrupt().result(30)
    interrupted = run.result(30).error
    assert interrupted is not None and interrupted.name == "KeyboardInterrupt"
    assert ctx.run("x").result(60).value == 20
