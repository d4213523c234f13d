"""The `aviato` click group and `main()`, the console-script entry point.

`main()` runs click in non-standalone mode so that every way a command can fail passes through
one place: usage mistakes exit 2 and failures 1 (or the status a command chose, such as `exec`'s
125), each with exactly one line on stderr; Ctrl-C exits 130 quietly; a closed stdout
(`aviato ls | head`) is not an error.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Sequence
from typing import NoReturn

import click

from aviato.cli import (
    code,
    exec_command,
    files,
    images,
    keys,
    logs,
    network,
    paths,
    pausing,
    ports,
    sandboxes,
    secrets,
    server,
    shell,
    snapshots,
    top,
    version,
    volumes,
)
from aviato.cli._output import CliError, debug_enabled, describe, print_error

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


class _OrderedGroup(click.Group):
    """Lists commands in the order they were added (daily use first), not alphabetically."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(self.commands)


@click.group(cls=_OrderedGroup, context_settings=CONTEXT_SETTINGS)
@click.version_option(
    version.package_version(), "--version", prog_name="aviato", message="%(prog)s %(version)s"
)
def cli() -> None:
    """Run untrusted code in isolated sandboxes.

    With no AVIATO_BASE_URL set, commands use the aviato service on this machine and start it on
    first use; `aviato server status` shows it. Set AVIATO_BASE_URL (and AVIATO_API_KEY) to use a
    remote service.

    \b
    Examples:
      id=$(aviato run --tag demo)
      aviato exec "$id" -- python3 -c 'print(1 + 1)'
      aviato sh "$id"
      aviato rm --tag demo -y
    """


for _command in (
    sandboxes.run,
    sandboxes.ls,
    top.top,
    sandboxes.get,
    exec_command.exec_command,
    shell.sh,
    code.run_code,
    logs.logs,
    ports.port,
    network.network,
    files.cp,
    paths.files,
    sandboxes.stop,
    pausing.pause,
    pausing.resume,
    pausing.extend,
    sandboxes.rm,
    snapshots.snapshot,
    images.image,
    volumes.volume,
    secrets.secret,
    server.server,
    keys.keys,
    version.version,
):
    cli.add_command(_command)


def _command_path(argv: Sequence[str]) -> str:
    """The command that `argv` names ("aviato secret create"), as far as it names one: click
    raises some usage errors (an option missing its value) without the command's context."""
    path: list[str] = ["aviato"]
    command: click.Command = cli
    for word in argv:
        if not isinstance(command, click.Group):
            break
        if word.startswith("-"):
            continue
        found = command.commands.get(word)
        if found is None:
            break
        path.append(word)
        command = found
    return " ".join(path)


def _hint(exc: click.UsageError, argv: Sequence[str]) -> str:
    path = exc.ctx.command_path if exc.ctx is not None else _command_path(argv)
    return f" (see '{path} --help')"


def run(argv: Sequence[str] | None = None) -> int:
    """Run the command line and return the process's exit status; never raises."""
    try:
        result = cli.main(args=argv, prog_name="aviato", standalone_mode=False)
    except click.UsageError as exc:
        print_error(exc.format_message() + _hint(exc, sys.argv[1:] if argv is None else argv))
        return 2
    except click.Abort as exc:
        if isinstance(exc.__context__, KeyboardInterrupt):
            return 130  # Ctrl-C: the user knows; the terminal already shows ^C
        print_error("aborted")
        return 1
    except click.ClickException as exc:
        print_error(exc.format_message())
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away: point stdout at /dev/null so the interpreter's final flush
        # does not complain, and exit like a process killed by SIGPIPE would.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except Exception as exc:
        if debug_enabled():
            traceback.print_exc()
        print_error(describe(exc))
        return exc.exit_code if isinstance(exc, CliError) else 1
    return result if isinstance(result, int) else 0


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """Console-script entry point (`aviato`, `python -m aviato`)."""
    sys.exit(run(argv))


if __name__ == "__main__":
    main()
