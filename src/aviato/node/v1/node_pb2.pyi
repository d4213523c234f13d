from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Version(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    VERSION_UNSPECIFIED: _ClassVar[Version]
    VERSION_CURRENT: _ClassVar[Version]
VERSION_UNSPECIFIED: Version
VERSION_CURRENT: Version

class RegistryCredentials(_message.Message):
    __slots__ = ("username", "password", "token")
    USERNAME_FIELD_NUMBER: _ClassVar[int]
    PASSWORD_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    username: str
    password: str
    token: str
    def __init__(self, username: _Optional[str] = ..., password: _Optional[str] = ..., token: _Optional[str] = ...) -> None: ...

class SandboxConfig(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: bytes
    def __init__(self, model: _Optional[bytes] = ...) -> None: ...

class MainExit(_message.Message):
    __slots__ = ("exit_code", "signal", "ended_at_ns", "reason")
    EXIT_CODE_FIELD_NUMBER: _ClassVar[int]
    SIGNAL_FIELD_NUMBER: _ClassVar[int]
    ENDED_AT_NS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    exit_code: int
    signal: int
    ended_at_ns: int
    reason: str
    def __init__(self, exit_code: _Optional[int] = ..., signal: _Optional[int] = ..., ended_at_ns: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class Attached(_message.Message):
    __slots__ = ("ended",)
    ENDED_FIELD_NUMBER: _ClassVar[int]
    ended: MainExit
    def __init__(self, ended: _Optional[_Union[MainExit, _Mapping]] = ...) -> None: ...

class ExecSpec(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: bytes
    def __init__(self, model: _Optional[bytes] = ...) -> None: ...

class ExecOutput(_message.Message):
    __slots__ = ("stream", "data")
    STREAM_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    stream: int
    data: bytes
    def __init__(self, stream: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class ExecExit(_message.Message):
    __slots__ = ("exit_code", "signal", "timed_out", "cpu_user_seconds", "cpu_system_seconds", "peak_memory_bytes", "wall_seconds", "oom_killed")
    EXIT_CODE_FIELD_NUMBER: _ClassVar[int]
    SIGNAL_FIELD_NUMBER: _ClassVar[int]
    TIMED_OUT_FIELD_NUMBER: _ClassVar[int]
    CPU_USER_SECONDS_FIELD_NUMBER: _ClassVar[int]
    CPU_SYSTEM_SECONDS_FIELD_NUMBER: _ClassVar[int]
    PEAK_MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    WALL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    OOM_KILLED_FIELD_NUMBER: _ClassVar[int]
    exit_code: int
    signal: int
    timed_out: bool
    cpu_user_seconds: float
    cpu_system_seconds: float
    peak_memory_bytes: int
    wall_seconds: float
    oom_killed: bool
    def __init__(self, exit_code: _Optional[int] = ..., signal: _Optional[int] = ..., timed_out: _Optional[bool] = ..., cpu_user_seconds: _Optional[float] = ..., cpu_system_seconds: _Optional[float] = ..., peak_memory_bytes: _Optional[int] = ..., wall_seconds: _Optional[float] = ..., oom_killed: _Optional[bool] = ...) -> None: ...

class ExecFailed(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: str
    message: str
    def __init__(self, code: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class ExecEvent(_message.Message):
    __slots__ = ("output", "exit", "failed")
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    EXIT_FIELD_NUMBER: _ClassVar[int]
    FAILED_FIELD_NUMBER: _ClassVar[int]
    output: ExecOutput
    exit: ExecExit
    failed: ExecFailed
    def __init__(self, output: _Optional[_Union[ExecOutput, _Mapping]] = ..., exit: _Optional[_Union[ExecExit, _Mapping]] = ..., failed: _Optional[_Union[ExecFailed, _Mapping]] = ...) -> None: ...

class ExecStart(_message.Message):
    __slots__ = ("sandbox_id", "spec")
    SANDBOX_ID_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    sandbox_id: str
    spec: ExecSpec
    def __init__(self, sandbox_id: _Optional[str] = ..., spec: _Optional[_Union[ExecSpec, _Mapping]] = ...) -> None: ...

class TerminalSize(_message.Message):
    __slots__ = ("rows", "cols")
    ROWS_FIELD_NUMBER: _ClassVar[int]
    COLS_FIELD_NUMBER: _ClassVar[int]
    rows: int
    cols: int
    def __init__(self, rows: _Optional[int] = ..., cols: _Optional[int] = ...) -> None: ...

class ExecRequest(_message.Message):
    __slots__ = ("start", "stdin", "stdin_eof", "resize", "signal")
    START_FIELD_NUMBER: _ClassVar[int]
    STDIN_FIELD_NUMBER: _ClassVar[int]
    STDIN_EOF_FIELD_NUMBER: _ClassVar[int]
    RESIZE_FIELD_NUMBER: _ClassVar[int]
    SIGNAL_FIELD_NUMBER: _ClassVar[int]
    start: ExecStart
    stdin: bytes
    stdin_eof: bool
    resize: TerminalSize
    signal: int
    def __init__(self, start: _Optional[_Union[ExecStart, _Mapping]] = ..., stdin: _Optional[bytes] = ..., stdin_eof: _Optional[bool] = ..., resize: _Optional[_Union[TerminalSize, _Mapping]] = ..., signal: _Optional[int] = ...) -> None: ...

class FileInfo(_message.Message):
    __slots__ = ("size", "mode")
    SIZE_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    size: int
    mode: int
    def __init__(self, size: _Optional[int] = ..., mode: _Optional[int] = ...) -> None: ...

class ReadFileRequest(_message.Message):
    __slots__ = ("sandbox_id", "path")
    SANDBOX_ID_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    sandbox_id: str
    path: str
    def __init__(self, sandbox_id: _Optional[str] = ..., path: _Optional[str] = ...) -> None: ...

class ReadFileResponse(_message.Message):
    __slots__ = ("info", "data")
    INFO_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    info: FileInfo
    data: bytes
    def __init__(self, info: _Optional[_Union[FileInfo, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class WriteFileHeader(_message.Message):
    __slots__ = ("sandbox_id", "path", "mode", "make_parents")
    SANDBOX_ID_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    MAKE_PARENTS_FIELD_NUMBER: _ClassVar[int]
    sandbox_id: str
    path: str
    mode: int
    make_parents: bool
    def __init__(self, sandbox_id: _Optional[str] = ..., path: _Optional[str] = ..., mode: _Optional[int] = ..., make_parents: _Optional[bool] = ...) -> None: ...

class WriteFileRequest(_message.Message):
    __slots__ = ("header", "data", "end")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    header: WriteFileHeader
    data: bytes
    end: bool
    def __init__(self, header: _Optional[_Union[WriteFileHeader, _Mapping]] = ..., data: _Optional[bytes] = ..., end: _Optional[bool] = ...) -> None: ...

class WriteFileResponse(_message.Message):
    __slots__ = ("size",)
    SIZE_FIELD_NUMBER: _ClassVar[int]
    size: int
    def __init__(self, size: _Optional[int] = ...) -> None: ...

class LogRecord(_message.Message):
    __slots__ = ("stream", "time_ns", "data")
    STREAM_FIELD_NUMBER: _ClassVar[int]
    TIME_NS_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    stream: int
    time_ns: int
    data: bytes
    def __init__(self, stream: _Optional[int] = ..., time_ns: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class LogsRequest(_message.Message):
    __slots__ = ("sandbox_id", "since_ns", "tail", "follow", "skip")
    SANDBOX_ID_FIELD_NUMBER: _ClassVar[int]
    SINCE_NS_FIELD_NUMBER: _ClassVar[int]
    TAIL_FIELD_NUMBER: _ClassVar[int]
    FOLLOW_FIELD_NUMBER: _ClassVar[int]
    SKIP_FIELD_NUMBER: _ClassVar[int]
    sandbox_id: str
    since_ns: int
    tail: int
    follow: bool
    skip: int
    def __init__(self, sandbox_id: _Optional[str] = ..., since_ns: _Optional[int] = ..., tail: _Optional[int] = ..., follow: _Optional[bool] = ..., skip: _Optional[int] = ...) -> None: ...

class LogBatch(_message.Message):
    __slots__ = ("records",)
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    records: _containers.RepeatedCompositeFieldContainer[LogRecord]
    def __init__(self, records: _Optional[_Iterable[_Union[LogRecord, _Mapping]]] = ...) -> None: ...

class ImageInfo(_message.Message):
    __slots__ = ("names", "digest", "size", "pulled_ns", "in_use", "node")
    NAMES_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    PULLED_NS_FIELD_NUMBER: _ClassVar[int]
    IN_USE_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    names: _containers.RepeatedScalarFieldContainer[str]
    digest: str
    size: int
    pulled_ns: int
    in_use: bool
    node: str
    def __init__(self, names: _Optional[_Iterable[str]] = ..., digest: _Optional[str] = ..., size: _Optional[int] = ..., pulled_ns: _Optional[int] = ..., in_use: _Optional[bool] = ..., node: _Optional[str] = ...) -> None: ...

class ImageList(_message.Message):
    __slots__ = ("images",)
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedCompositeFieldContainer[ImageInfo]
    def __init__(self, images: _Optional[_Iterable[_Union[ImageInfo, _Mapping]]] = ...) -> None: ...

class PullImageRequest(_message.Message):
    __slots__ = ("image", "credentials")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    CREDENTIALS_FIELD_NUMBER: _ClassVar[int]
    image: str
    credentials: RegistryCredentials
    def __init__(self, image: _Optional[str] = ..., credentials: _Optional[_Union[RegistryCredentials, _Mapping]] = ...) -> None: ...

class ImagePullProgress(_message.Message):
    __slots__ = ("phase", "digest", "current", "total", "message")
    PHASE_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    CURRENT_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    phase: str
    digest: str
    current: int
    total: int
    message: str
    def __init__(self, phase: _Optional[str] = ..., digest: _Optional[str] = ..., current: _Optional[int] = ..., total: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class PullImageEvent(_message.Message):
    __slots__ = ("progress", "image")
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    progress: ImagePullProgress
    image: ImageInfo
    def __init__(self, progress: _Optional[_Union[ImagePullProgress, _Mapping]] = ..., image: _Optional[_Union[ImageInfo, _Mapping]] = ...) -> None: ...

class PortFrame(_message.Message):
    __slots__ = ("sandbox_id", "port", "data", "eof", "consumed", "error_code", "error_message")
    SANDBOX_ID_FIELD_NUMBER: _ClassVar[int]
    PORT_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    EOF_FIELD_NUMBER: _ClassVar[int]
    CONSUMED_FIELD_NUMBER: _ClassVar[int]
    ERROR_CODE_FIELD_NUMBER: _ClassVar[int]
    ERROR_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    sandbox_id: str
    port: int
    data: bytes
    eof: bool
    consumed: int
    error_code: str
    error_message: str
    def __init__(self, sandbox_id: _Optional[str] = ..., port: _Optional[int] = ..., data: _Optional[bytes] = ..., eof: _Optional[bool] = ..., consumed: _Optional[int] = ..., error_code: _Optional[str] = ..., error_message: _Optional[str] = ...) -> None: ...

class EgressPolicy(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: bytes
    def __init__(self, model: _Optional[bytes] = ...) -> None: ...

class EgressUsage(_message.Message):
    __slots__ = ("bytes_sent", "bytes_received", "connections", "refused")
    BYTES_SENT_FIELD_NUMBER: _ClassVar[int]
    BYTES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    CONNECTIONS_FIELD_NUMBER: _ClassVar[int]
    REFUSED_FIELD_NUMBER: _ClassVar[int]
    bytes_sent: int
    bytes_received: int
    connections: int
    refused: int
    def __init__(self, bytes_sent: _Optional[int] = ..., bytes_received: _Optional[int] = ..., connections: _Optional[int] = ..., refused: _Optional[int] = ...) -> None: ...

class OpenEgressRequest(_message.Message):
    __slots__ = ("sandbox_id", "policy", "counted")
    SANDBOX_ID_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    COUNTED_FIELD_NUMBER: _ClassVar[int]
    sandbox_id: str
    policy: EgressPolicy
    counted: EgressUsage
    def __init__(self, sandbox_id: _Optional[str] = ..., policy: _Optional[_Union[EgressPolicy, _Mapping]] = ..., counted: _Optional[_Union[EgressUsage, _Mapping]] = ...) -> None: ...

class UpdateEgressRequest(_message.Message):
    __slots__ = ("sandbox_id", "policy")
    SANDBOX_ID_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    sandbox_id: str
    policy: EgressPolicy
    def __init__(self, sandbox_id: _Optional[str] = ..., policy: _Optional[_Union[EgressPolicy, _Mapping]] = ...) -> None: ...

class EgressUsageRequest(_message.Message):
    __slots__ = ("sandbox_ids",)
    SANDBOX_IDS_FIELD_NUMBER: _ClassVar[int]
    sandbox_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, sandbox_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class EgressUsages(_message.Message):
    __slots__ = ("usage",)
    class UsageEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: EgressUsage
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[EgressUsage, _Mapping]] = ...) -> None: ...
    USAGE_FIELD_NUMBER: _ClassVar[int]
    usage: _containers.MessageMap[str, EgressUsage]
    def __init__(self, usage: _Optional[_Mapping[str, EgressUsage]] = ...) -> None: ...

class PathOpRequest(_message.Message):
    __slots__ = ("sandbox_id", "kind", "path", "rel", "arg", "recursive", "parents", "mode", "mtime_ns", "offset", "limit")
    SANDBOX_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    REL_FIELD_NUMBER: _ClassVar[int]
    ARG_FIELD_NUMBER: _ClassVar[int]
    RECURSIVE_FIELD_NUMBER: _ClassVar[int]
    PARENTS_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    MTIME_NS_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    sandbox_id: str
    kind: str
    path: str
    rel: str
    arg: str
    recursive: bool
    parents: bool
    mode: int
    mtime_ns: int
    offset: int
    limit: int
    def __init__(self, sandbox_id: _Optional[str] = ..., kind: _Optional[str] = ..., path: _Optional[str] = ..., rel: _Optional[str] = ..., arg: _Optional[str] = ..., recursive: _Optional[bool] = ..., parents: _Optional[bool] = ..., mode: _Optional[int] = ..., mtime_ns: _Optional[int] = ..., offset: _Optional[int] = ..., limit: _Optional[int] = ...) -> None: ...

class FileEntry(_message.Message):
    __slots__ = ("name", "type", "size", "mode", "mtime_ns", "target")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    MTIME_NS_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    name: str
    type: str
    size: int
    mode: int
    mtime_ns: int
    target: str
    def __init__(self, name: _Optional[str] = ..., type: _Optional[str] = ..., size: _Optional[int] = ..., mode: _Optional[int] = ..., mtime_ns: _Optional[int] = ..., target: _Optional[str] = ...) -> None: ...

class PathOpResponse(_message.Message):
    __slots__ = ("entries", "truncated")
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    entries: _containers.RepeatedCompositeFieldContainer[FileEntry]
    truncated: bool
    def __init__(self, entries: _Optional[_Iterable[_Union[FileEntry, _Mapping]]] = ..., truncated: _Optional[bool] = ...) -> None: ...

class ReadFileAtRequest(_message.Message):
    __slots__ = ("sandbox_id", "root", "rel")
    SANDBOX_ID_FIELD_NUMBER: _ClassVar[int]
    ROOT_FIELD_NUMBER: _ClassVar[int]
    REL_FIELD_NUMBER: _ClassVar[int]
    sandbox_id: str
    root: str
    rel: str
    def __init__(self, sandbox_id: _Optional[str] = ..., root: _Optional[str] = ..., rel: _Optional[str] = ...) -> None: ...

class WriteFileAtHeader(_message.Message):
    __slots__ = ("sandbox_id", "root", "rel", "mode", "mtime_ns")
    SANDBOX_ID_FIELD_NUMBER: _ClassVar[int]
    ROOT_FIELD_NUMBER: _ClassVar[int]
    REL_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    MTIME_NS_FIELD_NUMBER: _ClassVar[int]
    sandbox_id: str
    root: str
    rel: str
    mode: int
    mtime_ns: int
    def __init__(self, sandbox_id: _Optional[str] = ..., root: _Optional[str] = ..., rel: _Optional[str] = ..., mode: _Optional[int] = ..., mtime_ns: _Optional[int] = ...) -> None: ...

class WriteFileAtRequest(_message.Message):
    __slots__ = ("header", "data", "end")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    header: WriteFileAtHeader
    data: bytes
    end: bool
    def __init__(self, header: _Optional[_Union[WriteFileAtHeader, _Mapping]] = ..., data: _Optional[bytes] = ..., end: _Optional[bool] = ...) -> None: ...

class SnapshotFacts(_message.Message):
    __slots__ = ("size_bytes", "entries", "skipped")
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    SKIPPED_FIELD_NUMBER: _ClassVar[int]
    size_bytes: int
    entries: int
    skipped: int
    def __init__(self, size_bytes: _Optional[int] = ..., entries: _Optional[int] = ..., skipped: _Optional[int] = ...) -> None: ...

class TakeSnapshotRequest(_message.Message):
    __slots__ = ("sandbox_id", "snapshot_id", "max_bytes")
    SANDBOX_ID_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_ID_FIELD_NUMBER: _ClassVar[int]
    MAX_BYTES_FIELD_NUMBER: _ClassVar[int]
    sandbox_id: str
    snapshot_id: str
    max_bytes: int
    def __init__(self, sandbox_id: _Optional[str] = ..., snapshot_id: _Optional[str] = ..., max_bytes: _Optional[int] = ...) -> None: ...

class SnapshotIds(_message.Message):
    __slots__ = ("ids",)
    IDS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, ids: _Optional[_Iterable[str]] = ...) -> None: ...

class ExportSnapshotRequest(_message.Message):
    __slots__ = ("snapshot_id",)
    SNAPSHOT_ID_FIELD_NUMBER: _ClassVar[int]
    snapshot_id: str
    def __init__(self, snapshot_id: _Optional[str] = ...) -> None: ...

class SnapshotArchive(_message.Message):
    __slots__ = ("facts", "data")
    FACTS_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    facts: SnapshotFacts
    data: bytes
    def __init__(self, facts: _Optional[_Union[SnapshotFacts, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class ImportSnapshotHeader(_message.Message):
    __slots__ = ("snapshot_id", "facts")
    SNAPSHOT_ID_FIELD_NUMBER: _ClassVar[int]
    FACTS_FIELD_NUMBER: _ClassVar[int]
    snapshot_id: str
    facts: SnapshotFacts
    def __init__(self, snapshot_id: _Optional[str] = ..., facts: _Optional[_Union[SnapshotFacts, _Mapping]] = ...) -> None: ...

class ImportSnapshotRequest(_message.Message):
    __slots__ = ("header", "data", "end")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    header: ImportSnapshotHeader
    data: bytes
    end: bool
    def __init__(self, header: _Optional[_Union[ImportSnapshotHeader, _Mapping]] = ..., data: _Optional[bytes] = ..., end: _Optional[bool] = ...) -> None: ...

class VolumeRef(_message.Message):
    __slots__ = ("owner_key", "name")
    OWNER_KEY_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    owner_key: str
    name: str
    def __init__(self, owner_key: _Optional[str] = ..., name: _Optional[str] = ...) -> None: ...

class VolumeUsage(_message.Message):
    __slots__ = ("size_bytes",)
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    size_bytes: int
    def __init__(self, size_bytes: _Optional[int] = ...) -> None: ...

class NodeUsageRequest(_message.Message):
    __slots__ = ("sandbox_ids",)
    SANDBOX_IDS_FIELD_NUMBER: _ClassVar[int]
    sandbox_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, sandbox_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class UsageReading(_message.Message):
    __slots__ = ("cpu_ns", "memory_bytes", "pids")
    CPU_NS_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    PIDS_FIELD_NUMBER: _ClassVar[int]
    cpu_ns: int
    memory_bytes: int
    pids: int
    def __init__(self, cpu_ns: _Optional[int] = ..., memory_bytes: _Optional[int] = ..., pids: _Optional[int] = ...) -> None: ...

class NodeUsage(_message.Message):
    __slots__ = ("readings",)
    class ReadingsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: UsageReading
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[UsageReading, _Mapping]] = ...) -> None: ...
    READINGS_FIELD_NUMBER: _ClassVar[int]
    readings: _containers.MessageMap[str, UsageReading]
    def __init__(self, readings: _Optional[_Mapping[str, UsageReading]] = ...) -> None: ...
