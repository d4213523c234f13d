"""aviato: run untrusted code in isolated sandboxes, from sync code, async code and notebooks.

```python
from aviato import Sandbox

with Sandbox.run() as sandbox:
    print(sandbox.exec(["echo", "hello"]).result().stdout)
```

Every operation starts at once and returns a handle: `OperationRef` (``.result()``/``.get()``
block, ``await`` works on any event loop) or `Process` (live ``stdout``/``stderr``, ``stdin``,
``.result()`` → `ProcessResult`). The service is `AVIATO_BASE_URL` if set, else a local one that
the SDK starts on first use. Errors are the `aviato.exceptions` hierarchy.
"""

from __future__ import annotations

import os as _os

# gRPC's C core logs to stderr by itself (e.g. on a failed TLS handshake), around our typed
# errors; it reads this once, when grpc is first imported, which happens just below.
_os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

from aviato import exceptions
from aviato._admin import Admin, ApiKey, CreatedKey, OwnerQuota
from aviato._code_context import CodeContext
from aviato._code_results import CodeError, Execution, RichOutput
from aviato._credentials import ImagePullCredentials
from aviato._defaults import EgressRule, NetworkOptions, Serialization
from aviato._files import FileStream
from aviato._function import RemoteFunction
from aviato._image_store import Image, Images, PullProgress
from aviato._local_service import start_local_service
from aviato._logs import LogRecord, LogStream
from aviato._operation import OperationRef
from aviato._options import SandboxDefaults
from aviato._output import StreamReader
from aviato._port_forward import PortForward
from aviato._process import Process, StreamWriter
from aviato._sandbox import Sandbox, Session
from aviato._sandbox_commands import ProcessInfo
from aviato._sandbox_network import NetworkUsage
from aviato._sandbox_paths import DirListing, FileEntry
from aviato._sandbox_usage import SandboxUsage, UsageSample
from aviato._secrets import Secret
from aviato._service import ServerInfo, server_info
from aviato._snapshot import Snapshot
from aviato._status import SandboxStatus
from aviato._volumes import HostMount, Volume, VolumeInfo, Volumes
from aviato._wait import Waitable, results, wait
from aviato.exceptions import (
    AsyncFunctionError,
    AviatoAuthenticationError,
    AviatoConnectionError,
    AviatoError,
    CodeContextError,
    FunctionError,
    FunctionSerializationError,
    ProcessResult,
    RemoteFunctionError,
    ResourceUsage,
    SandboxError,
    SandboxExecutionError,
    SandboxFailedError,
    SandboxFileError,
    SandboxNotFoundError,
    SandboxNotRunningError,
    SandboxResourceExhaustedError,
    SandboxTerminatedError,
    SandboxTimeoutError,
    SandboxValidationError,
    WandbAuthError,
)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("aviato")
    except PackageNotFoundError:
        return "0.0.0+unknown"


__version__ = _version()

__all__ = [
    "Admin",
    "ApiKey",
    "AsyncFunctionError",
    "AviatoAuthenticationError",
    "AviatoConnectionError",
    "AviatoError",
    "CodeContext",
    "CodeContextError",
    "CodeError",
    "CreatedKey",
    "DirListing",
    "EgressRule",
    "Execution",
    "FileEntry",
    "FileStream",
    "FunctionError",
    "FunctionSerializationError",
    "HostMount",
    "Image",
    "ImagePullCredentials",
    "Images",
    "LogRecord",
    "LogStream",
    "NetworkOptions",
    "NetworkUsage",
    "OperationRef",
    "OwnerQuota",
    "PortForward",
    "Process",
    "ProcessInfo",
    "ProcessResult",
    "PullProgress",
    "RemoteFunction",
    "RemoteFunctionError",
    "ResourceUsage",
    "RichOutput",
    "Sandbox",
    "SandboxDefaults",
    "SandboxError",
    "SandboxExecutionError",
    "SandboxFailedError",
    "SandboxFileError",
    "SandboxNotFoundError",
    "SandboxNotRunningError",
    "SandboxResourceExhaustedError",
    "SandboxStatus",
    "SandboxTerminatedError",
    "SandboxTimeoutError",
    "SandboxUsage",
    "SandboxValidationError",
    "Secret",
    "Serialization",
    "ServerInfo",
    "Session",
    "Snapshot",
    "StreamReader",
    "StreamWriter",
    "UsageSample",
    "Volume",
    "VolumeInfo",
    "Volumes",
    "Waitable",
    "WandbAuthError",
    "__version__",
    "exceptions",
    "results",
    "server_info",
    "start_local_service",
    "wait",
]
