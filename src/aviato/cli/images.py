"""`aviato image`: pull, list, remove and prune the service's OCI images.

These speak aviato.v1.ImageService over the same connection as the other raw commands
(`_rpc.connection`). Sandboxes pull their image by themselves on first use; `pull` is for doing
it ahead of time (or fetching a newer image for a tag), with a progress bar on a terminal.
Registry credentials come from the service's Docker config, or from `--username` with the
password on stdin (`--password-stdin`) so that it never shows in `ps` or shell history.
"""

from __future__ import annotations

import datetime as dt
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click
import grpc

from aviato import ImagePullCredentials, SandboxValidationError
from aviato.cli import _rpc
from aviato.cli._output import (
    CliError,
    age,
    human_bytes,
    iso,
    print_json,
    print_table,
    stderr_console,
)
from aviato.v1 import images_pb2 as ipb
from aviato.v1 import images_pb2_grpc
from aviato.v1 import sandbox_pb2 as pb

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


def _stub(conn: _rpc.Connection) -> images_pb2_grpc.ImageServiceStub:
    return images_pb2_grpc.ImageServiceStub(conn.channel)  # type: ignore[no-untyped-call]


def _when(image: ipb.Image) -> dt.datetime | None:
    if not image.HasField("pulled_at"):
        return None
    return image.pulled_at.ToDatetime(tzinfo=dt.UTC)


def _as_dict(image: ipb.Image) -> dict[str, Any]:
    return {
        "names": list(image.names),
        "digest": image.digest,
        "size": image.size,
        "pulled_at": iso(_when(image)),
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
    auth = creds._to_proto() if creds is not None else pb.RegistryAuth()
    request = ipb.PullImageRequest(image=reference, registry_auth=auth)
    show = sys.stderr.isatty() and not quiet
    with _rpc.connection() as conn:
        stream = _stub(conn).PullImage(request, metadata=conn.metadata)
        try:
            final = _follow(stream, show)
        except grpc.RpcError as exc:
            raise CliError(f"pulling {reference}: {exc.details() or exc.code().name}") from None
    if final is None:
        raise CliError(f"pulling {reference}: the service ended the pull without a result")
    sys.stdout.write(final.image.digest + "\n")


def _follow(stream: Any, show: bool) -> ipb.PullImageProgress | None:
    """Consumes the progress stream (drawing bars when `show`); returns the last message."""
    final: ipb.PullImageProgress | None = None
    if not show:
        for event in stream:
            if event.phase == "done":
                final = event
        return final
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TransferSpeedColumn,
    )

    tasks: dict[str, Any] = {}
    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
               TransferSpeedColumn())  # fmt: skip
    # on stderr (the terminal `show` checked), so that `digest=$(aviato image pull X)` gets the
    # digest alone
    with Progress(*columns, console=stderr_console(), transient=False) as bars:
        status = bars.add_task("resolving", total=None)
        for event in stream:
            if event.phase in ("downloading", "cached"):
                task = tasks.get(event.digest)
                if task is None:
                    short = event.digest.split(":", 1)[-1][:12]
                    task = bars.add_task(short, total=event.total or None)
                    tasks[event.digest] = task
                label = event.digest.split(":", 1)[-1][:12]
                if event.phase == "cached":
                    label += " (cached)"
                bars.update(task, completed=event.current, description=label)
            elif event.phase == "done":
                final = event
                bars.update(status, description="done", total=1, completed=1)
            else:
                bars.update(status, description=event.phase)
    return final


@image.command("ls")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def ls(as_json: bool) -> None:
    """List the images in the service's store."""
    with _rpc.connection() as conn:
        response = _stub(conn).ListImages(ipb.ListImagesRequest(), metadata=conn.metadata)
    images = list(response.images)
    if as_json:
        print_json([_as_dict(i) for i in images])
        return
    rows = [
        [
            ", ".join(i.names) or "<none>",
            i.digest.split(":", 1)[-1][:12],
            human_bytes(i.size),
            age(_when(i)),
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
    with _rpc.connection() as conn:
        stub = _stub(conn)
        for ref in references:
            try:
                removed = stub.RemoveImage(
                    ipb.RemoveImageRequest(image=ref), metadata=conn.metadata
                )
            except grpc.RpcError as exc:
                sys.stderr.write(f"aviato: error: {ref}: {exc.details() or exc.code().name}\n")
                failed = True
                continue
            sys.stdout.write(removed.image.digest + "\n")
    if failed:
        raise click.exceptions.Exit(1)


@image.command()
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
def prune(yes: bool) -> None:
    """Remove every image that no sandbox uses."""
    if not yes and not click.confirm("Remove every image no sandbox uses?", err=True):
        raise CliError("nothing removed")
    with _rpc.connection() as conn:
        response = _stub(conn).PruneImages(ipb.PruneImagesRequest(), metadata=conn.metadata)
    total = 0
    for removed in response.removed:
        total += removed.size
        sys.stdout.write(f"{removed.digest}  {', '.join(removed.names) or '<none>'}\n")
    sys.stderr.write(f"removed {len(response.removed)} image(s), {human_bytes(total)}\n")
