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

from aviato.runtime.base import ExecExit, FileEntry, PathOp

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
F_FS_OP = 18  # a directory or metadata operation
F_READ_AT = 19  # str root | str rel: READ_FILE beneath a root
F_WRITE_AT = 20  # u32 mode | u32 flags | u64 mtime | str root | str rel
F_OPEN_FILE = 21  # u32 flags | u32 mode | str path [| u64 size]: a file's descriptor
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
F_FS_ENTRIES = 78  # entries of a STAT or LIST, packed
F_FS_DONE = 79  # u8 truncated: the FS_OP succeeded
F_FILE_OPENED = 80  # u64 size | u32 mode; the file rides on it (SCM_RIGHTS)

EXEC_STDIN = 1
EXEC_TTY = 2
EXEC_PROTECTED = 4
WRITE_MAKE_PARENTS = 1
WRITE_SET_MTIME = 2
OPEN_FOR_WRITE = 1
OPEN_MAKE_PARENTS = 2
OPEN_LAYER_ON_DISK = 4
OPEN_THROUGH_PIPE = 8  # a file kept in memory: written through a pipe (files.c)

FS_STAT = 1
FS_LIST = 2
FS_REMOVE = 3
FS_MKDIR = 4
FS_RENAME = 5
FS_SYMLINK = 6
FS_SET_META = 7
FS_BENEATH = 1
FS_RECURSIVE = 2
FS_PARENTS = 4
FS_SET_MODE = 8
FS_SET_MTIME = 16
ENTRY_FILE = 1
ENTRY_DIR = 2
ENTRY_SYMLINK = 3
ENTRY_OTHER = 4
FS_LIST_MAX = 10000  # entries one LIST answers at most
FS_DEPTH_MAX = 256  # directories deep a recursive remove goes

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
_FS_OP_HEAD = struct.Struct("<BIIQI")
_ENTRY_HEAD = struct.Struct("<BIQQI")
_WRITE_AT_HEAD = struct.Struct("<IIQ")
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


def encode_open_file(flags: int, mode: int, path: str, size: int = 0) -> bytes:
    """OPEN_FILE: u32 flags | u32 mode | str path, and with OPEN_THROUGH_PIPE | u64 size."""
    body = _II.pack(flags, mode & 0o7777) + encode_str(path)
    return body + _U64.pack(size) if flags & OPEN_THROUGH_PIPE else body


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


_FS_KINDS = {"stat": FS_STAT, "list": FS_LIST, "remove": FS_REMOVE, "mkdir": FS_MKDIR,
             "rename": FS_RENAME, "symlink": FS_SYMLINK, "set_meta": FS_SET_META}  # fmt: skip
_ENTRY_TYPES = {ENTRY_FILE: "file", ENTRY_DIR: "dir", ENTRY_SYMLINK: "symlink"}


def encode_fs_op(op: PathOp) -> bytes:
    """FS_OP: u8 op | u32 flags | u32 mode | u64 num | u32 limit | str path | str rel | str arg
    (num: the entries a LIST skips, or the mtime SET_META gives)."""
    flags = (
        (FS_BENEATH if op.rel is not None else 0)
        | (FS_RECURSIVE if op.recursive else 0)
        | (FS_PARENTS if op.parents else 0)
        | (FS_SET_MODE if op.mode is not None else 0)
        | (FS_SET_MTIME if op.mtime_ns is not None else 0)
    )
    num = op.offset if op.kind == "list" else (op.mtime_ns or 0)
    mode = op.mode if op.mode is not None else (0o755 if op.kind == "mkdir" else 0)
    head = _FS_OP_HEAD.pack(
        _FS_KINDS[op.kind], flags, mode & 0o7777, num, min(op.limit, FS_LIST_MAX)
    )
    return head + encode_str(op.path) + encode_str(op.rel or "") + encode_str(op.arg)


def decode_entries(view: memoryview, into: list[FileEntry]) -> None:
    """FS_ENTRIES: entries, each u8 type | u32 mode | u64 size | u64 mtime_ns | str name | str
    target (a symlink's; empty otherwise)."""
    pos, end = 0, len(view)
    while pos < end:
        kind, mode, size, mtime_ns, n = _ENTRY_HEAD.unpack_from(view, pos)
        pos += _ENTRY_HEAD.size
        name = bytes(view[pos : pos + n]).decode("utf-8", "surrogateescape")
        pos += n
        (tn,) = _U32.unpack_from(view, pos)
        target = bytes(view[pos + 4 : pos + 4 + tn]).decode("utf-8", "surrogateescape")
        pos += 4 + tn
        if pos > end:
            raise ValueError("a truncated FS_ENTRIES frame")
        into.append(FileEntry(name, _ENTRY_TYPES.get(kind, "other"), size, mode, mtime_ns, target))


def encode_read_at(root: str, rel: str) -> bytes:
    return encode_str(root) + encode_str(rel)


def encode_write_at(mode: int, flags: int, mtime_ns: int | None, root: str, rel: str) -> bytes:
    flags |= WRITE_SET_MTIME if mtime_ns is not None else 0
    head = _WRITE_AT_HEAD.pack(mode & 0o7777, flags, mtime_ns or 0)
    return head + encode_str(root) + encode_str(rel)
