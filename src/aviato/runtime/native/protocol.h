/*
 * The supervisor protocol's numbers: frame layout, frame types, flags and limits
 * (docs/internals/supervisor-protocol.md). This file is their single source: the service's
 * side, src/aviato/runtime/supervisor/frames.py, holds the same names with the same values,
 * and tests/runtime/test_protocol_agreement.py parses this file and fails when the two differ.
 *
 * Keep to the two forms that test reads: `#define NAME <integer expression>` and, inside an
 * enum, `NAME = <integer expression>,` (every member with its value written out). Internal
 * numbers of the supervisor that the service never sees belong in supervisor.h instead.
 */
#ifndef AVIATO_PROTOCOL_H
#define AVIATO_PROTOCOL_H

/* HELLO's version; the service refuses a supervisor that speaks another. */
#define PROTOCOL_VERSION 2

/* Every frame: u32 length (of what follows it) | u8 type | u32 id | payload. Little endian. */
#define HDR 9                          /* bytes before the payload */
#define MAX_FRAME (1024 * 1024 + 64)   /* largest allowed value of the length field */

/* Flow control (per id). */
#define OUT_WINDOW (2u << 20)          /* output of one exec/read the service has not credited */
#define STDIN_WINDOW (1u << 20)        /* stdin of one exec the service may have unacknowledged */
#define PIPE_CHUNK (64 * 1024)         /* one read of a command pipe = one STDOUT/STDERR frame */
#define FILE_CHUNK (256 * 1024)        /* FILE_DATA size */
#define DRAIN_MAX (4u << 20)           /* at most this much is drained from pipes at linger end */
#define UNSIZED_FILE_MAX (16u << 20)   /* cap on a read of a file whose st_size is 0 */

/* The main log (fd 4): records of u64 time_ns | u8 stream | u32 length | data. */
#define LOG_HDR 13                     /* bytes before a record's data */
#define LOG_LIMIT (64ull << 20)        /* main log size limit */
enum { LOG_STDOUT = 1, LOG_STDERR = 2 };

/* Frame types, service -> supervisor. */
enum {
    F_EXEC = 1,
    F_STDIN = 2,
    F_STDIN_EOF = 3,
    F_RESIZE = 4,
    F_SIGNAL = 5,
    F_READ_FILE = 6,
    F_WRITE_BEGIN = 7,
    F_WRITE_DATA = 8,
    F_WRITE_END = 9,
    F_WRITE_ABORT = 10,                /* ABORT: drops a write or stops a read */
    F_PING = 11,
    F_TERMINATE = 12,
    F_CREDIT = 13,
    F_DEADLINE = 14,
    F_KILL = 15,
    F_CONNECT_PORT = 16,               /* u16 port: a TCP connection to the sandbox's loopback */
    F_EGRESS_LISTEN = 17,              /* empty: the sandbox's egress listening socket */
    F_FS_OP = 18,                      /* a directory or metadata operation (dirs.c) */
    F_READ_AT = 19,                    /* str root | str rel: READ_FILE beneath a root */
    F_WRITE_AT = 20,                   /* u32 mode | u32 flags | u64 mtime | str root | str rel */
    F_OPEN_FILE = 21,                  /* u32 flags | u32 mode | str path: see files.c */
};

/* Frame types, supervisor -> service. */
enum {
    F_HELLO = 64,
    F_STARTED = 65,
    F_STDOUT = 66,
    F_STDERR = 67,
    F_EXIT = 68,
    F_ERROR = 69,
    F_FILE_INFO = 70,
    F_FILE_DATA = 71,
    F_FILE_END = 72,
    F_WRITE_OK = 73,
    F_PONG = 74,
    F_STDIN_ACK = 75,
    F_PORT_CONNECTED = 76,             /* empty; the connected socket rides on it (SCM_RIGHTS) */
    F_EGRESS_LISTENER = 77,            /* u16 port; the listening socket rides on it (SCM_RIGHTS) */
    F_FS_ENTRIES = 78,                 /* entries of a STAT or LIST, packed (see dirs.c) */
    F_FS_DONE = 79,                    /* u8 truncated: the FS_OP succeeded */
    F_FILE_OPENED = 80,                /* u64 size | u32 mode; the file rides on it (SCM_RIGHTS) */
};

/* EXEC's flags. */
enum { EXEC_STDIN = 1, EXEC_TTY = 2, EXEC_PROTECTED = 4 };

/* WRITE_BEGIN's flags (and WRITE_AT's). */
enum { WRITE_MAKE_PARENTS = 1, WRITE_SET_MTIME = 2 };

/* OPEN_FILE's flags. */
enum { OPEN_FOR_WRITE = 1, OPEN_MAKE_PARENTS = 2, OPEN_LAYER_ON_DISK = 4, OPEN_THROUGH_PIPE = 8 };
/* OPEN_THROUGH_PIPE: a write of a file kept in memory goes through a pipe whose read end the
 * supervisor keeps (files.c); the payload then ends with u64 size, the bytes to come. */

/* FS_OP: u8 op | u32 flags | u32 mode | u64 num | u32 limit | str path | str rel | str arg. */
enum { FS_STAT = 1, FS_LIST = 2, FS_REMOVE = 3, FS_MKDIR = 4, FS_RENAME = 5, FS_SYMLINK = 6,
       FS_SET_META = 7 };
enum { FS_BENEATH = 1, FS_RECURSIVE = 2, FS_PARENTS = 4, FS_SET_MODE = 8, FS_SET_MTIME = 16 };
/* Entry types of FS_ENTRIES: u8 type | u32 mode | u64 size | u64 mtime_ns | str name | str target */
enum { ENTRY_FILE = 1, ENTRY_DIR = 2, ENTRY_SYMLINK = 3, ENTRY_OTHER = 4 };
#define FS_LIST_MAX 10000              /* entries one LIST answers at most */
#define FS_DEPTH_MAX 256               /* directories deep a recursive remove goes */

/* Payload sizes of the fixed-size frames. */
#define EXIT_SIZE 41                   /* i32 code | i32 signal | u8 timed_out | 4 x u64 */
#define FILE_INFO_SIZE 12              /* u64 size | u32 mode */
#define HELLO_SIZE 8                   /* u32 version | u32 pid */
#define CONNECT_PORT_SIZE 2            /* u16 port */
#define EGRESS_LISTENER_SIZE 2         /* u16 port */

/* CONNECT_PORT: a connect that has not completed by then fails (ETIMEDOUT). */
#define PORT_CONNECT_TIMEOUT_MS 5000

/* EGRESS_LISTEN: the listen() backlog of the egress socket (connections from the sandbox that
 * the service has not accepted yet). */
#define EGRESS_BACKLOG 128

#endif
