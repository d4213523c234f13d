"""The supervisor protocol's frames, the service's side: numbers and codec.

The numbers mirror `runtime/native/protocol.h`, the single source (same names, same values);
tests/runtime/test_protocol_agreement.py parses that header and fails when the two differ. Every
public integer constant of this module is such a mirror: numbers that only the service uses (its
chunk sizes, credit steps) live beside the code that uses them.

The layout of each frame is in docs/internals/supervisor-protocol.md. Encoders return payloads
(bytes), `header` the 9 bytes before one; decoders take a frame's payload (a memoryview into the
receive buffer) and raise `struct.error` when it is too short.
"""

from __future__ import annotations

import struct

from aviato.runtime.base import ExecExit

# ---- mirrored from protocol.h ----

PROTOCOL_VERSION = 2
HDR = 9  # u32 length | u8 type | u32 id
MAX_FRAME = 1024 * 1024 + 64  # largest value of a frame's length field

OUT_WINDOW = 2 << 20  # output of one id the supervisor sends ahead of credits
STDIN_WINDOW = 1 << 20  # stdin of one exec in flight, not yet acknowledged
PIPE_CHUNK = 64 * 1024  # largest STDOUT/STDERR payload
FILE_CHUNK = 256 * 1024  # largest FILE_DATA payload
DRAIN_MAX = 4 << 20  # per stream, drained from a finished command's pipes regardless of credit
UNSIZED_FILE_MAX = 16 << 20  # a file that reports size 0 is read up to this much

LOG_HDR = 13  # main log record: u64 time_ns | u8 stream | u32 length | data
LOG_LIMIT = 64 << 20
LOG_STDOUT = 1
LOG_STDERR = 2

# Frame types, service -> supervisor.
F_EXEC = 1
F_STDIN = 2
F_STDIN_EOF = 3
F_RESIZE = 4
F_SIGNAL = 5
F_READ_FILE = 6
F_WRITE_BEGIN = 7
F_WRITE_DATA = 8
F_WRITE_END = 9
F_WRITE_ABORT = 10  # ABORT: drops a write or stops a read
F_PING = 11
F_TERMINATE = 12
F_CREDIT = 13
F_DEADLINE = 14
F_KILL = 15
F_CONNECT_PORT = 16  # u16 port: a TCP connection to the sandbox's loopback
F_EGRESS_LISTEN = 17  # empty: the sandbox's egress listening socket
# Frame types, supervisor -> service.
F_HELLO = 64
F_STARTED = 65
F_STDOUT = 66
F_STDERR = 67
F_EXIT = 68
F_ERROR = 69
F_FILE_INFO = 70
F_FILE_DATA = 71
F_FILE_END = 72
F_WRITE_OK = 73
F_PONG = 74
F_STDIN_ACK = 75
F_PORT_CONNECTED = 76  # empty; the connected socket rides on it (SCM_RIGHTS)
F_EGRESS_LISTENER = 77  # u16 port; the listening socket rides on it (SCM_RIGHTS)

EXEC_STDIN = 1
EXEC_TTY = 2
EXEC_PROTECTED = 4
WRITE_MAKE_PARENTS = 1

EXIT_SIZE = 41
FILE_INFO_SIZE = 12
HELLO_SIZE = 8
CONNECT_PORT_SIZE = 2
EGRESS_LISTENER_SIZE = 2

PORT_CONNECT_TIMEOUT_MS = 5000  # CONNECT_PORT: a connect not done by then fails
EGRESS_BACKLOG = 128  # EGRESS_LISTEN: listen() backlog of the egress socket

# ---- codec ----

_HDR = struct.Struct("<IBI")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_II = struct.Struct("<II")
_HH = struct.Struct("<HH")
_EXEC_HEAD = struct.Struct("<IIHH")
_EXIT_BODY = struct.Struct("<iiBQQQQ")
_ERROR_HEAD = struct.Struct("<iI")
_FILE_INFO_BODY = struct.Struct("<QI")
_DEADLINE_HEAD = struct.Struct("<QI")
_U16 = struct.Struct("<H")
LOG_RECORD_HEAD = struct.Struct("<QBI")  # a main log record's header (LOG_HDR bytes)

unpack_header = _HDR.unpack_from  # (buffer, offset) -> (length, type, id)


def header(ftype: int, fid: int, payload_size: int) -> bytes:
    """The 9 bytes that precede a payload of `payload_size` bytes."""
    return _HDR.pack(5 + payload_size, ftype, fid)


def u32(v: int) -> bytes:
    return _U32.pack(v)


def read_u32(view: memoryview) -> int:
    (v,) = _U32.unpack_from(view)
    return int(v)


def read_u64(view: memoryview) -> int:
    (v,) = _U64.unpack_from(view)
    return int(v)


def clamp16(v: int) -> int:
    return max(0, min(int(v), 0xFFFF))


def encode_str(s: str) -> bytes:
    b = s.encode("utf-8", "surrogateescape")
    return _U32.pack(len(b)) + b


def encode_strlist(items: list[str]) -> bytes:
    return _U32.pack(len(items)) + b"".join(encode_str(s) for s in items)


def encode_exec(
    flags: int, timeout_ms: int, rows: int, cols: int, cwd: str, argv: list[str], env: list[str]
) -> bytes:
    """EXEC: u32 flags | u32 timeout_ms | u16 rows | u16 cols | str cwd | list argv | list env."""
    return b"".join(
        (
            _EXEC_HEAD.pack(flags, timeout_ms, clamp16(rows), clamp16(cols)),
            encode_str(cwd),
            encode_strlist(argv),
            encode_strlist(env),
        )
    )


def encode_resize(rows: int, cols: int) -> bytes:
    return _HH.pack(clamp16(rows), clamp16(cols))


def encode_write_begin(mode: int, flags: int, path: str) -> bytes:
    return _II.pack(mode & 0o7777, flags) + encode_str(path)


def encode_deadline(at_ns: int, grace_ms: int, why: str) -> bytes:
    return _DEADLINE_HEAD.pack(at_ns, grace_ms) + encode_str(why)


def encode_connect_port(port: int) -> bytes:
    """CONNECT_PORT: u16 port (the caller checks that it is 1 to 65535)."""
    return _U16.pack(port)


def decode_egress_listener(view: memoryview) -> int:
    """EGRESS_LISTENER: u16 port (of the listening socket riding on the frame)."""
    (port,) = _U16.unpack_from(view)
    return int(port)


def decode_exit(view: memoryview) -> ExecExit:
    """EXIT: i32 code | i32 signal | u8 timed_out | u64 utime_us | u64 stime_us | u64 maxrss_bytes
    | u64 wall_us, straight into the runtime's model (`oom_killed` is the exec handle's to tell)."""
    code, sig, timed_out, utime, stime, rss, wall = _EXIT_BODY.unpack_from(view)
    return ExecExit(code, sig, bool(timed_out), utime / 1e6, stime / 1e6, rss, wall / 1e6)


def decode_error(view: memoryview) -> tuple[int, str]:
    """ERROR: i32 errno | str message."""
    err, n = _ERROR_HEAD.unpack_from(view)
    return err, bytes(view[8 : 8 + n]).decode("utf-8", "replace")


def decode_file_info(view: memoryview) -> tuple[int, int]:
    """FILE_INFO: (size, mode)."""
    size, mode = _FILE_INFO_BODY.unpack_from(view)
    return size, mode


def decode_hello(view: memoryview) -> tuple[int, int]:
    """HELLO: (protocol version, supervisor pid)."""
    version, pid = _II.unpack_from(view)
    return version, pid
