"""`aviato run-code`: run Python in a sandbox's code context, or talk to one interactively.

With code (``-c CODE``, a FILE, or a pipe on stdin) it runs it once in a new code context and
prints what a notebook cell would show: the output live, then the value's text (and one line
per rich output that is not text), the error's traceback on stderr. On a terminal, with no
code, it is a small REPL on one context: state is kept between inputs, Ctrl-C interrupts the
running input (or clears the one being typed), Ctrl-D ends. The context ends with the command.

Exit statuses: 0; 1 when the code raised; 124 when ``--timeout`` interrupted it; 125 when aviato
itself failed (unknown sandbox, service down), as `aviato exec` does.
"""

from __future__ import annotations

import codeop
import json
import os
import sys
from typing import Any

import click

from aviato import CodeContext, Execution, RichOutput
from aviato.cli._output import CliError, describe
from aviato.cli._params import duration
from aviato.cli._reach import preflight
from aviato.cli.exec_command import EXEC_FAILED, TIMED_OUT, ensure_running
from aviato.exceptions import AviatoError


def _write(stream: Any, text: str) -> None:
    stream.write(text)
    stream.flush()


def _show_output(output: RichOutput) -> None:
    """A rich output as a terminal can show it: its text, and a line for each other format."""
    others = [mime for mime in output.formats if mime != "text/plain"]
    if output.text is not None and not output.is_result:
        _write(sys.stdout, output.text + "\n")
    if others:
        _write(sys.stdout, f"[rich output: {', '.join(others)}]\n")


def _as_json(execution: Execution) -> dict[str, Any]:
    return {
        "stdout": execution.stdout,
        "stderr": execution.stderr,
        "text": execution.text,
        "value": execution.value,
        "outputs": [{"data": dict(o.data), "is_result": o.is_result} for o in execution.outputs],
        "error": None
        if execution.error is None
        else {
            "name": execution.error.name,
            "value": execution.error.value,
            "traceback": list(execution.error.traceback),
        },
        "timed_out": execution.timed_out,
        "execution_count": execution.execution_count,
        "stdout_truncated": execution.stdout_truncated,
        "stderr_truncated": execution.stderr_truncated,
        "notes": list(execution.notes),
    }


def _run_once(ctx: CodeContext, code: str, timeout: float | None, as_json: bool) -> int:
    if as_json:
        execution = ctx.run(code, timeout=timeout).result()
        _write(sys.stdout, json.dumps(_as_json(execution)) + "\n")
    else:
        run = ctx.run(
            code,
            timeout=timeout,
            on_stdout=lambda text: _write(sys.stdout, text),
            on_stderr=lambda text: _write(sys.stderr, text),
            on_output=_show_output,
        )
        try:
            execution = run.result()
        except KeyboardInterrupt:
            ctx.interrupt().result()
            execution = run.result()
        _finish(execution)
    if execution.timed_out:
        return TIMED_OUT
    return 0 if execution.ok else 1


def _finish(execution: Execution) -> None:
    """What follows the live output: the value's text, the error's traceback, the notes."""
    if execution.text is not None:
        _write(sys.stdout, execution.text + "\n")
    if execution.error is not None:
        lines = list(execution.error.traceback) or [str(execution.error)]
        if execution.timed_out:
            lines.append(str(execution.error))
        _write(sys.stderr, "\n".join(lines) + "\n")
    for note in execution.notes:
        _write(sys.stderr, f"aviato: {note}\n")


def _read_input() -> str | None:
    """One complete input from the terminal (more lines while Python says it goes on)."""
    lines: list[str] = []
    while True:
        try:
            line = input("... " if lines else ">>> ")
        except EOFError:
            _write(sys.stdout, "\n")
            return None
        except KeyboardInterrupt:
            _write(sys.stdout, "\nKeyboardInterrupt\n")
            lines = []
            continue
        lines.append(line)
        source = "\n".join(lines)
        try:
            complete = codeop.compile_command(source, "<input>", "exec") is not None
        except (SyntaxError, ValueError, OverflowError):
            complete = True  # let the sandbox's Python say what is wrong
        if complete and (len(lines) == 1 or not line.strip()):
            return source


def _repl(ctx: CodeContext) -> int:
    kernel = ctx.ready().result()
    _write(sys.stdout, f"aviato code context ({kernel}); Ctrl-D to end\n")
    while True:
        source = _read_input()
        if source is None:
            return 0
        if source.strip():
            _run_once(ctx, source, None, as_json=False)


@click.command("run-code")
@click.argument("sandbox_id", metavar="ID")
@click.argument("file", type=click.File("r"), required=False)
@click.option("-c", "code", metavar="CODE", help="The code to run (instead of FILE or stdin).")
@click.option(
    "--timeout",
    metavar="DURATION",
    callback=duration,
    help="Interrupt the code after this long (e.g. 30s, 5m); exit status 124.",
)
@click.option(
    "--kernel",
    type=click.Choice(["auto", "python", "ipython"]),
    default="auto",
    show_default=True,
    help="IPython when the sandbox has it (auto), or choose.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the whole result as one JSON object.")
def run_code(
    sandbox_id: str,
    file: Any,
    code: str | None,
    timeout: float | None,
    kernel: str,
    as_json: bool,
) -> None:
    """Run Python code in sandbox ID, as a notebook cell: state, value, rich outputs, errors.

    With no code and a terminal on stdin, an interactive interpreter (state kept between
    inputs). See docs/code-interpreter.md.

    \b
    Examples:
      aviato run-code "$id" -c 'import sys; sys.version'
      aviato run-code "$id" analysis.py --timeout 5m
      echo '21 * 2' | aviato run-code "$id" --json
    """
    if code is not None and file is not None:
        raise click.UsageError("give the code with -c or as FILE, not both")
    interactive = code is None and file is None and os.isatty(0)
    if code is None:
        code = file.read() if file is not None else (None if interactive else sys.stdin.read())
    if interactive and as_json:
        raise click.UsageError("--json needs code (-c, FILE or a pipe), not a terminal")
    preflight()
    try:
        sandbox = ensure_running(sandbox_id)
        with sandbox.code_context(kernel=kernel) as ctx:
            status = _repl(ctx) if interactive else _run_once(ctx, code or "", timeout, as_json)
    except CliError as err:
        raise CliError(err.message, EXEC_FAILED if err.exit_code == 1 else err.exit_code) from None
    except (AviatoError, ValueError) as err:
        raise CliError(describe(err), EXEC_FAILED) from None
    raise SystemExit(status)
