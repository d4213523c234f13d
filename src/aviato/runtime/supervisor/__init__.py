"""The service's side of the per-sandbox supervisor (docs/internals/supervisor-protocol.md).

- `frames`: the protocol's numbers (mirrored from runtime/native/protocol.h) and frame codec;
- `streams`: what execs and transfers share (output windows, the connection's side of them);
- `exec_handle`: `SupervisorExec`, one command; `file_transfers`: file reads and writes;
- `connection`: `SupervisorConnection`, the asyncio client of one sandbox's control socket;
- `binary`: `supervisor_binary()`, where the compiled `aviato-supervisor` is, and `c_library()`;
- `port_connect`: `connect_port`, a TCP connection to a port inside the sandbox (CONNECT_PORT).
"""

from aviato.runtime.supervisor.binary import SupervisorMissing, c_library, supervisor_binary
from aviato.runtime.supervisor.connection import SupervisorConnection
from aviato.runtime.supervisor.exec_handle import OomProbe, SupervisorExec
from aviato.runtime.supervisor.frames import OUT_WINDOW, PROTOCOL_VERSION, STDIN_WINDOW

__all__ = [
    "OUT_WINDOW",
    "PROTOCOL_VERSION",
    "STDIN_WINDOW",
    "OomProbe",
    "SupervisorConnection",
    "SupervisorExec",
    "SupervisorMissing",
    "c_library",
    "supervisor_binary",
]
