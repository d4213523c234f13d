"""The in-sandbox driver under this test environment's own Python, which has IPython (the `host`
image's Python has not): IPython's kernel path (magics, shell escapes, its display system,
tracebacks, interrupts) and matplotlib figures, when installed. The driver runs as a real
subprocess speaking the real wire (`aviato._code_wire`), parsed by the SDK's own
`RunCollector`; only the sandbox around it is left out (test_code_context.py has it)."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from aviato._code_results import Execution, RunCollector
from aviato._code_wire import FrameReader, driver_command, encode_request, new_token

pytest.importorskip("IPython")


class LocalDriver:
    """The driver in a subprocess, spoken to as `CodeContext` speaks to it."""

    def __init__(self, kernel: str) -> None:
        argv, source = driver_command(sys.executable)
        self.token = new_token()
        self.frames = FrameReader(self.token)
        env = {**os.environ, "MPLBACKEND": "Agg"}
        self.process = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
        )
        hello = {
            "op": "hello",
            "token": self.token.hex(),
            "kernel": kernel,
            "max_output_bytes": 1 << 20,
            "max_display_bytes": 8 << 20,
        }
        self._send_raw(source + encode_request(hello))
        self.pending: list[tuple[dict[str, Any], int]] = []
        self.kernel = self._next_frame(30)["kernel"]
        self.runs = 0

    def _send_raw(self, data: bytes) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(data)
        self.process.stdin.flush()

    def _next_frame(self, timeout: float) -> dict[str, Any]:
        assert self.process.stdout is not None
        deadline = time.monotonic() + timeout
        while not self.pending:
            left = deadline - time.monotonic()
            assert left > 0, "no frame from the driver in time"
            ready, _, _ = select.select([self.process.stdout], [], [], left)
            if ready:
                chunk = os.read(self.process.stdout.fileno(), 1 << 16)
                assert chunk, "the driver exited"
                self.pending.extend(self.frames.feed(chunk))
        frame, self._last_size = self.pending.pop(0)
        return frame

    def start(self, code: str) -> RunCollector:
        self.runs += 1
        self._send_raw(encode_request({"op": "run", "run": self.runs, "code": code}))
        return RunCollector(self.runs, 1 << 20)

    def finish(self, collector: RunCollector, timeout: float = 60) -> Execution:
        while collector.done is None:
            frame = self._next_frame(timeout)
            if frame.get("run") == collector.run:
                collector.add(frame, self._last_size)
        return collector.execution()

    def run(self, code: str) -> Execution:
        return self.finish(self.start(code))

    def close(self) -> None:
        self._send_raw(encode_request({"op": "close"}))
        self.process.wait(10)


@pytest.fixture(scope="module")
def ipython() -> Iterator[LocalDriver]:
    driver = LocalDriver("ipython")
    yield driver
    driver.close()


def test_ipython_kernel_keeps_state_and_returns_values(ipython: LocalDriver) -> None:
    assert ipython.kernel == "ipython"
    assert ipython.run("x = 5").text is None
    execution = ipython.run("x * 2")
    assert execution.value == 10 and execution.text == "10"
    assert ipython.run("x * 2;").text is None  # IPython's trailing semicolon hides the value


def test_ipython_magics_and_shell_escapes(ipython: LocalDriver) -> None:
    assert ipython.run("!echo from-the-shell").stdout.strip() == "from-the-shell"
    assert ipython.run("%load_ext autoreload").ok
    assert ipython.run("import math\n%who_ls").value is not None


def test_ipython_display_system_and_png(ipython: LocalDriver) -> None:
    code = (
        "from IPython.display import HTML, Markdown, display\n"
        "display(HTML('<b>hi</b>'), Markdown('*md*'))\n"
        "class Png:\n"
        "    def _repr_png_(self): return b'\\x89PNG\\r\\n\\x1a\\n-not-really'\n"
        "Png()"
    )
    execution = ipython.run(code)
    assert execution.ok, execution.error
    html, markdown, png = execution.outputs
    assert html.html == "<b>hi</b>" and markdown.markdown == "*md*"
    assert png.is_result and png.png == b"\x89PNG\r\n\x1a\n-not-really"


def test_ipython_errors_are_structured_without_colors(ipython: LocalDriver) -> None:
    execution = ipython.run("def f():\n    return 1 / 0\nf()")
    assert execution.error is not None and execution.error.name == "ZeroDivisionError"
    text = "\n".join(execution.error.traceback)
    assert "1 / 0" in text and "\x1b[" not in text
    assert execution.stdout == ""  # the traceback is the error's, not printed


def test_ipython_interrupt_keeps_the_state(ipython: LocalDriver) -> None:
    ipython.run("kept = 'yes'")
    collector = ipython.start("while True: pass")
    time.sleep(0.5)
    ipython.process.send_signal(signal.SIGINT)
    execution = ipython.finish(collector, timeout=30)
    assert execution.error is not None and execution.error.name == "KeyboardInterrupt"
    assert not any("aviato-driver" in line for line in execution.error.traceback)
    assert ipython.run("kept").value == "yes"


@pytest.mark.parametrize("kernel", ["python", "ipython"])
def test_matplotlib_figures_become_png(kernel: str) -> None:
    pytest.importorskip("matplotlib")
    driver = LocalDriver(kernel)
    try:
        execution = driver.run("import matplotlib.pyplot as plt\nplt.plot([1, 3, 2])\nNone")
        assert execution.ok, execution.error
        (figure,) = execution.outputs
        assert (figure.png or b"").startswith(b"\x89PNG")
        assert driver.run("plt.get_fignums()").value == []  # shown figures are closed
        shown = driver.run("figure = plt.figure()\nplt.close(figure)\ndisplay(figure)")
        assert shown.ok, shown.error
        assert [(o.png or b"")[:4] for o in shown.outputs] == [b"\x89PNG"]
    finally:
        driver.close()


def test_a_request_the_driver_cannot_run_ends_that_run_only() -> None:
    driver = LocalDriver("python")
    try:
        driver.runs += 1
        collector = RunCollector(driver.runs, 1 << 20)
        driver._send_raw(encode_request({"op": "run", "run": driver.runs}))  # no code
        execution = driver.finish(collector)
        assert execution.error is not None and execution.error.name == "InterpreterError"
        assert execution.notes == ()
        assert driver.run("6 * 7").value == 42
    finally:
        driver.close()
