"""The one codec of the node protocol: the runtime's model (runtime/base.py) <-> `aviato.node.v1`.

Both sides of the cluster use it: the control plane (`remote.py`, `execwire.py`'s client) and
the node host (`nodehost.py`, `execwire.py`'s server).

`SandboxConfig` and `ExecSpec`, the model's two request types, travel as a model payload: the
JSON of the whole dataclass from `runtime.model_codec`, which derives it field by field from the
dataclass, so a field added to either needs no line here. A payload is read exactly (no unknown
or missing field) and only up to a size (`MAX_CONFIG_PAYLOAD`, `MAX_SPEC_PAYLOAD`); what does
not fit raises `BadModelPayload`. Everything else (events, exits, files, logs, images) is a
field-by-field copy into typed messages. tests/cluster/test_codec.py fails when any field of a
model dataclass is not carried.
"""

from __future__ import annotations

import json
from typing import Any, TypeVar

from aviato.egress.gateway import EgressUsage
from aviato.node.v1 import node_pb2 as npb
from aviato.runtime.base import (
    ExecEvent,
    ExecExit,
    ExecFailed,
    ExecOutput,
    ExecSpec,
    FileEntry,
    FileInfo,
    ImageInfo,
    ImagePullProgress,
    LogRecord,
    MainExit,
    PathOp,
    PathOpResult,
    RegistryCredentials,
    SandboxConfig,
    SandboxRuntimeError,
    SnapshotFacts,
)
from aviato.runtime.model import EgressPolicy
from aviato.runtime.model_codec import ModelDecodeError, from_plain, to_plain

__all__ = [
    "MAX_CONFIG_PAYLOAD",
    "MAX_POLICY_PAYLOAD",
    "MAX_SPEC_PAYLOAD",
    "VERSION",
    "BadModelPayload",
    "ProtocolMismatch",
    "check_version",
    "decode_config",
    "decode_credentials",
    "decode_egress_usage",
    "decode_event",
    "decode_file_info",
    "decode_image",
    "decode_main_exit",
    "decode_model",
    "decode_path_op",
    "decode_path_result",
    "decode_policy",
    "decode_progress",
    "decode_record",
    "decode_snapshot_facts",
    "decode_spec",
    "encode_config",
    "encode_credentials",
    "encode_egress_usage",
    "encode_event",
    "encode_file_info",
    "encode_image",
    "encode_main_exit",
    "encode_model",
    "encode_path_op",
    "encode_path_result",
    "encode_policy",
    "encode_progress",
    "encode_record",
    "encode_snapshot_facts",
    "encode_spec",
]

VERSION: int = npb.VERSION_CURRENT

_MIB = 1 << 20
# The largest model payloads read. A create is at most the service's 8 MiB request
# (server/app.py; mounted files at most 16 MiB by server/validation.py); JSON writes bytes as
# base64 (4/3) and a control character of a string as six, so 8 MiB of request could become
# 48 MiB of payload at worst. An exec's argv and env are at most 1 MiB each: 12 MiB at worst.
MAX_CONFIG_PAYLOAD = 64 * _MIB
MAX_SPEC_PAYLOAD = 16 * _MIB
# An egress policy is at most egress.policy.MAX_RULES (256) rules of a name (253 characters) or
# a CIDR: under 100 KiB of JSON.
MAX_POLICY_PAYLOAD = 1 * _MIB


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


class BadModelPayload(SandboxRuntimeError):
    """A model payload too large, not JSON, or not of the model this side knows: a defect or a
    control plane and node host of different releases, never the user's input (INTERNAL)."""


# --- model payloads ----------------------------------------------------------------------------

_Model = TypeVar("_Model")


def encode_model(model: object) -> bytes:
    """A model dataclass as its payload: compact UTF-8 JSON of its plain form."""
    return json.dumps(to_plain(model), separators=(",", ":"), ensure_ascii=False).encode()


def decode_model(cls: type[_Model], payload: bytes, limit: int) -> _Model:
    """The inverse of `encode_model`, refusing a payload over `limit` bytes before reading it."""
    if len(payload) > limit:
        raise BadModelPayload(
            f"a {cls.__name__} of {len(payload)} bytes is over the node protocol's limit of "
            f"{limit} bytes"
        )
    try:
        plain: Any = json.loads(payload)
        model: _Model = from_plain(cls, plain, exact=True)
    except (ModelDecodeError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadModelPayload(
            f"a {cls.__name__} this node protocol cannot read ({e}); the control plane and "
            "the node hosts must run the same aviato release"
        ) from None
    return model


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
    return npb.SandboxConfig(model=encode_model(config))


def decode_config(message: npb.SandboxConfig) -> SandboxConfig:
    return decode_model(SandboxConfig, message.model, MAX_CONFIG_PAYLOAD)


def encode_policy(policy: EgressPolicy) -> npb.EgressPolicy:
    return npb.EgressPolicy(model=encode_model(policy))


def decode_policy(message: npb.EgressPolicy) -> EgressPolicy:
    return decode_model(EgressPolicy, message.model, MAX_POLICY_PAYLOAD)


def encode_egress_usage(usage: EgressUsage) -> npb.EgressUsage:
    return npb.EgressUsage(
        bytes_sent=usage.bytes_sent,
        bytes_received=usage.bytes_received,
        connections=usage.connections,
        refused=usage.refused,
    )


def decode_egress_usage(message: npb.EgressUsage) -> EgressUsage:
    return EgressUsage(
        bytes_sent=message.bytes_sent,
        bytes_received=message.bytes_received,
        connections=message.connections,
        refused=message.refused,
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
    return npb.ExecSpec(model=encode_model(spec))


def decode_spec(message: npb.ExecSpec) -> ExecSpec:
    return decode_model(ExecSpec, message.model, MAX_SPEC_PAYLOAD)


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


# --- directories and snapshots -----------------------------------------------------------------


def encode_path_op(sandbox_id: str, op: PathOp) -> npb.PathOpRequest:
    message = npb.PathOpRequest(
        sandbox_id=sandbox_id, kind=op.kind, path=op.path, arg=op.arg, recursive=op.recursive,
        parents=op.parents, offset=op.offset, limit=op.limit,
    )  # fmt: skip
    if op.rel is not None:
        message.rel = op.rel
    if op.mode is not None:
        message.mode = op.mode
    if op.mtime_ns is not None:
        message.mtime_ns = op.mtime_ns
    return message


def decode_path_op(message: npb.PathOpRequest) -> PathOp:
    return PathOp(
        kind=message.kind,
        path=message.path,
        rel=message.rel if message.HasField("rel") else None,
        arg=message.arg,
        recursive=message.recursive,
        parents=message.parents,
        mode=message.mode if message.HasField("mode") else None,
        mtime_ns=message.mtime_ns if message.HasField("mtime_ns") else None,
        offset=message.offset,
        limit=message.limit,
    )


def encode_path_result(result: PathOpResult) -> npb.PathOpResponse:
    return npb.PathOpResponse(
        entries=[
            npb.FileEntry(
                name=e.name,
                type=e.type,
                size=e.size,
                mode=e.mode,
                mtime_ns=e.mtime_ns,
                target=e.target,
            )
            for e in result.entries
        ],
        truncated=result.truncated,
    )


def decode_path_result(message: npb.PathOpResponse) -> PathOpResult:
    return PathOpResult(
        entries=[
            FileEntry(
                name=e.name,
                type=e.type,
                size=e.size,
                mode=e.mode,
                mtime_ns=e.mtime_ns,
                target=e.target,
            )
            for e in message.entries
        ],
        truncated=message.truncated,
    )


def encode_snapshot_facts(facts: SnapshotFacts) -> npb.SnapshotFacts:
    return npb.SnapshotFacts(
        size_bytes=facts.size_bytes, entries=facts.entries, skipped=facts.skipped
    )


def decode_snapshot_facts(message: npb.SnapshotFacts) -> SnapshotFacts:
    return SnapshotFacts(
        size_bytes=message.size_bytes, entries=message.entries, skipped=message.skipped
    )
