/*
 * aviato-supervisor's insides, shared by its modules. The program and its protocol are described
 * in docs/internals/supervisor-protocol.md; the protocol's numbers are in protocol.h.
 *
 * The modules, by concern, top to bottom: a module calls only modules below it (checked by
 * tests/runtime/test_supervisor_layers.py), and the frame handlers never call each other.
 *   main.c          start-up: command line, inherited descriptors, signals; then the loop
 *   loop.c          the single-threaded epoll loop: readiness dispatch, reaping, timers
 *   dispatch.c      a connection's input: read, cut into frames, hand each to its handler;
 *                   flush (a failed send closes), close (reaches every handler)
 *   -- the frame handlers --
 *   exec.c          one command (EXEC): its pipes or pty, stdin, output, start and exit
 *   files.c         READ_FILE, WRITE_BEGIN..END, OPEN_FILE (a write's pipe), path resolution
 *                   without magic links
 *   main_process.c  the sandbox's main process, its log, deadline, and the supervisor's exit
 *   ports.c         CONNECT_PORT: a TCP connection to the sandbox's loopback, handed over
 *   egress.c        EGRESS_LISTEN: the sandbox's egress listening socket and proxy variables
 *   -- below the handlers --
 *   ids.c           a connection's ids: the exec, file read or file write an id names
 *   conn.c          connections: accept, epoll interest, throttling the output queue and the
 *                   producers it paces (command pipes, pending file reads); descriptors
 *                   queued to ride on an outgoing frame
 *   frames.c        the frame codec: building outgoing frames, reading incoming payloads
 *   spawn.c         starting a process: session, stdio, credentials, PATH search, vfork
 *   lineage.c       the mark every command's descendants inherit; killing a command by it
 *   launcher.c      `--launch`: the host-side step before bubblewrap
 *   privileges.c    credentials: the user namespace, the sandbox's user, protected commands
 *   common.c        small helpers: errors, memory, descriptors, epoll watches, byte queues
 *
 * Everything runs on one thread: nothing may block for long, and nothing a client sends may
 * crash the process (a malformed frame closes the connection that sent it).
 */
#ifndef AVIATO_SUPERVISOR_H
#define AVIATO_SUPERVISOR_H

#include <stdint.h>
#include <stddef.h>
#include <sys/resource.h>
#include <sys/types.h>
#include <time.h>

#include "privileges.h"
#include "protocol.h"

/* ---- Internal numbers (not part of the protocol) ---------------------------------------- */

#define OUT_HIGH (4u << 20)            /* queued on a socket above which nothing more is read */
#define OUT_LOW (1u << 20)             /* ... and below which reading resumes */
#define MARK_BASE (1ull << 62)         /* lineage marks: see lineage.c */
#define KILL_ROUNDS 64                 /* rounds of kill_marked before giving up */
#define LINGER_NS (100ull * 1000000)   /* wait this long for pipe EOF after a process exited */
#define NS 1000000000ull
#define PORT_CONNECTS_MAX 32           /* per connection: CONNECT_PORTs connecting or queued */
#define WRITE_PIPE_SIZE (1u << 20)     /* a write through a pipe: what the pipe holds, if allowed */
#define WRITE_PIPE_STEP (1u << 20)     /* ... and what one turn of the loop moves from it at most */

enum { STAGE_SETUP = 1, STAGE_CWD = 2, STAGE_EXEC = 3 }; /* where a child failed before exec */

/* What an epoll registration refers to. */
enum wkind { W_LISTEN, W_SIGNAL, W_CONN, W_OUT, W_ERR, W_START, W_STDIN, W_MAIN_OUT, W_MAIN_ERR,
             W_PORT, W_WRITE_PIPE };

/* ---- Data structures ------------------------------------------------------------------- */

/* An fd in the epoll set. `events` is what is registered (0: not registered). */
struct watch {
    int fd;
    uint32_t events;
    enum wkind kind;
    void *obj;
};

/* A byte queue: data[off, len) is pending. */
struct buf {
    uint8_t *d;
    size_t off, len, cap;
};

struct conn;

struct exec {
    uint32_t id;
    struct conn *c;
    struct exec *next;             /* in c->execs */
    pid_t pid;
    uint64_t mark;                 /* lineage mark of everything it starts (mark_lineage) */
    char *name, *cwd;              /* argv[0] and cwd, for error messages */
    int running;                   /* 0 while waiting for the child's exec() to succeed */
    int tty;
    struct watch w_out, w_err;     /* stdout, stderr pipes (tty: w_out is the pty master) */
    struct watch w_start;          /* CLOEXEC pipe: EOF = exec succeeded, data = failure */
    struct watch w_in;             /* stdin pipe (tty: a dup of the master), -1 if none */
    struct buf inq;                /* stdin not yet written */
    int in_eof;                    /* STDIN_EOF received, close when inq is drained */
    uint64_t in_unacked;           /* STDIN bytes received and not yet acknowledged */
    uint64_t unacked;              /* STDOUT/STDERR bytes sent and not yet credited */
    int reaped, status, timed_out;
    struct rusage ru;
    uint64_t t_start, t_end, deadline, linger;
    struct exec *gnext;            /* graveyard */
};

struct rfile {                     /* a READ_FILE in progress */
    uint32_t id;
    int fd;
    uint64_t left;                 /* bytes still to send (see do_read_file) */
    int sized;                     /* st_size > 0: send at most that many bytes */
    uint64_t unacked;              /* FILE_DATA bytes sent and not yet credited */
    struct rfile *next;
};

struct wfile {                     /* a WRITE_BEGIN..END in progress */
    uint32_t id;
    int fd, dirfd;                 /* the temporary file and its directory */
    uint64_t written;
    char *path, *base, *tmp;       /* path for messages; target and temporary names in dirfd */
    int set_mtime;                 /* WRITE_AT with WRITE_SET_MTIME: give the file `mtime_ns` */
    int by_descriptor;             /* OPEN_FILE for writing: the service writes through a dup */
    uint64_t mtime_ns;
    int piped;                     /* OPEN_THROUGH_PIPE: the bytes come through a pipe */
    struct watch pipe;             /* ... its read end, drained into fd (-1 once closed) */
    int sized;                     /* OPEN_THROUGH_PIPE asked: WRITE_END checks `declared` */
    uint64_t declared;             /* ... the bytes that are to come */
    int pipe_eof;                  /* ... every write end is closed and the pipe is empty */
    int ending;                    /* ... WRITE_END received: answered at the pipe's EOF */
    struct conn *c;                /* ... the connection it belongs to */
    struct wfile *next, *gnext;    /* gnext: graveyard (its watch may be in this epoll batch) */
};

struct port_connect {               /* a CONNECT_PORT whose connect() is in progress */
    uint32_t id;
    uint16_t port;
    int ipv6;                      /* 0: trying 127.0.0.1; 1: trying ::1 (127.0.0.1 refused) */
    struct watch w;                /* the connecting socket (EPOLLOUT: connect finished) */
    uint64_t deadline;             /* monotonic ns: fail with ETIMEDOUT */
    struct conn *c;
    struct port_connect *next;
};

struct passed_fd {                 /* a descriptor that rides on an outgoing frame */
    uint64_t at;                   /* the frame's first byte, counted from the stream's start */
    int fd;
};

struct conn {
    struct watch w;
    int dead;
    int throttled;                 /* output queue is full: command pipes/file reads paused */
    int blocked;                   /* the socket is full: waiting for EPOLLOUT */
    uint8_t *in;
    size_t in_len, in_cap;
    struct buf out;
    struct exec *execs;
    struct rfile *reads;
    struct wfile *writes;
    struct port_connect *ports;
    unsigned nports;               /* in `ports` */
    struct passed_fd pass[PORT_CONNECTS_MAX]; /* queued, oldest first (see conn_queue_fd) */
    unsigned npass;
    uint64_t out_sent;             /* bytes of output sent so far */
    struct conn *next, *gnext;
};

/* A cursor over an incoming payload. Any read past the end sets `bad` (the frame is malformed). */
struct rd {
    const uint8_t *p;
    size_t n;
    int bad;
};

/* What spawn() starts. */
struct child_spec {
    char **argv, **envp;     /* envp NULL: the supervisor's own environment */
    const char *cwd;         /* NULL: inherit */
    int in_fd, out_fd, err_fd; /* -1 for stdin: /dev/null */
    int tty_fd;              /* pty slave: becomes the controlling terminal */
    int report_fd;           /* start pipe, -1 for the main process (errors go to stderr) */
    char **shv;              /* room for argv + 2: `sh FILE ARGS` for a script without #! */
    int protected;           /* run as the protected id (privileged mode only) */
};

/* The sandbox's deadline (DEADLINE frame): at `at` (unix ns) the main process gets SIGTERM, and
 * `grace` later the supervisor exits (which kills everything). `why` goes into the exit file. */
struct sandbox_deadline {
    uint64_t at, grace_ns, kill_mono;
    char why[32];
};

/* The sandbox's main process (absent with --keepalive). */
struct main_process {
    pid_t pid;
    int reaped, status;
    uint64_t end_real, linger;
    struct watch w_out, w_err;
};

/* ---- Global state (single-threaded), by the module that owns it ------------------------ */

/* common.c */
extern int g_ep;
/* loop.c */
extern struct watch g_sig;
/* conn.c */
extern struct conn *g_conns, *g_dead_conns;
extern struct watch g_listen;
extern uint64_t g_listen_resume;     /* when to watch g_listen again after running out of fds */
/* exec.c */
extern struct exec *g_dead_execs;
/* spawn.c */
extern int g_privileged;             /* --user given: commands start as the sandbox's user */
extern struct sandbox_user g_user;
/* lineage.c */
extern uint64_t g_spawn_mark;        /* read by the vfork child in child_run: 0 for no mark */
extern uint64_t g_mark_next;         /* the next exec's mark */
/* ports.c */
extern struct port_connect *g_dead_ports; /* dropped this loop iteration, chained by `next` */
/* files.c */
extern struct wfile *g_dead_wfiles;  /* dropped this loop iteration, chained by `gnext` */
/* main_process.c */
extern int g_log_fd, g_exit_fd;
extern uint64_t g_log_size;
extern int g_keepalive;
extern struct sandbox_deadline g_deadline;
extern char g_end_reason[64];        /* 4th field of the exit record; empty: a plain exit */
extern struct main_process g_main;

/* Functions, by the module that defines them, bottom layer first. */

/* ---- common.c --------------------------------------------------------------------------- */

__attribute__((noreturn, format(printf, 1, 2))) void die(const char *fmt, ...);
void *xrealloc(void *p, size_t n);
uint64_t clock_ns(clockid_t id);
#define now_mono() clock_ns(CLOCK_MONOTONIC)
#define now_real() clock_ns(CLOCK_REALTIME)
int set_nonblock(int fd);
int write_all(int fd, const void *p, size_t n);
int write_number_file(const char *path, long v);
ssize_t send_with_fd(int sock, const void *p, size_t n, int fd);
void watch_set(struct watch *w, uint32_t ev);
void watch_close(struct watch *w);
void watch_init(struct watch *w, int fd, enum wkind kind, void *obj);
uint8_t *buf_reserve(struct buf *b, size_t n);
void buf_free(struct buf *b);

/* Little-endian integers. */
static inline void put32(uint8_t *p, uint32_t v) {
    for (int i = 0; i < 4; i++) p[i] = (uint8_t)(v >> (8 * i));
}
static inline void put64(uint8_t *p, uint64_t v) {
    for (int i = 0; i < 8; i++) p[i] = (uint8_t)(v >> (8 * i));
}
static inline uint32_t get32(const uint8_t *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

/* Byte queues. buf_reserve returns room for n bytes at the end; buf_commit appends them. */
static inline size_t buf_pending(const struct buf *b) { return b->len - b->off; }
static inline void buf_commit(struct buf *b, size_t n) { b->len += n; }

/* ---- frames.c --------------------------------------------------------------------------- */

uint8_t *frame_begin(struct conn *c, size_t maxpayload);
void frame_end(struct conn *c, uint8_t type, uint32_t id, size_t n);
void send_frame(struct conn *c, uint8_t type, uint32_t id, const void *p, size_t n);
void send_u32(struct conn *c, uint8_t type, uint32_t id, uint32_t v);
__attribute__((format(printf, 4, 5)))
void send_error(struct conn *c, uint32_t id, int err, const char *fmt, ...);
uint32_t rd_u32(struct rd *r);
uint64_t rd_u64(struct rd *r);
uint16_t rd_u16(struct rd *r);
char *rd_str(struct rd *r, int *nul);
char **rd_strlist(struct rd *r, int *nul, size_t *count);
void strlist_free(char **v);

/* ---- conn.c ----------------------------------------------------------------------------- */

void conn_update_events(struct conn *c);
void conn_check_throttle(struct conn *c);
void exec_update_streams(struct exec *e);
void conn_pump_reads(struct conn *c);
void accept_conns(void);
int conn_queue_fd(struct conn *c, int fd);
void conn_drop_fds(struct conn *c);

/* ---- ids.c ------------------------------------------------------------------------------ */

struct exec *exec_find(struct conn *c, uint32_t id);
struct rfile **rfile_find(struct conn *c, uint32_t id);
struct wfile **wfile_find(struct conn *c, uint32_t id);
struct port_connect **port_find(struct conn *c, uint32_t id);
int id_in_use(struct conn *c, uint32_t id);

/* ---- lineage.c -------------------------------------------------------------------------- */

void mark_lineage(void);
void kill_marked(uint64_t mark);
void exec_kill(struct exec *e, int sig);
void exec_kill_tree(struct exec *e);

/* ---- spawn.c ---------------------------------------------------------------------------- */

pid_t spawn(struct child_spec *s);

/* ---- exec.c ----------------------------------------------------------------------------- */

struct exec *exec_by_pid(pid_t pid);
void exec_free(struct exec *e);
void exec_flush_stdin(struct exec *e);
void exec_stdin(struct exec *e, const uint8_t *p, size_t n);
void exec_stdin_eof(struct exec *e);
void exec_maybe_finish(struct exec *e);
void exec_read_stream(struct exec *e, struct watch *w);
void exec_drain_and_finish(struct exec *e);
void exec_check_start(struct exec *e, int force);
void do_exec(struct conn *c, uint32_t id, struct rd *r);

/* ---- files.c ---------------------------------------------------------------------------- */

void remember_own_files(void);
void do_read_file(struct conn *c, uint32_t id, struct rd *r);
void wfile_drop(struct conn *c, struct wfile **pp, int keep_tmp);
struct wfile *begin_write(struct conn *c, uint32_t id, uint32_t mode, uint32_t flags, char *path);
void do_open_file(struct conn *c, uint32_t id, struct rd *r);
void do_write_begin(struct conn *c, uint32_t id, struct rd *r);
void do_write_data(struct conn *c, uint32_t id, const uint8_t *p, size_t n);
void do_write_end(struct conn *c, uint32_t id);
void write_pipe_drain(struct wfile *f);
/* files.c, shared with dirs.c */
int open_resolved(int dirfd, const char *path, int flags);
const char *path_error(int err);
int tmp_create(int dirfd, char **name);
int make_dirs(const char *dir);
void read_opened(struct conn *c, uint32_t id, int fd, const char *path);
/* dirs.c: FS_OP, READ_AT, WRITE_AT */
void do_fs_op(struct conn *c, uint32_t id, struct rd *r);
void do_read_at(struct conn *c, uint32_t id, struct rd *r);
void do_write_at(struct conn *c, uint32_t id, struct rd *r);

/* ---- main_process.c --------------------------------------------------------------------- */

__attribute__((noreturn)) void supervisor_exit(int code, int sig, uint64_t when);
void main_maybe_exit(void);
void main_read(struct watch *w);
void main_start(char **argv);
void terminate(int sig, int from_inside);
void do_deadline(struct rd *r);

/* ---- ports.c ---------------------------------------------------------------------------- */

void do_connect_port(struct conn *c, uint32_t id, struct rd *r);
void port_connect_ready(struct port_connect *p);
uint64_t port_check_timeouts(struct conn *c, uint64_t now);
void port_drop(struct conn *c, struct port_connect **pp);

/* ---- egress.c --------------------------------------------------------------------------- */

int egress_open(void);
void do_egress_listen(struct conn *c, uint32_t id, struct rd *r);

/* ---- dispatch.c ------------------------------------------------------------------------- */

void conn_flush(struct conn *c);
void conn_read(struct conn *c);

/* ---- loop.c ----------------------------------------------------------------------------- */

__attribute__((noreturn)) void loop(void);

/* ---- launcher.c ------------------------------------------------------------------------- */

int launch(int argc, char **argv);
/* Closes every descriptor from `low` on (close_range, else one by one). */
void close_from(int low);

/* ---- zygote.c --------------------------------------------------------------------------- */

/* `--zygote`: forks a launcher for each request on fd 3; returns when the service went away. */
int zygote(void);

#endif
