from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ErrorReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ERROR_REASON_UNSPECIFIED: _ClassVar[ErrorReason]
    SANDBOX_NOT_FOUND: _ClassVar[ErrorReason]
    SANDBOX_NOT_RUNNING: _ClassVar[ErrorReason]
    SANDBOX_TERMINATED: _ClassVar[ErrorReason]
    FILE_NOT_FOUND: _ClassVar[ErrorReason]
    PATH_INVALID: _ClassVar[ErrorReason]
    FILE_PERMISSION_DENIED: _ClassVar[ErrorReason]
    IMAGE_NOT_FOUND: _ClassVar[ErrorReason]
    FIELD_INVALID: _ClassVar[ErrorReason]
    CAPACITY_EXHAUSTED: _ClassVar[ErrorReason]
    QUOTA_EXCEEDED: _ClassVar[ErrorReason]
    LEASE_NOT_FOUND: _ClassVar[ErrorReason]
    CREDENTIALS_INVALID: _ClassVar[ErrorReason]
    SERVICE_SHUTTING_DOWN: _ClassVar[ErrorReason]
    RUNTIME_FAILED: _ClassVar[ErrorReason]
    EXEC_NOT_FOUND: _ClassVar[ErrorReason]
ERROR_REASON_UNSPECIFIED: ErrorReason
SANDBOX_NOT_FOUND: ErrorReason
SANDBOX_NOT_RUNNING: ErrorReason
SANDBOX_TERMINATED: ErrorReason
FILE_NOT_FOUND: ErrorReason
PATH_INVALID: ErrorReason
FILE_PERMISSION_DENIED: ErrorReason
IMAGE_NOT_FOUND: ErrorReason
FIELD_INVALID: ErrorReason
CAPACITY_EXHAUSTED: ErrorReason
QUOTA_EXCEEDED: ErrorReason
LEASE_NOT_FOUND: ErrorReason
CREDENTIALS_INVALID: ErrorReason
SERVICE_SHUTTING_DOWN: ErrorReason
RUNTIME_FAILED: ErrorReason
EXEC_NOT_FOUND: ErrorReason

class ErrorDetail(_message.Message):
    __slots__ = ("reason", "sandbox_id", "path", "field", "lease_id", "image")
    REASON_FIELD_NUMBER: _ClassVar[int]
    SANDBOX_ID_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    FIELD_FIELD_NUMBER: _ClassVar[int]
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    reason: ErrorReason
    sandbox_id: str
    path: str
    field: str
    lease_id: str
    image: str
    def __init__(self, reason: _Optional[_Union[ErrorReason, str]] = ..., sandbox_id: _Optional[str] = ..., path: _Optional[str] = ..., field: _Optional[str] = ..., lease_id: _Optional[str] = ..., image: _Optional[str] = ...) -> None: ...
