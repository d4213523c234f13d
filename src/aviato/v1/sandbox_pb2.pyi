import datetime

from aviato.v1 import errors_pb2 as _errors_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SandboxStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SANDBOX_STATUS_UNSPECIFIED: _ClassVar[SandboxStatus]
    SANDBOX_STATUS_PENDING: _ClassVar[SandboxStatus]
    SANDBOX_STATUS_CREATING: _ClassVar[SandboxStatus]
    SANDBOX_STATUS_RUNNING: _ClassVar[SandboxStatus]
    SANDBOX_STATUS_COMPLETED: _ClassVar[SandboxStatus]
    SANDBOX_STATUS_FAILED: _ClassVar[SandboxStatus]
    SANDBOX_STATUS_TERMINATED: _ClassVar[SandboxStatus]
    SANDBOX_STATUS_PAUSED: _ClassVar[SandboxStatus]

class Stream(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STREAM_UNSPECIFIED: _ClassVar[Stream]
    STREAM_STDOUT: _ClassVar[Stream]
    STREAM_STDERR: _ClassVar[Stream]
SANDBOX_STATUS_UNSPECIFIED: SandboxStatus
SANDBOX_STATUS_PENDING: SandboxStatus
SANDBOX_STATUS_CREATING: SandboxStatus
SANDBOX_STATUS_RUNNING: SandboxStatus
SANDBOX_STATUS_COMPLETED: SandboxStatus
SANDBOX_STATUS_FAILED: SandboxStatus
SANDBOX_STATUS_TERMINATED: SandboxStatus
SANDBOX_STATUS_PAUSED: SandboxStatus
STREAM_UNSPECIFIED: Stream
STREAM_STDOUT: Stream
STREAM_STDERR: Stream

class Resources(_message.Message):
    __slots__ = ("cpu", "memory", "pids", "disk")
    CPU_FIELD_NUMBER: _ClassVar[int]
    MEMORY_FIELD_NUMBER: _ClassVar[int]
    PIDS_FIELD_NUMBER: _ClassVar[int]
    DISK_FIELD_NUMBER: _ClassVar[int]
    cpu: str
    memory: str
    pids: int
    disk: str
    def __init__(self, cpu: _Optional[str] = ..., memory: _Optional[str] = ..., pids: _Optional[int] = ..., disk: _Optional[str] = ...) -> None: ...

class MountedFile(_message.Message):
    __slots__ = ("path", "content")
    PATH_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    path: str
    content: bytes
    def __init__(self, path: _Optional[str] = ..., content: _Optional[bytes] = ...) -> None: ...

class SandboxSpec(_message.Message):
    __slots__ = ("image", "command", "env", "working_dir", "tags", "resources", "max_lifetime_seconds", "mounted_files", "network", "exposed_ports", "node_selector", "registry_auth", "image_command", "egress_mode", "egress", "idle_timeout_seconds", "mounts", "writable_layer", "snapshot_id", "secrets")
    class EnvEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    class NodeSelectorEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    COMMAND_FIELD_NUMBER: _ClassVar[int]
    ENV_FIELD_NUMBER: _ClassVar[int]
    WORKING_DIR_FIELD_NUMBER: _ClassVar[int]
    TAGS_FIELD_NUMBER: _ClassVar[int]
    RESOURCES_FIELD_NUMBER: _ClassVar[int]
    MAX_LIFETIME_SECONDS_FIELD_NUMBER: _ClassVar[int]
    MOUNTED_FILES_FIELD_NUMBER: _ClassVar[int]
    NETWORK_FIELD_NUMBER: _ClassVar[int]
    EXPOSED_PORTS_FIELD_NUMBER: _ClassVar[int]
    NODE_SELECTOR_FIELD_NUMBER: _ClassVar[int]
    REGISTRY_AUTH_FIELD_NUMBER: _ClassVar[int]
    IMAGE_COMMAND_FIELD_NUMBER: _ClassVar[int]
    EGRESS_MODE_FIELD_NUMBER: _ClassVar[int]
    EGRESS_FIELD_NUMBER: _ClassVar[int]
    IDLE_TIMEOUT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    MOUNTS_FIELD_NUMBER: _ClassVar[int]
    WRITABLE_LAYER_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_ID_FIELD_NUMBER: _ClassVar[int]
    SECRETS_FIELD_NUMBER: _ClassVar[int]
    image: str
    command: _containers.RepeatedScalarFieldContainer[str]
    env: _containers.ScalarMap[str, str]
    working_dir: str
    tags: _containers.RepeatedScalarFieldContainer[str]
    resources: Resources
    max_lifetime_seconds: float
    mounted_files: _containers.RepeatedCompositeFieldContainer[MountedFile]
    network: str
    exposed_ports: _containers.RepeatedScalarFieldContainer[int]
    node_selector: _containers.ScalarMap[str, str]
    registry_auth: RegistryAuth
    image_command: bool
    egress_mode: str
    egress: _containers.RepeatedCompositeFieldContainer[EgressRule]
    idle_timeout_seconds: float
    mounts: _containers.RepeatedCompositeFieldContainer[DirectoryMount]
    writable_layer: str
    snapshot_id: str
    secrets: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, image: _Optional[str] = ..., command: _Optional[_Iterable[str]] = ..., env: _Optional[_Mapping[str, str]] = ..., working_dir: _Optional[str] = ..., tags: _Optional[_Iterable[str]] = ..., resources: _Optional[_Union[Resources, _Mapping]] = ..., max_lifetime_seconds: _Optional[float] = ..., mounted_files: _Optional[_Iterable[_Union[MountedFile, _Mapping]]] = ..., network: _Optional[str] = ..., exposed_ports: _Optional[_Iterable[int]] = ..., node_selector: _Optional[_Mapping[str, str]] = ..., registry_auth: _Optional[_Union[RegistryAuth, _Mapping]] = ..., image_command: _Optional[bool] = ..., egress_mode: _Optional[str] = ..., egress: _Optional[_Iterable[_Union[EgressRule, _Mapping]]] = ..., idle_timeout_seconds: _Optional[float] = ..., mounts: _Optional[_Iterable[_Union[DirectoryMount, _Mapping]]] = ..., writable_layer: _Optional[str] = ..., snapshot_id: _Optional[str] = ..., secrets: _Optional[_Iterable[str]] = ...) -> None: ...

class EgressRule(_message.Message):
    __slots__ = ("dns_name", "cidr")
    DNS_NAME_FIELD_NUMBER: _ClassVar[int]
    CIDR_FIELD_NUMBER: _ClassVar[int]
    dns_name: str
    cidr: str
    def __init__(self, dns_name: _Optional[str] = ..., cidr: _Optional[str] = ...) -> None: ...

class RegistryAuth(_message.Message):
    __slots__ = ("username", "password", "token")
    USERNAME_FIELD_NUMBER: _ClassVar[int]
    PASSWORD_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    username: str
    password: str
    token: str
    def __init__(self, username: _Optional[str] = ..., password: _Optional[str] = ..., token: _Optional[str] = ...) -> None: ...

class Sandbox(_message.Message):
    __slots__ = ("id", "status", "status_reason", "exit_code", "spec", "created_at", "started_at", "ended_at", "lease_id", "expires_at", "node", "exposed_ports", "network_usage")
    ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    STATUS_REASON_FIELD_NUMBER: _ClassVar[int]
    EXIT_CODE_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    ENDED_AT_FIELD_NUMBER: _ClassVar[int]
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    EXPOSED_PORTS_FIELD_NUMBER: _ClassVar[int]
    NETWORK_USAGE_FIELD_NUMBER: _ClassVar[int]
    id: str
    status: SandboxStatus
    status_reason: str
    exit_code: int
    spec: SandboxSpec
    created_at: _timestamp_pb2.Timestamp
    started_at: _timestamp_pb2.Timestamp
    ended_at: _timestamp_pb2.Timestamp
    lease_id: str
    expires_at: _timestamp_pb2.Timestamp
    node: str
    exposed_ports: _containers.RepeatedCompositeFieldContainer[ExposedPort]
    network_usage: NetworkUsage
    def __init__(self, id: _Optional[str] = ..., status: _Optional[_Union[SandboxStatus, str]] = ..., status_reason: _Optional[str] = ..., exit_code: _Optional[int] = ..., spec: _Optional[_Union[SandboxSpec, _Mapping]] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., started_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., ended_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., lease_id: _Optional[str] = ..., expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., node: _Optional[str] = ..., exposed_ports: _Optional[_Iterable[_Union[ExposedPort, _Mapping]]] = ..., network_usage: _Optional[_Union[NetworkUsage, _Mapping]] = ...) -> None: ...

class NetworkUsage(_message.Message):
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

class ExposedPort(_message.Message):
    __slots__ = ("port", "address")
    PORT_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    port: int
    address: str
    def __init__(self, port: _Optional[int] = ..., address: _Optional[str] = ...) -> None: ...

class CreateSandboxRequest(_message.Message):
    __slots__ = ("spec", "request_id", "lease_id", "lease_ttl_seconds")
    SPEC_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    LEASE_TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    spec: SandboxSpec
    request_id: str
    lease_id: str
    lease_ttl_seconds: float
    def __init__(self, spec: _Optional[_Union[SandboxSpec, _Mapping]] = ..., request_id: _Optional[str] = ..., lease_id: _Optional[str] = ..., lease_ttl_seconds: _Optional[float] = ...) -> None: ...

class GetSandboxRequest(_message.Message):
    __slots__ = ("sandbox_id",)
    SANDBOX_ID_FIELD_NUMBER: _ClassVar[int]
    sandbox_id: str
    def __init__(self, sandbox_id: _Optional[str] = ...) -> None: ...

class ListSandboxesRequest(_message.Message):
    __slots__ = ("tags", "statuses", "include_terminated", "page_size", "page_token")
    TAGS_FIELD_NUMBER: _ClassVar[int]
    STATUSES_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_TERMINATED_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    tags: _containers.RepeatedScalarFieldContainer[str]
    statuses: _containers.RepeatedScalarFieldContainer[SandboxStatus]
    include_terminated: bool
    page_size: int
    page_token: str
    def __init__(self, tags: _Optional[_Iterable[str]] = ..., statuses: _Optional[_Iterable[_Union[SandboxStatus, str]]] = ..., include_terminated: _Optional[bool] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListSandboxesResponse(_message.Message):
    __slots__ = ("sandboxes", "next_page_token")
    SANDBOXES_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    sandboxes: _containers.RepeatedCompositeFieldContainer[Sandbox]
    next_page_token: str
    def __init__(self, sandboxes: _Optional[_Iterable[_Union[Sandbox, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class WaitSandboxRequest(_message.Message):
    __slots__ = ("sandbox_id", "condition", "timeout_seconds")
    class Condition(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        CONDITION_UNSPECIFIED: _ClassVar[WaitSandboxRequest.Condition]
        CONDITION_STARTED: _ClassVar[WaitSandboxRequest.Condition]
        CONDITION_TERMINAL: _ClassVar[WaitSandboxRequest.Condition]
    CONDITION_UNSPECIFIED: WaitSandboxRequest.Condition
    CONDITION_STARTED: WaitSandboxRequest.Condition
    CONDITION_TERMINAL: WaitSandboxRequest.Condition
    SANDBOX_ID_FIELD_NUMBER: _ClassVar[int]
    CONDITION_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    sandbox_id: str
    condition: WaitSandboxRequest.Condition
    timeout_seconds: float
    def __init__(self, sandbox_id: _Optional[str] = ..., condition: _Optional[_Union[WaitSandboxRequest.Condition, str]] = ..., timeout_seconds: _Optional[float] = ...) -> None: ...

class StopSandboxRequest(_message.Message):
    __slots__ = ("sandbox_id", "grace_seconds")
    SANDBOX_ID_FIELD_NUMBER: _ClassVar[int]
    GRACE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    sandbox_id: str
    grace_seconds: float
    def __init__(self, sandbox_id: _Optional[str] = ..., grace_seconds: _Optional[float] = ...) -> None: ...

class DeleteSandboxRequest(_message.Message):
    __slots__ = ("sandbox_id",)
    SANDBOX_ID_FIELD_NUMBER: _ClassVar[int]
    sandbox_id: str
    def __init__(self, sandbox_id: _Optional[str] = ...) -> None: ...

class DeleteSandboxResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class TerminalSize(_message.Message):
    __slots__ = ("rows", "cols")
    ROWS_FIELD_NUMBER: _ClassVar[int]
    COLS_FIELD_NUMBER: _ClassVar[int]
    rows: int
    cols: int
    def __init__(self, rows: _Optional[int] = ..., cols: _Optional[int] = ...) -> None: ...

class ExecInit(_message.Message):
    __slots__ = ("sandbox_id", "argv", "cwd", "env", "timeout_seconds", "stdin", "tty", "tty_size", "input", "protected", "request_id")
    class EnvEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    SANDBOX_ID_FIELD_NUMBER: _ClassVar[int]
    ARGV_FIELD_NUMBER: _ClassVar[int]
    CWD_FIELD_NUMBER: _ClassVar[int]
    ENV_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    STDIN_FIELD_NUMBER: _ClassVar[int]
    TTY_FIELD_NUMBER: _ClassVar[int]
    TTY_SIZE_FIELD_NUMBER: _ClassVar[int]
    INPUT_FIELD_NUMBER: _ClassVar[int]
    PROTECTED_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    sandbox_id: str
    argv: _containers.RepeatedScalarFieldContainer[str]
    cwd: str
    env: _containers.ScalarMap[str, str]
    timeout_seconds: float
    stdin: bool
    tty: bool
    tty_size: TerminalSize
    input: bytes
    protected: bool
    request_id: str
    def __init__(self, sandbox_id: _Optional[str] = ..., argv: _Optional[_Iterable[str]] = ..., cwd: _Optional[str] = ..., env: _Optional[_Mapping[str, str]] = ..., timeout_seconds: _Optional[float] = ..., stdin: _Optional[bool] = ..., tty: _Optional[bool] = ..., tty_size: _Optional[_Union[TerminalSize, _Mapping]] = ..., input: _Optional[bytes] = ..., protected: _Optional[bool] = ..., request_id: _Optional[str] = ...) -> None: ...

class ExecRequest(_message.Message):
    __slots__ = ("init", "stdin", "stdin_eof", "resize", "signal", "attach")
    INIT_FIELD_NUMBER: _ClassVar[int]
    STDIN_FIELD_NUMBER: _ClassVar[int]
    STDIN_EOF_FIELD_NUMBER: _ClassVar[int]
    RESIZE_FIELD_NUMBER: _ClassVar[int]
    SIGNAL_FIELD_NUMBER: _ClassVar[int]
    ATTACH_FIELD_NUMBER: _ClassVar[int]
    init: ExecInit
    stdin: bytes
    stdin_eof: bool
    resize: TerminalSize
    signal: int
    attach: ExecAttach
    def __init__(self, init: _Optional[_Union[ExecInit, _Mapping]] = ..., stdin: _Optional[bytes] = ..., stdin_eof: _Optional[bool] = ..., resize: _Optional[_Union[TerminalSize, _Mapping]] = ..., signal: _Optional[int] = ..., attach: _Optional[_Union[ExecAttach, _Mapping]] = ...) -> None: ...

class ResourceUsage(_message.Message):
    __slots__ = ("cpu_user_seconds", "cpu_system_seconds", "peak_memory_bytes", "wall_seconds")
    CPU_USER_SECONDS_FIELD_NUMBER: _ClassVar[int]
    CPU_SYSTEM_SECONDS_FIELD_NUMBER: _ClassVar[int]
    PEAK_MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    WALL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    cpu_user_seconds: float
    cpu_system_seconds: float
    peak_memory_bytes: int
    wall_seconds: float
    def __init__(self, cpu_user_seconds: _Optional[float] = ..., cpu_system_seconds: _Optional[float] = ..., peak_memory_bytes: _Optional[int] = ..., wall_seconds: _Optional[float] = ...) -> None: ...

class ExecStarted(_message.Message):
    __slots__ = ("exec_id", "output_offset", "argv", "tty")
    EXEC_ID_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_OFFSET_FIELD_NUMBER: _ClassVar[int]
    ARGV_FIELD_NUMBER: _ClassVar[int]
    TTY_FIELD_NUMBER: _ClassVar[int]
    exec_id: str
    output_offset: int
    argv: _containers.RepeatedScalarFieldContainer[str]
    tty: bool
    def __init__(self, exec_id: _Optional[str] = ..., output_offset: _Optional[int] = ..., argv: _Optional[_Iterable[str]] = ..., tty: _Optional[bool] = ...) -> None: ...

class ExecOutput(_message.Message):
    __slots__ = ("stream", "data", "offset", "exec_id")
    STREAM_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    EXEC_ID_FIELD_NUMBER: _ClassVar[int]
    stream: Stream
    data: bytes
    offset: int
    exec_id: str
    def __init__(self, stream: _Optional[_Union[Stream, str]] = ..., data: _Optional[bytes] = ..., offset: _Optional[int] = ..., exec_id: _Optional[str] = ...) -> None: ...

class ExecExit(_message.Message):
    __slots__ = ("exit_code", "signal", "timed_out", "usage", "oom_killed", "exec_id")
    EXIT_CODE_FIELD_NUMBER: _ClassVar[int]
    SIGNAL_FIELD_NUMBER: _ClassVar[int]
    TIMED_OUT_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    OOM_KILLED_FIELD_NUMBER: _ClassVar[int]
    EXEC_ID_FIELD_NUMBER: _ClassVar[int]
    exit_code: int
    signal: int
    timed_out: bool
    usage: ResourceUsage
    oom_killed: bool
    exec_id: str
    def __init__(self, exit_code: _Optional[int] = ..., signal: _Optional[int] = ..., timed_out: _Optional[bool] = ..., usage: _Optional[_Union[ResourceUsage, _Mapping]] = ..., oom_killed: _Optional[bool] = ..., exec_id: _Optional[str] = ...) -> None: ...

class ExecError(_message.Message):
    __slots__ = ("code", "message", "detail")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    detail: _errors_pb2.ErrorDetail
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ..., detail: _Optional[_Union[_errors_pb2.ErrorDetail, _Mapping]] = ...) -> None: ...

class ExecResponse(_message.Message):
    __slots__ = ("started", "output", "exit", "error")
    STARTED_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    EXIT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    started: ExecStarted
    output: ExecOutput
    exit: ExecExit
    error: ExecError
    def __init__(self, started: _Optional[_Union[ExecStarted, _Mapping]] = ..., output: _Optional[_Union[ExecOutput, _Mapping]] = ..., exit: _Optional[_Union[ExecExit, _Mapping]] = ..., error: _Optional[_Union[ExecError, _Mapping]] = ...) -> None: ...

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

class FileInfo(_message.Message):
    __slots__ = ("size", "mode")
    SIZE_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    size: int
    mode: int
    def __init__(self, size: _Optional[int] = ..., mode: _Optional[int] = ...) -> None: ...

class WriteFileHeader(_message.Message):
    __slots__ = ("sandbox_id", "path", "mode", "make_parents", "size")
    SANDBOX_ID_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    MAKE_PARENTS_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    sandbox_id: str
    path: str
    mode: int
    make_parents: bool
    size: int
    def __init__(self, sandbox_id: _Optional[str] = ..., path: _Optional[str] = ..., mode: _Optional[int] = ..., make_parents: _Optional[bool] = ..., size: _Optional[int] = ...) -> None: ...

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

class StreamLogsRequest(_message.Message):
    __slots__ = ("sandbox_id", "tail", "follow", "since")
    SANDBOX_ID_FIELD_NUMBER: _ClassVar[int]
    TAIL_FIELD_NUMBER: _ClassVar[int]
    FOLLOW_FIELD_NUMBER: _ClassVar[int]
    SINCE_FIELD_NUMBER: _ClassVar[int]
    sandbox_id: str
    tail: int
    follow: bool
    since: _timestamp_pb2.Timestamp
    def __init__(self, sandbox_id: _Optional[str] = ..., tail: _Optional[int] = ..., follow: _Optional[bool] = ..., since: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class LogEntry(_message.Message):
    __slots__ = ("time", "stream", "data")
    TIME_FIELD_NUMBER: _ClassVar[int]
    STREAM_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    time: _timestamp_pb2.Timestamp
    stream: Stream
    data: bytes
    def __init__(self, time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., stream: _Optional[_Union[Stream, str]] = ..., data: _Optional[bytes] = ...) -> None: ...

class RenewLeaseRequest(_message.Message):
    __slots__ = ("lease_id", "ttl_seconds")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    ttl_seconds: float
    def __init__(self, lease_id: _Optional[str] = ..., ttl_seconds: _Optional[float] = ...) -> None: ...

class ReleaseLeaseRequest(_message.Message):
    __slots__ = ("lease_id", "stop_sandboxes")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    STOP_SANDBOXES_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    stop_sandboxes: bool
    def __init__(self, lease_id: _Optional[str] = ..., stop_sandboxes: _Optional[bool] = ...) -> None: ...

class Lease(_message.Message):
    __slots__ = ("id", "expires_at", "sandbox_count")
    ID_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    SANDBOX_COUNT_FIELD_NUMBER: _ClassVar[int]
    id: str
    expires_at: _timestamp_pb2.Timestamp
    sandbox_count: int
    def __init__(self, id: _Optional[str] = ..., expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., sandbox_count: _Optional[int] = ...) -> None: ...

class GetServerInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ServerInfo(_message.Message):
    __slots__ = ("version", "placement", "runtime", "cgroups", "state_dir", "sandboxes_running", "max_sandboxes", "sandbox_limits", "quota", "egress", "http", "usage_interval_seconds", "warm_pool", "kept_stopped")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PLACEMENT_FIELD_NUMBER: _ClassVar[int]
    RUNTIME_FIELD_NUMBER: _ClassVar[int]
    CGROUPS_FIELD_NUMBER: _ClassVar[int]
    STATE_DIR_FIELD_NUMBER: _ClassVar[int]
    SANDBOXES_RUNNING_FIELD_NUMBER: _ClassVar[int]
    MAX_SANDBOXES_FIELD_NUMBER: _ClassVar[int]
    SANDBOX_LIMITS_FIELD_NUMBER: _ClassVar[int]
    QUOTA_FIELD_NUMBER: _ClassVar[int]
    EGRESS_FIELD_NUMBER: _ClassVar[int]
    HTTP_FIELD_NUMBER: _ClassVar[int]
    USAGE_INTERVAL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    WARM_POOL_FIELD_NUMBER: _ClassVar[int]
    KEPT_STOPPED_FIELD_NUMBER: _ClassVar[int]
    version: str
    placement: str
    runtime: str
    cgroups: str
    state_dir: str
    sandboxes_running: int
    max_sandboxes: int
    sandbox_limits: str
    quota: str
    egress: str
    http: str
    usage_interval_seconds: float
    warm_pool: str
    kept_stopped: str
    def __init__(self, version: _Optional[str] = ..., placement: _Optional[str] = ..., runtime: _Optional[str] = ..., cgroups: _Optional[str] = ..., state_dir: _Optional[str] = ..., sandboxes_running: _Optional[int] = ..., max_sandboxes: _Optional[int] = ..., sandbox_limits: _Optional[str] = ..., quota: _Optional[str] = ..., egress: _Optional[str] = ..., http: _Optional[str] = ..., usage_interval_seconds: _Optional[float] = ..., warm_pool: _Optional[str] = ..., kept_stopped: _Optional[str] = ...) -> None: ...

class SetNetworkRequest(_message.Message):
    __slots__ = ("sandbox_id", "egress_mode", "egress")
    SANDBOX_ID_FIELD_NUMBER: _ClassVar[int]
    EGRESS_MODE_FIELD_NUMBER: _ClassVar[int]
    EGRESS_FIELD_NUMBER: _ClassVar[int]
    sandbox_id: str
    egress_mode: str
    egress: _containers.RepeatedCompositeFieldContainer[EgressRule]
    def __init__(self, sandbox_id: _Optional[str] = ..., egress_mode: _Optional[str] = ..., egress: _Optional[_Iterable[_Union[EgressRule, _Mapping]]] = ...) -> None: ...

class PortData(_message.Message):
    __slots__ = ("sandbox_id", "port", "data", "eof", "consumed")
    SANDBOX_ID_FIELD_NUMBER: _ClassVar[int]
    PORT_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    EOF_FIELD_NUMBER: _ClassVar[int]
    CONSUMED_FIELD_NUMBER: _ClassVar[int]
    sandbox_id: str
    port: int
    data: bytes
    eof: bool
    consumed: int
    def __init__(self, sandbox_id: _Optional[str] = ..., port: _Optional[int] = ..., data: _Optional[bytes] = ..., eof: _Optional[bool] = ..., consumed: _Optional[int] = ...) -> None: ...

class PauseSandboxRequest(_message.Message):
    __slots__ = ("sandbox_id",)
    SANDBOX_ID_FIELD_NUMBER: _ClassVar[int]
    sandbox_id: str
    def __init__(self, sandbox_id: _Optional[str] = ...) -> None: ...

class ResumeSandboxRequest(_message.Message):
    __slots__ = ("sandbox_id",)
    SANDBOX_ID_FIELD_NUMBER: _ClassVar[int]
    sandbox_id: str
    def __init__(self, sandbox_id: _Optional[str] = ...) -> None: ...

class ExtendSandboxRequest(_message.Message):
    __slots__ = ("sandbox_id", "seconds")
    SANDBOX_ID_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    sandbox_id: str
    seconds: float
    def __init__(self, sandbox_id: _Optional[str] = ..., seconds: _Optional[float] = ...) -> None: ...

class DirectoryMount(_message.Message):
    __slots__ = ("path", "volume", "host_path", "read_only", "size_bytes")
    PATH_FIELD_NUMBER: _ClassVar[int]
    VOLUME_FIELD_NUMBER: _ClassVar[int]
    HOST_PATH_FIELD_NUMBER: _ClassVar[int]
    READ_ONLY_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    path: str
    volume: str
    host_path: str
    read_only: bool
    size_bytes: int
    def __init__(self, path: _Optional[str] = ..., volume: _Optional[str] = ..., host_path: _Optional[str] = ..., read_only: _Optional[bool] = ..., size_bytes: _Optional[int] = ...) -> None: ...

class Volume(_message.Message):
    __slots__ = ("name", "size_bytes", "max_size_bytes", "created_at", "used_by", "node", "size_enforced")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    USED_BY_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    SIZE_ENFORCED_FIELD_NUMBER: _ClassVar[int]
    name: str
    size_bytes: int
    max_size_bytes: int
    created_at: _timestamp_pb2.Timestamp
    used_by: _containers.RepeatedScalarFieldContainer[str]
    node: str
    size_enforced: bool
    def __init__(self, name: _Optional[str] = ..., size_bytes: _Optional[int] = ..., max_size_bytes: _Optional[int] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., used_by: _Optional[_Iterable[str]] = ..., node: _Optional[str] = ..., size_enforced: _Optional[bool] = ...) -> None: ...

class ListVolumesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListVolumesResponse(_message.Message):
    __slots__ = ("volumes",)
    VOLUMES_FIELD_NUMBER: _ClassVar[int]
    volumes: _containers.RepeatedCompositeFieldContainer[Volume]
    def __init__(self, volumes: _Optional[_Iterable[_Union[Volume, _Mapping]]] = ...) -> None: ...

class DeleteVolumeRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class DeleteVolumeResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PathRequest(_message.Message):
    __slots__ = ("sandbox_id", "path")
    SANDBOX_ID_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    sandbox_id: str
    path: str
    def __init__(self, sandbox_id: _Optional[str] = ..., path: _Optional[str] = ...) -> None: ...

class FileEntry(_message.Message):
    __slots__ = ("name", "type", "size", "mode", "mtime", "target")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    MTIME_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    name: str
    type: str
    size: int
    mode: int
    mtime: _timestamp_pb2.Timestamp
    target: str
    def __init__(self, name: _Optional[str] = ..., type: _Optional[str] = ..., size: _Optional[int] = ..., mode: _Optional[int] = ..., mtime: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., target: _Optional[str] = ...) -> None: ...

class ListDirRequest(_message.Message):
    __slots__ = ("sandbox_id", "path", "offset", "limit")
    SANDBOX_ID_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    sandbox_id: str
    path: str
    offset: int
    limit: int
    def __init__(self, sandbox_id: _Optional[str] = ..., path: _Optional[str] = ..., offset: _Optional[int] = ..., limit: _Optional[int] = ...) -> None: ...

class ListDirResponse(_message.Message):
    __slots__ = ("entries", "truncated", "next_offset")
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    NEXT_OFFSET_FIELD_NUMBER: _ClassVar[int]
    entries: _containers.RepeatedCompositeFieldContainer[FileEntry]
    truncated: bool
    next_offset: int
    def __init__(self, entries: _Optional[_Iterable[_Union[FileEntry, _Mapping]]] = ..., truncated: _Optional[bool] = ..., next_offset: _Optional[int] = ...) -> None: ...

class RemovePathRequest(_message.Message):
    __slots__ = ("sandbox_id", "path", "recursive")
    SANDBOX_ID_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    RECURSIVE_FIELD_NUMBER: _ClassVar[int]
    sandbox_id: str
    path: str
    recursive: bool
    def __init__(self, sandbox_id: _Optional[str] = ..., path: _Optional[str] = ..., recursive: _Optional[bool] = ...) -> None: ...

class MakeDirRequest(_message.Message):
    __slots__ = ("sandbox_id", "path", "mode", "parents")
    SANDBOX_ID_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    PARENTS_FIELD_NUMBER: _ClassVar[int]
    sandbox_id: str
    path: str
    mode: int
    parents: bool
    def __init__(self, sandbox_id: _Optional[str] = ..., path: _Optional[str] = ..., mode: _Optional[int] = ..., parents: _Optional[bool] = ...) -> None: ...

class RenamePathRequest(_message.Message):
    __slots__ = ("sandbox_id", "source", "destination")
    SANDBOX_ID_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    DESTINATION_FIELD_NUMBER: _ClassVar[int]
    sandbox_id: str
    source: str
    destination: str
    def __init__(self, sandbox_id: _Optional[str] = ..., source: _Optional[str] = ..., destination: _Optional[str] = ...) -> None: ...

class PathDone(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Snapshot(_message.Message):
    __slots__ = ("id", "source_sandbox_id", "image", "size_bytes", "created_at", "entries", "skipped_entries")
    ID_FIELD_NUMBER: _ClassVar[int]
    SOURCE_SANDBOX_ID_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    SKIPPED_ENTRIES_FIELD_NUMBER: _ClassVar[int]
    id: str
    source_sandbox_id: str
    image: str
    size_bytes: int
    created_at: _timestamp_pb2.Timestamp
    entries: int
    skipped_entries: int
    def __init__(self, id: _Optional[str] = ..., source_sandbox_id: _Optional[str] = ..., image: _Optional[str] = ..., size_bytes: _Optional[int] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., entries: _Optional[int] = ..., skipped_entries: _Optional[int] = ...) -> None: ...

class CreateSnapshotRequest(_message.Message):
    __slots__ = ("sandbox_id",)
    SANDBOX_ID_FIELD_NUMBER: _ClassVar[int]
    sandbox_id: str
    def __init__(self, sandbox_id: _Optional[str] = ...) -> None: ...

class ListSnapshotsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListSnapshotsResponse(_message.Message):
    __slots__ = ("snapshots",)
    SNAPSHOTS_FIELD_NUMBER: _ClassVar[int]
    snapshots: _containers.RepeatedCompositeFieldContainer[Snapshot]
    def __init__(self, snapshots: _Optional[_Iterable[_Union[Snapshot, _Mapping]]] = ...) -> None: ...

class DeleteSnapshotRequest(_message.Message):
    __slots__ = ("snapshot_id",)
    SNAPSHOT_ID_FIELD_NUMBER: _ClassVar[int]
    snapshot_id: str
    def __init__(self, snapshot_id: _Optional[str] = ...) -> None: ...

class DeleteSnapshotResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ForkSandboxRequest(_message.Message):
    __slots__ = ("sandbox_id", "count", "tags")
    SANDBOX_ID_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    TAGS_FIELD_NUMBER: _ClassVar[int]
    sandbox_id: str
    count: int
    tags: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, sandbox_id: _Optional[str] = ..., count: _Optional[int] = ..., tags: _Optional[_Iterable[str]] = ...) -> None: ...

class ForkSandboxResponse(_message.Message):
    __slots__ = ("sandboxes",)
    SANDBOXES_FIELD_NUMBER: _ClassVar[int]
    sandboxes: _containers.RepeatedCompositeFieldContainer[Sandbox]
    def __init__(self, sandboxes: _Optional[_Iterable[_Union[Sandbox, _Mapping]]] = ...) -> None: ...

class SecretInfo(_message.Message):
    __slots__ = ("name", "created_at", "updated_at")
    NAME_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    name: str
    created_at: _timestamp_pb2.Timestamp
    updated_at: _timestamp_pb2.Timestamp
    def __init__(self, name: _Optional[str] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., updated_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class CreateSecretRequest(_message.Message):
    __slots__ = ("name", "value", "replace")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    REPLACE_FIELD_NUMBER: _ClassVar[int]
    name: str
    value: str
    replace: bool
    def __init__(self, name: _Optional[str] = ..., value: _Optional[str] = ..., replace: _Optional[bool] = ...) -> None: ...

class ListSecretsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListSecretsResponse(_message.Message):
    __slots__ = ("secrets",)
    SECRETS_FIELD_NUMBER: _ClassVar[int]
    secrets: _containers.RepeatedCompositeFieldContainer[SecretInfo]
    def __init__(self, secrets: _Optional[_Iterable[_Union[SecretInfo, _Mapping]]] = ...) -> None: ...

class DeleteSecretRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class DeleteSecretResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SandboxUsageRequest(_message.Message):
    __slots__ = ("sandbox_id", "last")
    SANDBOX_ID_FIELD_NUMBER: _ClassVar[int]
    LAST_FIELD_NUMBER: _ClassVar[int]
    sandbox_id: str
    last: int
    def __init__(self, sandbox_id: _Optional[str] = ..., last: _Optional[int] = ...) -> None: ...

class UsageSample(_message.Message):
    __slots__ = ("time_ns", "cpu_ns", "memory_bytes", "pids")
    TIME_NS_FIELD_NUMBER: _ClassVar[int]
    CPU_NS_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    PIDS_FIELD_NUMBER: _ClassVar[int]
    time_ns: int
    cpu_ns: int
    memory_bytes: int
    pids: int
    def __init__(self, time_ns: _Optional[int] = ..., cpu_ns: _Optional[int] = ..., memory_bytes: _Optional[int] = ..., pids: _Optional[int] = ...) -> None: ...

class SandboxUsageHistory(_message.Message):
    __slots__ = ("sandbox_id", "samples", "step_ns", "active_calls", "unavailable")
    SANDBOX_ID_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    STEP_NS_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_CALLS_FIELD_NUMBER: _ClassVar[int]
    UNAVAILABLE_FIELD_NUMBER: _ClassVar[int]
    sandbox_id: str
    samples: _containers.RepeatedCompositeFieldContainer[UsageSample]
    step_ns: int
    active_calls: int
    unavailable: str
    def __init__(self, sandbox_id: _Optional[str] = ..., samples: _Optional[_Iterable[_Union[UsageSample, _Mapping]]] = ..., step_ns: _Optional[int] = ..., active_calls: _Optional[int] = ..., unavailable: _Optional[str] = ...) -> None: ...

class SandboxUsageResponse(_message.Message):
    __slots__ = ("sandboxes", "interval_seconds")
    SANDBOXES_FIELD_NUMBER: _ClassVar[int]
    INTERVAL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    sandboxes: _containers.RepeatedCompositeFieldContainer[SandboxUsageHistory]
    interval_seconds: float
    def __init__(self, sandboxes: _Optional[_Iterable[_Union[SandboxUsageHistory, _Mapping]]] = ..., interval_seconds: _Optional[float] = ...) -> None: ...

class ExecAttach(_message.Message):
    __slots__ = ("sandbox_id", "exec_id", "offset")
    SANDBOX_ID_FIELD_NUMBER: _ClassVar[int]
    EXEC_ID_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    sandbox_id: str
    exec_id: str
    offset: int
    def __init__(self, sandbox_id: _Optional[str] = ..., exec_id: _Optional[str] = ..., offset: _Optional[int] = ...) -> None: ...

class ExecInfo(_message.Message):
    __slots__ = ("exec_id", "argv", "started_at", "state", "exit", "error", "tty", "output_bytes", "retained_from", "ended_at", "attached")
    EXEC_ID_FIELD_NUMBER: _ClassVar[int]
    ARGV_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    EXIT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    TTY_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_BYTES_FIELD_NUMBER: _ClassVar[int]
    RETAINED_FROM_FIELD_NUMBER: _ClassVar[int]
    ENDED_AT_FIELD_NUMBER: _ClassVar[int]
    ATTACHED_FIELD_NUMBER: _ClassVar[int]
    exec_id: str
    argv: _containers.RepeatedScalarFieldContainer[str]
    started_at: _timestamp_pb2.Timestamp
    state: str
    exit: ExecExit
    error: str
    tty: bool
    output_bytes: int
    retained_from: int
    ended_at: _timestamp_pb2.Timestamp
    attached: int
    def __init__(self, exec_id: _Optional[str] = ..., argv: _Optional[_Iterable[str]] = ..., started_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., state: _Optional[str] = ..., exit: _Optional[_Union[ExecExit, _Mapping]] = ..., error: _Optional[str] = ..., tty: _Optional[bool] = ..., output_bytes: _Optional[int] = ..., retained_from: _Optional[int] = ..., ended_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., attached: _Optional[int] = ...) -> None: ...

class ListExecsRequest(_message.Message):
    __slots__ = ("sandbox_id",)
    SANDBOX_ID_FIELD_NUMBER: _ClassVar[int]
    sandbox_id: str
    def __init__(self, sandbox_id: _Optional[str] = ...) -> None: ...

class ListExecsResponse(_message.Message):
    __slots__ = ("execs",)
    EXECS_FIELD_NUMBER: _ClassVar[int]
    execs: _containers.RepeatedCompositeFieldContainer[ExecInfo]
    def __init__(self, execs: _Optional[_Iterable[_Union[ExecInfo, _Mapping]]] = ...) -> None: ...

class SignalExecRequest(_message.Message):
    __slots__ = ("sandbox_id", "exec_id", "signal")
    SANDBOX_ID_FIELD_NUMBER: _ClassVar[int]
    EXEC_ID_FIELD_NUMBER: _ClassVar[int]
    SIGNAL_FIELD_NUMBER: _ClassVar[int]
    sandbox_id: str
    exec_id: str
    signal: int
    def __init__(self, sandbox_id: _Optional[str] = ..., exec_id: _Optional[str] = ..., signal: _Optional[int] = ...) -> None: ...
