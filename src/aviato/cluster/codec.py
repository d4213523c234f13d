"""The one codec of the node protocol: the runtime's model (runtime/base.py) <-> `aviato.node.v1`.

Both sides of the cluster use it: the control plane (`remote.py`, `execwire.py`'s client) and
the node host (`nodehost.py`, `execwire.py`'s server). Every function is a field-by-field copy;
tests/cluster/test_codec.py fails when a field of a model dataclass is not carried, so that a
field added to the model cannot silently stay behind on the control plane.

Optional numbers (`int | None`) travel as proto3 `optional` fields: unset is None, so a limit of
0 and no limit stay apart.
"""

from __future__ import annotations

from aviato.node.v1 import node_pb2 as npb
from aviato.runtime.base import (
    ExecEvent,
    ExecExit,
    ExecFailed,
    ExecOutput,
    ExecSpec,
    FileInfo,
    ImageInfo,
    ImagePullProgress,
    LogRecord,
    MainExit,
    RegistryCredentials,
    SandboxConfig,
)

__all__ = [
    "VERSION",
    "ProtocolMismatch",
    "check_version",
    "decode_config",
    "decode_credentials",
    "decode_event",
    "decode_file_info",
    "decode_image",
    "decode_main_exit",
    "decode_progress",
    "decode_record",
    "decode_spec",
    "encode_config",
    "encode_credentials",
    "encode_event",
    "encode_file_info",
    "encode_image",
    "encode_main_exit",
    "encode_progress",
    "encode_record",
    "encode_spec",
]

VERSION: int = npb.VERSION_CURRENT


class ProtocolMismatch(Exception):
    """A node host speaks another version of the node protocol than this control plane."""


def check_version(reported: object, node: str) -> None:
    """Raises ProtocolMismatch unless a node host's reported version (its `start` facts'
    "protocol"; absent in node hosts older than versioning) is this side's VERSION."""
    if reported == VERSION:
        return
    theirs = f"version {reported}" if reported is not None else "a version before versioning"
    raise ProtocolMismatch(
        f"the node host on {node[:12]} speaks node protocol {theirs}, this control plane "
        f"version {VERSION}: install the same aviato release on every node, then end the old "
        f"node host (ray.kill of the actor aviato-nodehost-{node}) so that a new one starts"
    )


# --- sandboxes ---------------------------------------------------------------------------------


def encode_credentials(credentials: RegistryCredentials) -> npb.RegistryCredentials:
    return npb.RegistryCredentials(
        username=credentials.username, password=credentials.password, token=credentials.token
    )


def decode_credentials(message: npb.RegistryCredentials) -> RegistryCredentials:
    return RegistryCredentials(
        username=message.username, password=message.password, token=message.token
    )


def encode_config(config: SandboxConfig) -> npb.SandboxConfig:
    message = npb.SandboxConfig(
        sandbox_id=config.sandbox_id,
        image=config.image,
        command=list(config.command),
        env=config.env,
        working_dir=config.working_dir,
        mounted_files=[npb.MountedFile(path=p, content=c) for p, c in config.mounted_files],
        network=config.network,
        image_command=config.image_command,
        node_selector=[npb.Label(key=k, value=v) for k, v in config.node_selector],
        memory_bytes=config.memory_bytes,
        pids=config.pids,
        disk_bytes=config.disk_bytes,
        asked_limits=sorted(config.asked_limits),
    )
    if config.cpu_millis is not None:
        message.cpu_millis = config.cpu_millis
    if config.registry_credentials is not None:
        message.registry_credentials.CopyFrom(encode_credentials(config.registry_credentials))
    return message


def decode_config(message: npb.SandboxConfig) -> SandboxConfig:
    credentials = (
        decode_credentials(message.registry_credentials)
        if message.HasField("registry_credentials")
        else None
    )
    return SandboxConfig(
        sandbox_id=message.sandbox_id,
        image=message.image,
        command=tuple(message.command),
        env=dict(message.env),
        working_dir=message.working_dir,
        cpu_millis=message.cpu_millis if message.HasField("cpu_millis") else None,
        memory_bytes=message.memory_bytes,
        pids=message.pids,
        disk_bytes=message.disk_bytes,
        asked_limits=frozenset(message.asked_limits),
        mounted_files=tuple((f.path, f.content) for f in message.mounted_files),
        network=message.network,
        registry_credentials=credentials,
        image_command=message.image_command,
        node_selector=tuple((label.key, label.value) for label in message.node_selector),
    )


def encode_main_exit(exit: MainExit) -> npb.MainExit:
    return npb.MainExit(
        exit_code=exit.exit_code,
        signal=exit.signal,
        ended_at_ns=exit.ended_at_ns,
        reason=exit.reason,
    )


def decode_main_exit(message: npb.MainExit) -> MainExit:
    return MainExit(
        exit_code=message.exit_code,
        signal=message.signal,
        ended_at_ns=message.ended_at_ns,
        reason=message.reason,
    )


# --- exec --------------------------------------------------------------------------------------


def encode_spec(spec: ExecSpec) -> npb.ExecSpec:
    return npb.ExecSpec(
        argv=list(spec.argv),
        cwd=spec.cwd,
        env=spec.env,
        timeout_seconds=spec.timeout_seconds,
        stdin=spec.stdin,
        tty=spec.tty,
        rows=spec.rows,
        cols=spec.cols,
        protected=spec.protected,
    )


def decode_spec(message: npb.ExecSpec) -> ExecSpec:
    return ExecSpec(
        argv=tuple(message.argv),
        cwd=message.cwd,
        env=dict(message.env),
        timeout_seconds=message.timeout_seconds,
        stdin=message.stdin,
        tty=message.tty,
        rows=message.rows,
        cols=message.cols,
        protected=message.protected,
    )


def encode_event(event: ExecEvent) -> npb.ExecEvent:
    if isinstance(event, ExecOutput):
        return npb.ExecEvent(output=npb.ExecOutput(stream=event.stream, data=event.data))
    if isinstance(event, ExecExit):
        return npb.ExecEvent(
            exit=npb.ExecExit(
                exit_code=event.exit_code,
                signal=event.signal,
                timed_out=event.timed_out,
                cpu_user_seconds=event.cpu_user_seconds,
                cpu_system_seconds=event.cpu_system_seconds,
                peak_memory_bytes=event.peak_memory_bytes,
                wall_seconds=event.wall_seconds,
                oom_killed=event.oom_killed,
            )
        )
    return npb.ExecEvent(failed=npb.ExecFailed(code=event.code, message=event.message))


def decode_event(message: npb.ExecEvent) -> ExecEvent | None:
    """The event, or None for a message of a kind this side does not know (ignored)."""
    kind = message.WhichOneof("event")
    if kind == "output":
        return ExecOutput(stream=message.output.stream, data=message.output.data)
    if kind == "exit":
        e = message.exit
        return ExecExit(
            exit_code=e.exit_code,
            signal=e.signal,
            timed_out=e.timed_out,
            cpu_user_seconds=e.cpu_user_seconds,
            cpu_system_seconds=e.cpu_system_seconds,
            peak_memory_bytes=e.peak_memory_bytes,
            wall_seconds=e.wall_seconds,
            oom_killed=e.oom_killed,
        )
    if kind == "failed":
        return ExecFailed(code=message.failed.code or "INTERNAL", message=message.failed.message)
    return None


# --- files and logs ----------------------------------------------------------------------------


def encode_file_info(info: FileInfo) -> npb.FileInfo:
    return npb.FileInfo(size=info.size, mode=info.mode)


def decode_file_info(message: npb.FileInfo) -> FileInfo:
    return FileInfo(size=message.size, mode=message.mode)


def encode_record(record: LogRecord) -> npb.LogRecord:
    return npb.LogRecord(stream=record.stream, time_ns=record.time_ns, data=record.data)


def decode_record(message: npb.LogRecord) -> LogRecord:
    return LogRecord(stream=message.stream, time_ns=message.time_ns, data=message.data)


# --- images ------------------------------------------------------------------------------------


def encode_image(image: ImageInfo) -> npb.ImageInfo:
    return npb.ImageInfo(
        names=list(image.names),
        digest=image.digest,
        size=image.size,
        pulled_ns=image.pulled_ns,
        in_use=image.in_use,
        node=image.node,
    )


def decode_image(message: npb.ImageInfo) -> ImageInfo:
    return ImageInfo(
        names=tuple(message.names),
        digest=message.digest,
        size=message.size,
        pulled_ns=message.pulled_ns,
        in_use=message.in_use,
        node=message.node,
    )


def encode_progress(progress: ImagePullProgress) -> npb.ImagePullProgress:
    return npb.ImagePullProgress(
        phase=progress.phase,
        digest=progress.digest,
        current=progress.current,
        total=progress.total,
        message=progress.message,
    )


def decode_progress(message: npb.ImagePullProgress) -> ImagePullProgress:
    return ImagePullProgress(
        phase=message.phase,
        digest=message.digest,
        current=message.current,
        total=message.total,
        message=message.message,
    )
