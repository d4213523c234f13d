"""The transport interface: how the SDK reaches a service, one typed method per RPC it uses.

Everything above this interface (`aviato._client`, the handles, `Sandbox`, `Session`) is free of
any wire library: a transport takes and returns `aviato.v1` messages (the public protocol's
models) and raises only `aviato.exceptions` types. A transport does not retry: a call that
could not reach the service raises `AviatoConnectionError` with ``code == "UNAVAILABLE"``, and
`aviato._client.Client.with_retry` decides whether the call may be repeated.

Implementations: `aviato._transport.grpc` (the service over gRPC, unix socket or TCP+TLS) and
`aviato._transport.memory` (a small service in pure Python, for tests of the SDK's own logic).

Two RPCs are streams and have objects of their own:

- `ExecCall`: one command. ``read()`` returns its output frames and finally its exit frame
  (an error frame, or a stream that ends without one, raises). The command's stdin is fed with
  ``write_stdin``/``close_stdin``; a terminal is resized with ``resize``; ``send_signal`` signals
  its process group (both only for a command started with stdin or a tty). ``kill()`` ends the
  command (SIGKILL) and the call; after the exit frame, ``release()`` lets the call end in the
  background.
- `FileReader`: one file read whose header (size, mode) has arrived; ``next()`` returns the data
  chunks, then None.
- `PullReader`: one image pull; ``next()`` returns its progress messages (the last one has
  ``image`` set), then None.
- `LogReader`: one log stream of a sandbox's main process; ``next()`` returns its entries, then
  None (at once without ``follow``; once the sandbox ended with it).
- `PortStream`: one TCP connection to an exposed port of a sandbox, carried by the service
  (ForwardPort). ``read()`` returns the bytes the sandbox sent, then None at its half-close;
  ``write``/``write_eof`` send the other way; ``finish()`` ends the call once both directions
  are over (raising what broke it); ``cancel()`` drops it. The credit of `aviato.v1.port_window`
  stays inside: ``write`` waits while the window is full, and calling ``read()`` again says the
  previous chunk was delivered.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator, Callable
from typing import Any

from aviato.v1 import admin_pb2 as apb
from aviato.v1 import images_pb2 as ipb
from aviato.v1 import sandbox_pb2 as pb

__all__ = [
    "ExecCall",
    "ExecFrame",
    "FileReader",
    "FileWriter",
    "LogReader",
    "PortStream",
    "PullReader",
    "Transport",
]

#: What `ExecCall.read` returns: an output chunk, or the terminal exit frame.
ExecFrame = pb.ExecOutput | pb.ExecExit


class ExecCall(abc.ABC):
    """One running command's stream (see the module docstring). Used from one event loop."""

    @abc.abstractmethod
    async def read(self) -> ExecFrame:
        """The next output frame, or the exit frame (the last). Raises the mapped exception for
        an error frame, `SandboxExecutionError` for a stream that ended without an exit frame.

        Cancelling a pending read does not end the call: `kill()` does."""

    @abc.abstractmethod
    async def write_stdin(self, data: bytes) -> None:
        """Sends `data` to the command's stdin (only for a command started with stdin)."""

    @abc.abstractmethod
    async def close_stdin(self) -> None:
        """Sends end-of-file to the command's stdin."""

    @abc.abstractmethod
    async def resize(self, rows: int, cols: int) -> None:
        """Resizes the command's terminal (only for a command started with ``init.tty``)."""

    @abc.abstractmethod
    async def send_signal(self, signum: int) -> None:
        """Sends `signum` to the command's process group (only for a command started with stdin
        or a tty)."""

    @abc.abstractmethod
    async def kill(self) -> None:
        """Kills the command (SIGKILL to its process group) and ends the call. Never raises."""

    @abc.abstractmethod
    def release(self) -> None:
        """After the exit frame: lets the call end on its own (in the background)."""

    def known(self) -> pb.ExecStarted | None:
        """What `identify` would return, if the service has said it already (never waits)."""
        return None

    def abandon(self) -> None:
        """Ends the call and leaves the command as it is: one started with a request id runs
        on (`Process.detach`). Never raises."""
        self.release()

    async def identify(self) -> pb.ExecStarted | None:
        """Waits until the service names the command (``exec_id``; for an attach also where its
        output begins, its argv and tty); None if it never started or the service names none."""
        return None


class FileReader(abc.ABC):
    """One file being read: `size` and `mode` as announced by the service, then the chunks."""

    size: int
    mode: int

    @abc.abstractmethod
    async def next(self) -> bytes | None:
        """The next chunk of data, or None once the service ended the stream."""

    @abc.abstractmethod
    def cancel(self) -> None:
        """Ends the read early (idempotent)."""

    async def copy_into(self, fd: int, progress: Callable[[int], None] | None) -> int | None:
        """Copies the rest of the file into the local file `fd` without the bytes passing
        through Python, telling `progress` the bytes so far; returns the file's bytes read in
        all, or None (the default) when this reader cannot (then read it with `next`)."""
        return None


class FileWriter(abc.ABC):
    """One file being written without its bytes passing through the service (a local service's
    file by descriptor): `write` or `copy_from`, then `finish` (the file is in place) or
    `cancel` (no file is left)."""

    @abc.abstractmethod
    async def write(self, data: memoryview) -> None:
        """Appends `data`."""

    @abc.abstractmethod
    async def copy_from(self, source: int, progress: Callable[[int], None] | None) -> int:
        """Appends the local file `source` from its offset to its end; the bytes appended."""

    @abc.abstractmethod
    async def finish(self) -> int:
        """Puts the file in place; its size."""

    @abc.abstractmethod
    def cancel(self) -> None:
        """Drops the write (idempotent)."""


class LogReader(abc.ABC):
    """One log stream of a sandbox's main process (see the module docstring)."""

    @abc.abstractmethod
    async def next(self) -> pb.LogEntry | None:
        """The next entry, or None once the service ended the stream."""

    @abc.abstractmethod
    def cancel(self) -> None:
        """Ends the stream early (idempotent)."""


class PullReader(abc.ABC):
    """One image pull (see the module docstring)."""

    @abc.abstractmethod
    async def next(self) -> ipb.PullImageProgress | None:
        """The next progress message, or None once the service ended the stream."""

    @abc.abstractmethod
    def cancel(self) -> None:
        """Ends the stream early (idempotent); the service may finish the pull for others."""


class PortStream(abc.ABC):
    """One forwarded connection (see the module docstring). Used from one event loop: one task
    may read while another writes."""

    @abc.abstractmethod
    async def read(self) -> bytes | None:
        """The next bytes from the sandbox's port (at most 64 KiB), or None once it half-closed.
        Calling it again gives credit for what it returned before (the caller delivered it).
        Raises the mapped exception when the service refused or broke the connection."""

    @abc.abstractmethod
    async def write(self, data: bytes) -> None:
        """Sends `data` to the sandbox's port, waiting while the window is full."""

    @abc.abstractmethod
    async def write_eof(self) -> None:
        """Half-closes the way to the sandbox (its server reads end-of-file)."""

    @abc.abstractmethod
    async def finish(self) -> None:
        """After `read` returned None and `write_eof`: ends the call and waits for its status
        (raises it if it is an error)."""

    @abc.abstractmethod
    def cancel(self) -> None:
        """Ends the call at once (the service closes the sandbox's side). Idempotent."""


class Transport(abc.ABC):
    """A connection to one service. Methods are called from one event loop; `call_timeout` is the
    deadline of the call in seconds (None: no limit)."""

    #: The address, as shown in messages (``unix:///...``, ``https://...``, ``memory://...``).
    url: str

    # -- sandbox records ----------------------------------------------------------------------

    @abc.abstractmethod
    async def create_sandbox(
        self, request: pb.CreateSandboxRequest, *, call_timeout: float | None
    ) -> pb.Sandbox: ...

    @abc.abstractmethod
    async def get_sandbox(self, sandbox_id: str, *, call_timeout: float | None) -> pb.Sandbox: ...

    @abc.abstractmethod
    async def set_network(
        self, request: pb.SetNetworkRequest, *, call_timeout: float | None
    ) -> pb.Sandbox: ...

    # Snapshots (docs/state.md); a transport without them refuses.
    async def create_snapshot(
        self, request: pb.CreateSnapshotRequest, *, call_timeout: float | None
    ) -> pb.Snapshot:
        raise NotImplementedError("this transport has no snapshots")

    async def list_snapshots(
        self, request: pb.ListSnapshotsRequest, *, call_timeout: float | None
    ) -> pb.ListSnapshotsResponse:
        raise NotImplementedError("this transport has no snapshots")

    async def delete_snapshot(
        self, request: pb.DeleteSnapshotRequest, *, call_timeout: float | None
    ) -> pb.DeleteSnapshotResponse:
        raise NotImplementedError("this transport has no snapshots")

    async def fork_sandbox(
        self, request: pb.ForkSandboxRequest, *, call_timeout: float | None
    ) -> pb.ForkSandboxResponse:
        raise NotImplementedError("this transport has no forks")

    # Secrets (docs/secrets.md); a transport without them refuses.
    async def create_secret(
        self, request: pb.CreateSecretRequest, *, call_timeout: float | None
    ) -> pb.SecretInfo:
        raise NotImplementedError("this transport has no secrets")

    async def list_secrets(self, *, call_timeout: float | None) -> list[pb.SecretInfo]:
        raise NotImplementedError("this transport has no secrets")

    async def delete_secret(self, name: str, *, call_timeout: float | None) -> None:
        raise NotImplementedError("this transport has no secrets")

    async def sandbox_usage(
        self, request: pb.SandboxUsageRequest, *, call_timeout: float | None
    ) -> pb.SandboxUsageResponse:
        raise NotImplementedError("this transport has no usage history")

    @abc.abstractmethod
    async def pause_sandbox(
        self, request: pb.PauseSandboxRequest, *, call_timeout: float | None
    ) -> pb.Sandbox: ...

    @abc.abstractmethod
    async def resume_sandbox(
        self, request: pb.ResumeSandboxRequest, *, call_timeout: float | None
    ) -> pb.Sandbox: ...

    @abc.abstractmethod
    async def extend_sandbox(
        self, request: pb.ExtendSandboxRequest, *, call_timeout: float | None
    ) -> pb.Sandbox: ...

    @abc.abstractmethod
    async def list_sandboxes(
        self, request: pb.ListSandboxesRequest, *, call_timeout: float | None
    ) -> pb.ListSandboxesResponse: ...

    @abc.abstractmethod
    async def wait_sandbox(
        self, request: pb.WaitSandboxRequest, *, call_timeout: float | None
    ) -> pb.Sandbox: ...

    @abc.abstractmethod
    async def stop_sandbox(
        self, sandbox_id: str, grace_seconds: float, *, call_timeout: float | None
    ) -> pb.Sandbox: ...

    @abc.abstractmethod
    async def delete_sandbox(self, sandbox_id: str, *, call_timeout: float | None) -> None: ...

    # -- leases -------------------------------------------------------------------------------

    @abc.abstractmethod
    async def renew_lease(
        self, lease_id: str, ttl_seconds: float, *, call_timeout: float | None
    ) -> None: ...

    @abc.abstractmethod
    async def release_lease(
        self, lease_id: str, *, stop_sandboxes: bool, call_timeout: float | None
    ) -> None: ...

    # -- commands and files -------------------------------------------------------------------

    @abc.abstractmethod
    async def exec(self, init: pb.ExecInit, *, call_timeout: float | None) -> ExecCall:
        """Starts a command. With ``init.stdin`` False its stdin is ``init.input`` then
        end-of-file; with it True, what `ExecCall.write_stdin` sends. With ``init.tty`` it runs
        on a pseudo-terminal of ``init.tty_size`` (all output arrives as stdout)."""

    async def attach(self, attach: pb.ExecAttach, *, call_timeout: float | None) -> ExecCall:
        """Attaches to a command started earlier (an Exec stream whose first frame is
        `attach`): its retained output from ``attach.offset``, the live rest, its exit."""
        raise NotImplementedError(f"{type(self).__name__} cannot attach to commands")

    async def list_execs(self, sandbox_id: str, *, call_timeout: float | None) -> list[pb.ExecInfo]:
        """A sandbox's running and recently ended commands (ListExecs)."""
        raise NotImplementedError(f"{type(self).__name__} cannot list commands")

    async def signal_exec(
        self, request: pb.SignalExecRequest, *, call_timeout: float | None
    ) -> pb.ExecInfo:
        """Signals a command by its id (SignalExec)."""
        raise NotImplementedError(f"{type(self).__name__} cannot signal commands")

    @abc.abstractmethod
    async def open_read(
        self, sandbox_id: str, path: str, *, call_timeout: float | None
    ) -> FileReader:
        """Starts a file read and waits for its header."""

    @abc.abstractmethod
    async def write_file(
        self, header: pb.WriteFileHeader, data: memoryview, *, call_timeout: float | None
    ) -> int:
        """Writes a whole file; returns the size the service wrote."""

    async def open_write(
        self, header: pb.WriteFileHeader, *, call_timeout: float | None
    ) -> FileWriter | None:
        """A write whose bytes skip the service (a local service's file by descriptor), or
        None (the default) when this transport or this file cannot: then `write_file` or
        `write_file_chunks`. The errors of `write_file` (the file, the sandbox, the owner)."""
        return None

    @abc.abstractmethod
    async def write_file_chunks(
        self,
        header: pb.WriteFileHeader,
        chunks: AsyncIterator[bytes],
        *,
        call_timeout: float | None,
    ) -> int:
        """Writes a file from `chunks` as they come (each sent before the next is asked for);
        returns the size the service wrote. A stream that ends early leaves no file."""

    # -- directories and trees (issue 17); not abstract: a transport without them refuses --

    async def path_call(self, rpc: str, request: Any, *, call_timeout: float | None) -> Any:
        """One of StatPath, ListDir, RemovePath, MakeDir, RenamePath: its answer."""
        raise NotImplementedError(f"{type(self).__name__} has no directory operations")

    async def open_tree_read(
        self, sandbox_id: str, path: str, *, call_timeout: float | None
    ) -> FileReader:
        """Starts a DownloadTree (a tar stream) and waits for its header."""
        raise NotImplementedError(f"{type(self).__name__} has no directory transfers")

    async def write_tree(
        self,
        header: pb.WriteFileHeader,
        chunks: AsyncIterator[bytes],
        *,
        call_timeout: float | None,
    ) -> int:
        """UploadTree from `chunks` (a tar stream); returns the file bytes the service wrote."""
        raise NotImplementedError(f"{type(self).__name__} has no directory transfers")

    @abc.abstractmethod
    async def open_logs(
        self, request: pb.StreamLogsRequest, *, call_timeout: float | None
    ) -> LogReader:
        """Starts a log stream; errors (an unknown sandbox) are raised by `LogReader.next`."""

    @abc.abstractmethod
    async def forward_port(
        self, sandbox_id: str, port: int, *, call_timeout: float | None
    ) -> PortStream:
        """Opens one connection to `port` of the sandbox through the service (ForwardPort);
        refusals (unknown sandbox, port not exposed, not running) are raised by
        `PortStream.read`."""

    # -- images --------------------------------------------------------------------------------

    @abc.abstractmethod
    async def pull_image(
        self, request: ipb.PullImageRequest, *, call_timeout: float | None
    ) -> PullReader:
        """Starts a pull; errors are raised by `PullReader.next`."""

    @abc.abstractmethod
    async def list_images(self, *, call_timeout: float | None) -> list[ipb.Image]: ...

    @abc.abstractmethod
    async def remove_image(self, image: str, *, call_timeout: float | None) -> ipb.Image: ...

    @abc.abstractmethod
    async def prune_images(self, *, call_timeout: float | None) -> list[ipb.Image]: ...

    # -- volumes -------------------------------------------------------------------------------

    @abc.abstractmethod
    async def list_volumes(self, *, call_timeout: float | None) -> list[pb.Volume]: ...

    @abc.abstractmethod
    async def delete_volume(self, name: str, *, call_timeout: float | None) -> None: ...

    # -- administration (the Admin API: served on the local socket only) ------------------------

    @abc.abstractmethod
    async def create_key(
        self, request: apb.CreateKeyRequest, *, call_timeout: float | None
    ) -> apb.CreateKeyResponse: ...

    @abc.abstractmethod
    async def list_keys(
        self, request: apb.ListKeysRequest, *, call_timeout: float | None
    ) -> list[apb.ApiKey]: ...

    @abc.abstractmethod
    async def revoke_key(self, key_id: str, *, call_timeout: float | None) -> None: ...

    @abc.abstractmethod
    async def get_owner_quotas(
        self, owner: str | None, *, call_timeout: float | None
    ) -> list[apb.OwnerQuota]: ...

    @abc.abstractmethod
    async def set_owner_quota(
        self, quota: apb.OwnerQuota, *, call_timeout: float | None
    ) -> apb.OwnerQuota: ...

    # -- the service --------------------------------------------------------------------------

    @abc.abstractmethod
    async def server_info(self, *, call_timeout: float | None) -> pb.ServerInfo: ...

    @abc.abstractmethod
    async def close(self) -> None:
        """Closes the connection (idempotent); calls in flight fail."""

    @property
    @abc.abstractmethod
    def closed(self) -> bool: ...
