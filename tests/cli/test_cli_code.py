"""`aviato run-code`: a notebook cell from the command line, and its interactive interpreter."""

from __future__ import annotations

import json

import pytest
from clitools import Cli, Terminal, assert_one_line_error, aviato_argv


@pytest.mark.slow
def test_code_prints_output_then_the_value(cli: Cli, sandbox: str) -> None:
    result = cli("run-code", sandbox, "-c", "x = 21\nprint('hi')\nx * 2")
    assert (result.returncode, result.stdout, result.stderr) == (0, "hi\n42\n", "")


@pytest.mark.slow
def test_an_error_is_its_traceback_and_status_1(cli: Cli, sandbox: str) -> None:
    result = cli("run-code", sandbox, "-c", "def f():\n    return 1 / 0\nf()")
    assert result.returncode == 1
    assert result.stderr.startswith("Traceback") and "ZeroDivisionError" in result.stderr
    assert "aviato-driver" not in result.stderr


@pytest.mark.slow
def test_code_from_a_pipe_as_json(cli: Cli, sandbox: str) -> None:
    result = cli("run-code", sandbox, "--json", input="print('out')\n{'a': [1, 2]}\n")
    assert result.returncode == 0
    answer = json.loads(result.stdout)
    assert answer["value"] == {"a": [1, 2]} and answer["stdout"] == "out\n"


@pytest.mark.slow
def test_a_timeout_interrupts_with_status_124(cli: Cli, sandbox: str) -> None:
    result = cli("run-code", sandbox, "--timeout", "1s", "-c", "while True: pass")
    assert result.returncode == 124 and "TimeoutError" in result.stderr


@pytest.mark.slow
def test_an_unknown_sandbox_is_one_line_and_status_125(cli: Cli) -> None:
    result = cli("run-code", "sbx-000000000000", "-c", "1")
    assert result.returncode == 125
    assert_one_line_error(result, "sbx-000000000000")


@pytest.mark.slow
def test_the_interactive_interpreter_keeps_state_and_takes_ctrl_c(cli: Cli, sandbox: str) -> None:
    term = Terminal([*aviato_argv(), "run-code", sandbox], {**cli.env, "TERM": "xterm"}, 30, 90)
    try:
        term.expect(">>> ")
        term.send("def double(n):\n    return 2 * n\n\n")
        term.expect(">>> ")
        term.send("value = double(21)\n")
        term.expect(">>> ")
        term.send("print('the answer is', value)\n")
        term.expect("the answer is 42")
        term.expect(">>> ")
        term.send("while print('looping') or True: pass\n")
        term.expect("looping\r\n")  # the run's own output (the echoed line has a quote)
        term.send("\x03")
        term.expect("KeyboardInterrupt")
        term.send("value + 1\n")
        term.expect("43")
        term.send("\x04")
        assert term.wait() == 0
    finally:
        term.close()
