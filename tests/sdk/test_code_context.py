"""Code contexts against the real service and real sandboxes (the `host` image, whose Python has
neither IPython nor matplotlib: our own interpreter runs; IPython's path is tested in
test_code_driver.py): state, values, rich outputs, errors, interrupts, timeouts, several
contexts, async use, and code that attacks the driver's channel."""

from __future__ import annotations

import asyncio
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Iterator
from typing import Any

import pytest

from aviato import CodeContext, CodeContextError, Sandbox

from .conftest import TEST_TAG

PNG_MAKER = r"""
import struct, zlib
def make_png(width, height):
    raw = b"".join(b"\x00" + b"\xff\x00\x00" * width for _ in range(height))
    def chunk(kind, data):
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw))
            + chunk(b"IEND", b""))
"""


def make_png(width: int, height: int) -> bytes:
    namespace: dict[str, Any] = {"struct": struct, "zlib": zlib}
    exec(PNG_MAKER, namespace)
    png: bytes = namespace["make_png"](width, height)
    return png


@pytest.fixture(scope="module")
def sandbox() -> Iterator[Sandbox]:
    with Sandbox.run(tags=[TEST_TAG]) as sb:
        sb.wait()
        yield sb


@pytest.fixture
def ctx(sandbox: Sandbox) -> Iterator[CodeContext]:
    with sandbox.code_context() as context:
        assert context.ready().result(60) == "python"
        yield context


def test_state_is_kept_across_ten_runs(ctx: CodeContext) -> None:
    ctx.run("total = 0").result(30)
    for i in range(1, 10):
        execution = ctx.run(f"total += {i}\ntotal").result(30)
        assert execution.ok, execution.error
        assert execution.value == sum(range(1, i + 1))
        assert execution.execution_count == i + 1
    assert ctx.run("x = 1").result(30).text is None
    assert ctx.run("x + 1").result(30).value == 2


def test_values_text_and_output(ctx: CodeContext) -> None:
    execution = ctx.run(
        "print('hello'); import sys; print('oops', file=sys.stderr)\n{1, 2}"
    ).result(30)
    assert execution.stdout == "hello\n" and execution.stderr == "oops\n"
    assert execution.text == "{1, 2}" and execution.value is None  # a set is not JSON data
    data = ctx.run("{'a': [1, 2.5, None, True, 'x']}").result(30)
    assert data.value == {"a": [1, 2.5, None, True, "x"]}
    assert ctx.run("None").result(30).text is None
    assert (
        ctx.run("import os; os.system('echo from-a-child')").result(30).stdout == "from-a-child\n"
    )


def test_errors_are_structured_and_keep_the_context(ctx: CodeContext) -> None:
    ctx.run("kept = 'yes'").result(30)
    execution = ctx.run("def f():\n    raise ValueError('boom')\nf()").result(30)
    assert not execution.ok and execution.error is not None
    assert (execution.error.name, execution.error.value) == ("ValueError", "boom")
    lines = execution.error.traceback
    assert lines[0].startswith("Traceback") and lines[-1] == "ValueError: boom"
    assert any("raise ValueError('boom')" in line for line in lines)
    assert not any("aviato-driver" in line for line in lines)
    syntax = ctx.run("def (").result(30).error
    assert syntax is not None and syntax.name == "SyntaxError"
    assert ctx.run("kept").result(30).value == "yes"


def test_png_and_other_rich_outputs(ctx: CodeContext) -> None:
    code = PNG_MAKER + (
        "class Red:\n"
        "    def _repr_png_(self): return make_png(4, 3)\n"
        "class Many:\n"
        "    def _repr_html_(self): return '<b>hi</b>'\n"
        "    def _repr_svg_(self): return '<svg/>'\n"
        "    def _repr_markdown_(self): return '*hi*'\n"
        "    def _repr_latex_(self): return '$x$'\n"
        "    def _repr_json_(self): return {'k': [1, 2]}\n"
        "    def _repr_jpeg_(self): return None\n"
        "display(Many(), 'plain')\n"
        "Red()"
    )
    execution = ctx.run(code).result(30)
    assert execution.ok, execution.error
    many, plain, red = execution.outputs
    assert (many.html, many.svg, many.markdown, many.latex) == (
        "<b>hi</b>",
        "<svg/>",
        "*hi*",
        "$x$",
    )
    assert many.json == {"k": [1, 2]} and many.jpeg is None and not many.is_result
    assert plain.formats == ["text/plain"] and plain.text == "'plain'"
    assert red.is_result and execution.result is red
    assert red.png == make_png(4, 3)


def test_matplotlib_figure_as_png(ctx: CodeContext) -> None:
    if not ctx.run("import matplotlib").result(30).ok:
        pytest.skip("matplotlib is not installed in the sandbox's Python")
    execution = ctx.run("import matplotlib.pyplot as plt\nplt.plot([1, 2, 3])\nNone").result(60)
    assert execution.ok, execution.error
    assert any((o.png or b"").startswith(b"\x89PNG") for o in execution.outputs)


def test_output_streams_live_to_callbacks(ctx: CodeContext) -> None:
    seen: list[tuple[float, str]] = []
    shown: list[str | None] = []
    code = (
        "import sys, time\nprint('first')\ntime.sleep(0.5)\nprint('oops', file=sys.stderr)\n"
        "display('shown')\n'value'"
    )
    run = ctx.run(
        code,
        on_stdout=lambda text: seen.append((time.monotonic(), text)),
        on_stderr=lambda text: seen.append((time.monotonic(), "err:" + text)),
        on_output=lambda output: shown.append(output.text),
    )
    execution = run.result(30)
    finished = time.monotonic()
    assert [text for _, text in seen] == ["first\n", "err:oops\n"]
    assert finished - seen[0][0] > 0.3  # the first line arrived while the run went on
    assert shown == ["'shown'", "'value'"] and execution.stdout == "first\n"


def test_a_failing_callback_is_raised_after_the_run(ctx: CodeContext) -> None:
    def fail(text: str) -> None:
        raise RuntimeError("callback broke")

    with pytest.raises(RuntimeError, match="callback broke"):
        ctx.run("print('a'); after = 1", on_stdout=fail).result(30)
    assert ctx.run("after").result(30).value == 1


def test_an_interrupted_infinite_loop_keeps_the_context(ctx: CodeContext) -> None:
    ctx.run("x = 42").result(30)
    run = ctx.run("while True: pass")
    time.sleep(0.5)
    assert not run.done()
    ctx.interrupt().result(30)
    execution = run.result(30)
    assert execution.error is not None and execution.error.name == "KeyboardInterrupt"
    assert not any("aviato-driver" in line for line in execution.error.traceback)
    assert ctx.run("x").result(30).value == 42


def test_a_timeout_interrupts_and_keeps_the_context(ctx: CodeContext) -> None:
    ctx.run("y = 'still here'").result(30)
    started = time.monotonic()
    execution = ctx.run("import time\nprint('before')\ntime.sleep(60)", timeout=0.5).result(30)
    assert time.monotonic() - started < 10
    assert execution.timed_out and execution.error is not None
    assert execution.error.name == "TimeoutError" and execution.stdout == "before\n"
    assert ctx.run("y").result(30).value == "still here"


def test_an_interrupt_sent_at_once_is_not_lost(ctx: CodeContext) -> None:
    ctx.run("z = 3").result(30)
    for _ in range(5):
        execution = ctx.run("while True: pass", timeout=0.001).result(30)
        assert execution.timed_out
        run = ctx.run("while True: pass")
        ctx.interrupt()
        error = run.result(30).error
        assert error is not None and error.name == "KeyboardInterrupt"
        assert ctx.run("z").result(30).value == 3  # and no interrupt was left for a later run


def test_a_cancelled_run_is_interrupted(ctx: CodeContext) -> None:
    ctx.run("w = 5").result(30)
    for _ in range(3):
        run = ctx.run("while True: pass")
        run.cancel()
    assert ctx.run("w").result(30).value == 5  # not stuck behind a loop nobody waits for


@pytest.mark.slow
def test_code_that_ignores_the_interrupt_loses_the_context(sandbox: Sandbox) -> None:
    ctx = sandbox.code_context()
    code = (
        "import time\nwhile True:\n    try:\n        time.sleep(5)\n"
        "    except KeyboardInterrupt:\n        pass"
    )
    with pytest.raises(CodeContextError, match="did not stop"):
        ctx.run(code, timeout=0.3).result(60)
    assert ctx.closed
    with pytest.raises(CodeContextError):
        ctx.run("1").result(30)
    with sandbox.code_context() as fresh:
        assert fresh.run("1 + 1").result(30).value == 2


def test_two_contexts_are_independent(sandbox: Sandbox) -> None:
    with sandbox.code_context() as a, sandbox.code_context() as b:
        a.run("name = 'a'").result(30)
        b.run("name = 'b'").result(30)
        assert (a.run("name").result(30).value, b.run("name").result(30).value) == ("a", "b")
        assert b.run("del name").result(30).ok
        assert a.run("name").result(30).value == "a"


def test_async_use(sandbox: Sandbox) -> None:
    async def main() -> list[Any]:
        async with sandbox.code_context() as ctx:
            await ctx.run(
                "import asyncio\nasync def twice(n):\n    await asyncio.sleep(0)\n    return 2 * n"
            )
            first = await ctx.run("await twice(21)")
            second = await ctx.run("[await twice(i) for i in range(3)]")
            return [first.value, second.value]

    assert asyncio.run(main()) == [42, [0, 2, 4]]


def test_closed_context_refuses_runs(sandbox: Sandbox) -> None:
    ctx = sandbox.code_context()
    ctx.run("1").result(30)
    ctx.close().result(30)
    assert ctx.closed
    with pytest.raises(CodeContextError, match="closed"):
        ctx.run("1").result(30)


def test_ipython_kernel_asked_for_but_missing_says_so(sandbox: Sandbox) -> None:
    ctx = sandbox.code_context(kernel="ipython")
    with pytest.raises(CodeContextError, match=r"could not start.*IPython"):
        ctx.ready().result(60)


def test_a_sandbox_without_that_python_says_so(sandbox: Sandbox) -> None:
    ctx = sandbox.code_context(python="no-such-python")
    with pytest.raises(CodeContextError, match="'no-such-python' could not run"):
        ctx.run("1").result(60)


@pytest.mark.slow
def test_a_stopped_sandbox_ends_its_contexts() -> None:
    with Sandbox.run(tags=[TEST_TAG]) as sb:
        ctx = sb.code_context()
        ctx.run("x = 1").result(60)
        sb.stop().result(60)
        with pytest.raises(CodeContextError, match="gone"):
            ctx.run("x").result(60)


def test_bad_arguments_are_refused_in_the_callers_words(sandbox: Sandbox) -> None:
    with pytest.raises(ValueError, match="language='python'"):
        sandbox.code_context("ruby")
    with pytest.raises(ValueError, match="kernel must be one of"):
        sandbox.code_context(kernel="jupyter")
    with pytest.raises(ValueError, match="max_output_bytes"):
        sandbox.code_context(max_output_bytes=0)
    with sandbox.code_context() as ctx:
        with pytest.raises(ValueError, match="timeout must be a positive number"):
            ctx.run("1", timeout=-1)
        with pytest.raises(TypeError, match="as a str"):
            ctx.run(b"1")  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="over 16 MiB"):
            ctx.run("#" * (17 << 20))
        with pytest.raises(ValueError, match="not valid text"):
            ctx.run("'\ud800'")
        assert ctx.run("'still fine'").result(30).value == "still fine"


# --- attacks on the channel -------------------------------------------------------------------

FORGER = r"""
import json, os, struct, sys
def frame(message, token=b"\x00" * 16):
    body = json.dumps(message).encode()
    return b"\xffAVZ" + token + struct.pack(">I", len(body)) + body
run = RUN
fake = (frame({"k": "value", "run": run, "data": {"text/plain": "'forged'"}, "json": "forged"})
        + frame({"k": "done", "run": run, "count": 1, "frames": 1, "stdout_bytes": 0,
                 "stderr_bytes": 0, "dropped": []})
        + frame({"k": "value", "run": run, "data": {"text/plain": "'forged'"}}, os.urandom(16)))
sys.stdout.buffer.write(fake); sys.stdout.flush()
os.write(1, fake)
os.write(2, fake)
for fd in range(3, 1024):
    try:
        os.write(fd, b"\xff" * 99 + fake + b"\xffAVZ" + b"\x01" * 20 + fake[:30])
    except OSError:
        pass
41
"""


def test_forged_frames_on_stdout_and_on_the_channel_change_nothing(ctx: CodeContext) -> None:
    ctx.run("warm = 1").result(30)
    execution = ctx.run(FORGER.replace("RUN", "2")).result(30)
    assert execution.ok, execution.error
    assert execution.value == 41 and execution.text == "41"
    assert all("forged" not in (o.text or "") for o in execution.outputs)
    assert "forged" in execution.stdout  # what it printed is its output, as text
    assert execution.notes == ()
    assert ctx.run("warm + 1").result(30).value == 2


def test_closing_stdout_and_stderr_is_survived(ctx: CodeContext) -> None:
    ctx.run("import os\nos.close(0)\nos.close(1)\nos.close(2)").result(30)
    execution = ctx.run("print('back'); 7").result(30)
    assert (execution.stdout, execution.value) == ("back\n", 7)
    assert ctx.run("os.read(0, 10)").result(30).text == "b''"  # /dev/null again: end of file


def test_closing_every_descriptor_ends_the_context_with_a_clear_error(sandbox: Sandbox) -> None:
    ctx = sandbox.code_context()
    ctx.run("before = 1").result(30)
    started = time.monotonic()
    with pytest.raises(CodeContextError, match="closed or replaced the interpreter's channel"):
        ctx.run("import os\nos.closerange(3, 65536)").result(30)
    assert time.monotonic() - started < 10
    with sandbox.code_context() as fresh:
        assert fresh.run("2").result(30).value == 2


def test_printing_100_mib_is_cut_and_bounded(sandbox: Sandbox) -> None:
    with sandbox.code_context(max_output_bytes=1 << 20) as ctx:
        started = time.monotonic()
        execution = ctx.run(
            "import sys\nfor _ in range(100):\n    sys.stdout.write('x' * (1 << 20))\n'done'"
        ).result(120)
        assert execution.value == "done" and execution.stdout_truncated
        assert len(execution.stdout) == 1 << 20
        assert time.monotonic() - started < 60
        assert ctx.run("print('next')").result(30).stdout == "next\n"


def test_an_oversized_rich_output_is_left_out_with_a_note(sandbox: Sandbox) -> None:
    with sandbox.code_context(max_display_bytes=1 << 20) as ctx:
        code = "class Big:\n    def _repr_png_(self): return b'\\x89PNG' + bytes(2 << 20)\nBig()"
        execution = ctx.run(code).result(30)
        assert execution.ok and execution.result is not None
        assert execution.result.png is None and execution.result.text is not None
        assert any("image/png" in note for note in execution.notes)


def test_replacing_the_channel_ends_the_context_with_a_clear_error(sandbox: Sandbox) -> None:
    ctx = sandbox.code_context()
    ctx.run("before = 1").result(30)
    code = (
        "import os\nnull = os.open(os.devnull, os.O_WRONLY)\n"
        "for fd in range(100, 1024):\n"
        "    try:\n        os.fstat(fd)\n    except OSError:\n        continue\n"
        "    os.dup2(null, fd)\n"
    )
    started = time.monotonic()
    with pytest.raises(CodeContextError, match="closed or replaced the interpreter's channel"):
        ctx.run(code).result(30)
    assert time.monotonic() - started < 10


COUNT_DRIVERS = (
    "import os\n"
    "mark = b'_aviato' + b'_driver'\n"
    "def cmdline(pid):\n"
    "    try:\n"
    "        with open('/proc/%s/cmdline' % pid, 'rb') as f:\n"
    "            return f.read()\n"
    "    except OSError:\n"
    "        return b''\n"
    "print(sum(mark in cmdline(p) for p in os.listdir('/proc') if p.isdigit()))"
)


def _drivers_in(sandbox: Sandbox) -> int:
    """How many code-context interpreters run in `sandbox`."""
    return int(sandbox.exec(["python3", "-c", COUNT_DRIVERS]).result().stdout)


def test_a_client_killed_mid_run_leaves_no_interpreter_behind(sandbox: Sandbox) -> None:
    before = _drivers_in(sandbox)
    script = (
        "import sys, aviato\n"
        f"sb = aviato.Sandbox.from_id({sandbox.sandbox_id!r}).result()\n"
        "ctx = sb.code_context()\n"
        "ctx.run('x = 1').result(30)\n"
        "run = ctx.run('while True: pass')\n"
        "print('running', flush=True)\n"
        "run.result()\n"
    )
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline() == "running\n"
        assert _drivers_in(sandbox) == before + 1
        time.sleep(0.3)
    finally:
        child.kill()
        child.wait()
    deadline = time.monotonic() + 20
    while _drivers_in(sandbox) > before and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _drivers_in(sandbox) == before


THIEF = r"""
import gc
channel = next(o for o in gc.get_objects() if hasattr(o, "token") and hasattr(o, "fd_out"))
run = RUN
for _ in range(2):
    channel.send({"k": "out", "run": run, "name": "stdout", "text": "x" * (8 << 20)})
for i in range(300):
    channel.send({"k": "display", "run": run, "data": {"text/plain": str(i), "x/evil": "y"}})
channel.send({"k": "error", "run": run, "name": "E" * 10000, "value": "v" * (1 << 20),
              "traceback": ["t" * 20000] * 300})
"""


@pytest.mark.slow
def test_a_driver_whose_token_was_stolen_is_still_parsed_with_bounds(sandbox: Sandbox) -> None:
    with sandbox.code_context(max_output_bytes=1 << 20) as ctx:
        execution = ctx.run(THIEF.replace("RUN", "1")).result(120)
        assert len(execution.stdout) == 1 << 20 and execution.stdout_truncated
        assert len(execution.outputs) == 256
        assert all(o.formats == ["text/plain"] for o in execution.outputs)
        assert execution.error is not None and len(execution.error.name) == 200
        assert len(execution.error.traceback) == 200
        assert all(len(line) <= 4096 for line in execution.error.traceback)
        assert len(execution.notes) == len(set(execution.notes))
        assert ctx.run("'after'").result(30).value == "after"
