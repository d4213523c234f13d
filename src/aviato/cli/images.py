"""`aviato image`: pull, list, remove and prune the service's OCI images.

These use the SDK's `aviato.Images`. Sandboxes pull their image by themselves on first use;
`pull` is for doing it ahead of time (or fetching a newer image for a tag), with a progress bar
on a terminal.
Registry credentials come from the service's Docker config, or from `--username` with the
password on stdin (`--password-stdin`) so that it never shows in `ps` or shell history.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TransferSpeedColumn,
)

from aviato import (
    AviatoError,
    Image,
    ImagePullCredentials,
    Images,
    PullProgress,
    SandboxValidationError,
)
from aviato.cli._output import (
    CliError,
    age,
    describe,
    human_bytes,
    iso,
    print_json,
    print_table,
    stderr_console,
)

F = TypeVar("F", bound=Callable[..., Any])


def credential_options(fn: F) -> F:
    """`--username U --password-stdin`: a registry login, the secret never on the command line."""
    fn = click.option(
        "--password-stdin",
        is_flag=True,
        help="Read the registry password (or, without --username, a token) from stdin.",
    )(fn)
    fn = click.option(
        "--username",
        default="",
        metavar="USER",
        help="Registry user (default: the service's Docker config, else anonymous).",
    )(fn)
    return fn


def read_credentials(username: str, password_stdin: bool) -> ImagePullCredentials | None:
    """The login of `credential_options`: the first line of stdin is the password (or token)."""
    if not password_stdin:
        if username:
            raise CliError("--username needs --password-stdin (the password is read from stdin)")
        return None
    secret = sys.stdin.readline().rstrip("\r\n")
    if not secret:
        raise CliError("--password-stdin: stdin gave an empty password")
    try:
        if username:
            return ImagePullCredentials(username=username, password=secret)
        return ImagePullCredentials(token=secret)
    except SandboxValidationError as exc:
        option = "--username" if ".username" in str(exc) else "--password-stdin"
        raise CliError(f"{option}: {str(exc).split(': ', 1)[-1]}") from None


def _as_dict(image: Image) -> dict[str, Any]:
    return {
        "names": image.names,
        "digest": image.digest,
        "size": image.size,
        "pulled_at": iso(image.pulled_at),
        "node": image.node,
        "in_use": image.in_use,
    }


@click.group()
def image() -> None:
    """Manage the OCI images sandboxes run from.

    \b
    Examples:
      aviato image pull python:3.11
      aviato image ls
      aviato run --image python:3.11
      aviato image rm python:3.11
      aviato image prune -y
    """


@image.command()
@click.argument("reference")
@credential_options
@click.option("--quiet", "-q", is_flag=True, help="Print only the image digest.")
def pull(reference: str, username: str, password_stdin: bool, quiet: bool) -> None:
    """Pull REFERENCE (e.g. python:3.11, ghcr.io/org/app@sha256:...) into the service's store.

    A progress bar shows each layer's download on a terminal; the digest is printed at the end.

    \b
    Examples:
      aviato image pull python:3.11
      aviato image pull -q 127.0.0.1:5000/team/app@sha256:...
      aviato image pull --username bob --password-stdin ghcr.io/org/app:1.4 <password.txt
      echo "$TOKEN" | aviato image pull --password-stdin registry.example.com/team/app:2
    """
    creds = read_credentials(username, password_stdin)
    show = sys.stderr.isatty() and not quiet
    try:
        if show:
            with _PullBars() as bars:
                pulled = Images.pull(reference, credentials=creds, progress=bars.update)
        else:
            pulled = Images.pull(reference, credentials=creds)
    except AviatoError as exc:
        message = describe(exc)
        if not message.startswith("pulling "):
            message = f"pulling {reference}: {message}"
        raise CliError(message) from None
    sys.stdout.write(pulled.digest + "\n")


class _PullBars:
    """A bar per layer on stderr (the terminal `show` checked), so that
    `digest=$(aviato image pull X)` gets the digest alone; fed from the SDK's thread."""

    def __init__(self) -> None:
        columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                   TransferSpeedColumn())  # fmt: skip
        self.bars = Progress(*columns, console=stderr_console(), transient=False)
        self.status = self.bars.add_task("resolving", total=None)
        self.tasks: dict[str, TaskID] = {}

    def __enter__(self) -> _PullBars:
        self.bars.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.bars.stop()

    def update(self, event: PullProgress) -> None:
        if event.phase in ("downloading", "cached"):
            label = event.digest.split(":", 1)[-1][:12]
            task = self.tasks.get(event.digest)
            if task is None:
                task = self.tasks[event.digest] = self.bars.add_task(
                    label, total=event.total or None
                )
            if event.phase == "cached":
                label += " (cached)"
            self.bars.update(task, completed=event.current, description=label)
        elif event.phase == "done":
            self.bars.update(self.status, description="done", total=1, completed=1)
        else:
            self.bars.update(self.status, description=event.phase)


@image.command("ls")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def ls(as_json: bool) -> None:
    """List the images in the service's store."""
    images = Images.list()
    if as_json:
        print_json([_as_dict(i) for i in images])
        return
    rows = [
        [
            ", ".join(i.names) or "<none>",
            i.digest.split(":", 1)[-1][:12],
            human_bytes(i.size),
            age(i.pulled_at),
            "yes" if i.in_use else "no",
        ]
        for i in images
    ]
    print_table(["NAME", "DIGEST", "SIZE", "PULLED", "IN USE"], rows, wrap=["NAME"])


@image.command("rm")
@click.argument("references", nargs=-1, required=True)
def rm(references: tuple[str, ...]) -> None:
    """Remove images by name or digest (refused for an image a sandbox uses)."""
    failed = False
    for ref in references:
        try:
            removed = Images.remove(ref)
        except AviatoError as exc:
            sys.stderr.write(f"aviato: error: {ref}: {_reason(exc)}\n")
            failed = True
            continue
        sys.stdout.write(removed.digest + "\n")
    if failed:
        raise click.exceptions.Exit(1)


@image.command()
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
def prune(yes: bool) -> None:
    """Remove every image that no sandbox uses."""
    if not yes and not click.confirm("Remove every image no sandbox uses?", err=True):
        raise CliError("nothing removed")
    pruned = Images.prune()
    total = 0
    for removed in pruned:
        total += removed.size
        sys.stdout.write(f"{removed.digest}  {', '.join(removed.names) or '<none>'}\n")
    sys.stderr.write(f"removed {len(pruned)} image(s), {human_bytes(total)}\n")


def _reason(exc: AviatoError) -> str:
    """The service's reason, without the SDK's "remove X failed: " lead (the line names X)."""
    text = describe(exc)
    head, sep, rest = text.partition(" failed: ")
    return rest if sep and head.startswith("remove ") else text
