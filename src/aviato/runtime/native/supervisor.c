/*
 * aviato-supervisor: PID 1 of an aviato sandbox.
 *
 * Implements docs/internals/supervisor-protocol.md. In short: it runs the sandbox's main process
 * (its output goes to the main log on fd 4, its exit status to the exit file on fd 5), accepts
 * service connections on the listening socket fd 3, and on each connection runs commands (exec)
 * and moves files in and out. Everything is driven by one single-threaded epoll loop: nothing in
 * here may block for long, and nothing a client sends may crash it (a malformed frame closes the
 * connection that sent it).
 *
 * A second mode, `--launch`, runs on the host before bubblewrap: it joins cgroups, starts a new
 * session and execs the given program, so the whole sandbox starts inside its cgroups.
 *
 * C11 + Linux/glibc, no other dependencies. Build: cc -std=c11 -O2 -static -o aviato-supervisor.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stddef.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <sys/random.h>
#include <sys/resource.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

#include "privileges.h"

/* ---- Constants ------------------------------------------------------------------------- */

#define PROTOCOL_VERSION 2
#define HDR 9                          /* u32 length | u8 type | u32 id */
#define MAX_FRAME (1024 * 1024 + 64)   /* largest allowed value of the length field */
#define OUT_HIGH (4u << 20)            /* queued on a socket above which nothing more is read */
#define OUT_LOW (1u << 20)             /* ... and below which reading resumes */
#define OUT_WINDOW (2u << 20)          /* output of one exec/read the service has not credited */
#define STDIN_WINDOW (1u << 20)        /* stdin of one exec the service may have unacknowledged */
#define MARK_BASE (1ull << 62)         /* lineage marks: see mark_lineage */
#define KILL_ROUNDS 64                 /* rounds of kill_marked before giving up */
#define PIPE_CHUNK (64 * 1024)         /* one read of a command pipe = one STDOUT/STDERR frame */
#define FILE_CHUNK (256 * 1024)        /* FILE_DATA size */
#define UNSIZED_FILE_MAX (16u << 20)   /* cap on a read of a file whose st_size is 0 */
#define LOG_LIMIT (64ull << 20)        /* main log size limit */
#define LOG_HDR 13                     /* u64 time_ns | u8 stream | u32 length */
#define LINGER_NS (100ull * 1000000)   /* wait this long for pipe EOF after a process exited */
#define DRAIN_MAX (4u << 20)           /* at most this much is drained from pipes at linger end */
#define NS 1000000000ull

enum { F_EXEC = 1, F_STDIN, F_STDIN_EOF, F_RESIZE, F_SIGNAL, F_READ_FILE, F_WRITE_BEGIN,
       F_WRITE_DATA, F_WRITE_END, F_WRITE_ABORT, F_PING, F_TERMINATE, F_CREDIT, F_DEADLINE,
       F_KILL };
enum { F_HELLO = 64, F_STARTED, F_STDOUT, F_STDERR, F_EXIT, F_ERROR, F_FILE_INFO, F_FILE_DATA,
       F_FILE_END, F_WRITE_OK, F_PONG, F_STDIN_ACK };
enum { EXEC_STDIN = 1, EXEC_TTY = 2, EXEC_PROTECTED = 4 };
enum { STAGE_SETUP = 1, STAGE_CWD = 2, STAGE_EXEC = 3 }; /* where a child failed before exec */

/* What an epoll registration refers to. */
enum wkind { W_LISTEN, W_SIGNAL, W_CONN, W_OUT, W_ERR, W_START, W_STDIN, W_MAIN_OUT, W_MAIN_ERR };

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
    struct wfile *next;
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
    struct conn *next, *gnext;
};

/* Global state (single-threaded). */
static int g_ep = -1;
static struct watch g_listen = {-1, 0, W_LISTEN, NULL}, g_sig = {-1, 0, W_SIGNAL, NULL};
static uint64_t g_listen_resume;
static struct conn *g_conns, *g_dead_conns;
static struct exec *g_dead_execs;
static int g_log_fd = -1, g_exit_fd = -1;
static uint64_t g_log_size;
static int g_log_stopped;
static int g_keepalive;
static int g_privileged;             /* --user given: commands start as the sandbox's user */
static struct sandbox_user g_user;
/* The sandbox's deadline (DEADLINE frame): at `at` (unix ns) the main process gets SIGTERM, and
 * `grace` later the supervisor exits (which kills everything). `why` goes into the exit file. */
static struct {
    uint64_t at, grace_ns, kill_mono;
    char why[32];
} g_deadline;
static char g_end_reason[64];    /* 4th field of the exit record; empty: a plain exit */
static struct { dev_t dev; ino_t ino; } g_own_files[8]; /* see is_own_file */
static int g_own_count;
static struct {
    pid_t pid;
    int reaped, status;
    uint64_t end_real, linger;
    struct watch w_out, w_err;
} g_main = {0, 0, 0, 0, 0, {-1, 0, W_MAIN_OUT, NULL}, {-1, 0, W_MAIN_ERR, NULL}};

/* ---- Small helpers --------------------------------------------------------------------- */

static void die(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fputs("aviato-supervisor: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    _exit(125);
}

static void *xrealloc(void *p, size_t n) {
    void *q = realloc(p, n ? n : 1);
    if (!q) die("out of memory");
    return q;
}

static uint64_t clock_ns(clockid_t id) {
    struct timespec ts;
    clock_gettime(id, &ts);
    return (uint64_t)ts.tv_sec * NS + (uint64_t)ts.tv_nsec;
}
#define now_mono() clock_ns(CLOCK_MONOTONIC)
#define now_real() clock_ns(CLOCK_REALTIME)

/* Little-endian integers. */
static void put32(uint8_t *p, uint32_t v) {
    for (int i = 0; i < 4; i++) p[i] = (uint8_t)(v >> (8 * i));
}
static void put64(uint8_t *p, uint64_t v) {
    for (int i = 0; i < 8; i++) p[i] = (uint8_t)(v >> (8 * i));
}
static uint32_t get32(const uint8_t *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static int set_nonblock(int fd) {
    int fl = fcntl(fd, F_GETFL);
    return fl < 0 ? -1 : fcntl(fd, F_SETFL, fl | O_NONBLOCK);
}

static int write_all(int fd, const void *p, size_t n) {
    const uint8_t *b = p;
    while (n > 0) {
        ssize_t w = write(fd, b, n);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) return -1;
        b += w;
        n -= (size_t)w;
    }
    return 0;
}

/* Writes a decimal number to a file such as cgroup.procs or /proc/self/oom_score_adj. */
static int write_number_file(const char *path, long v) {
    char s[32];
    int n = snprintf(s, sizeof s, "%ld\n", v);
    int fd = open(path, O_WRONLY | O_CLOEXEC);
    if (fd < 0) return -1;
    int r = write_all(fd, s, (size_t)n);
    int e = errno;
    close(fd);
    errno = e;
    return r;
}

/* epoll registration: add, modify or remove so that `ev` is what is watched. */
static void watch_set(struct watch *w, uint32_t ev) {
    if (w->fd < 0 || w->events == ev) return;
    struct epoll_event e = {.events = ev, .data.ptr = w};
    int op = !w->events ? EPOLL_CTL_ADD : !ev ? EPOLL_CTL_DEL : EPOLL_CTL_MOD;
    if (epoll_ctl(g_ep, op, w->fd, &e) < 0) die("epoll_ctl: %s", strerror(errno));
    w->events = ev;
}

/* Unregister (before close: a forked child may still hold the same open file) and close. */
static void watch_close(struct watch *w) {
    if (w->fd < 0) return;
    watch_set(w, 0);
    close(w->fd);
    w->fd = -1;
}

static void watch_init(struct watch *w, int fd, enum wkind kind, void *obj) {
    w->fd = fd;
    w->events = 0;
    w->kind = kind;
    w->obj = obj;
}

/* Byte queues. buf_reserve returns room for n bytes at the end; buf_commit appends them. */
static size_t buf_pending(const struct buf *b) { return b->len - b->off; }

static uint8_t *buf_reserve(struct buf *b, size_t n) {
    if (b->off == b->len) b->off = b->len = 0;
    if (b->cap - b->len < n && b->off > 0) {
        memmove(b->d, b->d + b->off, b->len - b->off);
        b->len -= b->off;
        b->off = 0;
    }
    if (b->cap - b->len < n) {
        size_t cap = b->cap ? b->cap : 16384;
        while (cap - b->len < n) cap *= 2;
        b->d = xrealloc(b->d, cap);
        b->cap = cap;
    }
    return b->d + b->len;
}

static void buf_commit(struct buf *b, size_t n) { b->len += n; }

static void buf_free(struct buf *b) {
    free(b->d);
    memset(b, 0, sizeof *b);
}

/* ---- Outgoing frames ------------------------------------------------------------------- */

/* Room for a frame with up to `maxpayload` bytes; returns where the payload goes. */
static uint8_t *frame_begin(struct conn *c, size_t maxpayload) {
    return buf_reserve(&c->out, HDR + maxpayload) + HDR;
}

static void frame_end(struct conn *c, uint8_t type, uint32_t id, size_t n) {
    uint8_t *h = c->out.d + c->out.len;
    put32(h, (uint32_t)(5 + n));
    h[4] = type;
    put32(h + 5, id);
    buf_commit(&c->out, HDR + n);
}

static void send_frame(struct conn *c, uint8_t type, uint32_t id, const void *p, size_t n) {
    if (c->dead) return;
    uint8_t *d = frame_begin(c, n);
    if (n) memcpy(d, p, n);
    frame_end(c, type, id, n);
}

static void send_u32(struct conn *c, uint8_t type, uint32_t id, uint32_t v) {
    uint8_t p[4];
    put32(p, v);
    send_frame(c, type, id, p, 4);
}

/* ERROR: i32 errno | str message. Terminal for `id`. */
static void send_error(struct conn *c, uint32_t id, int err, const char *fmt, ...) {
    char msg[1024];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    if (n < 0) n = 0;
    if ((size_t)n >= sizeof msg) n = sizeof msg - 1;
    uint8_t *d = frame_begin(c, 8 + (size_t)n);
    put32(d, (uint32_t)err);
    put32(d + 4, (uint32_t)n);
    memcpy(d + 8, msg, (size_t)n);
    frame_end(c, F_ERROR, id, 8 + (size_t)n);
}

/* ---- Execs ----------------------------------------------------------------------------- */

static void conn_check_throttle(struct conn *c);
static int id_in_use(struct conn *c, uint32_t id);

static struct exec *exec_find(struct conn *c, uint32_t id) {
    for (struct exec *e = c->execs; e; e = e->next)
        if (e->id == id) return e;
    return NULL;
}

static struct exec *exec_by_pid(pid_t pid) {
    for (struct conn *c = g_conns; c; c = c->next)
        for (struct exec *e = c->execs; e; e = e->next)
            if (e->pid == pid) return e;
    return NULL;
}

/* SIGKILL (or another signal) to the command's process group, and to the child itself in case
 * it has not called setsid() yet. */
static void exec_kill(struct exec *e, int sig) {
    if (e->pid <= 0) return;
    if (kill(-e->pid, sig) < 0 && !e->reaped) kill(e->pid, sig);
}

/* ---- Lineage marks --------------------------------------------------------------------- */

/* The supervisor is PID 1, so every orphan of the sandbox is re-parented to it and which command
 * started it is lost: killing a command's process group leaves what it started in a new session
 * (setsid), a new process group or behind a double fork. So every command carries a mark that
 * all its descendants inherit, whatever they do to their session, group or parent: its
 * RLIMIT_RTTIME (soft = hard = MARK_BASE + a number unique to the exec). That limit bounds only
 * the CPU time of realtime-scheduled processes, which a sandbox cannot create (no CAP_SYS_NICE,
 * RLIMIT_RTPRIO 0), and 2^62 us is unlimited in practice anyway. /proc/<pid>/limits shows it to
 * everyone. A kill (timeout, KILL, the connection closing) SIGKILLs every process that carries
 * the exec's mark (kill_marked). Setting it costs one setrlimit in the child; a fork-based
 * per-command subreaper was measured at +110-150 us per exec here and was not taken.
 *
 * A process could leave its lineage by changing its own RLIMIT_RTTIME (lowering it needs no
 * privilege), so each marked command also gets a second seccomp filter, stacked on the sandbox's
 * and inherited by all it starts, that refuses every change of RLIMIT_RTTIME (setrlimit, and
 * prlimit64 with a new value) with EPERM: the mark cannot be shed. The supervisor itself is not
 * under that filter. What the mark says nothing about: processes started on a command's behalf
 * by something older (a server that an earlier command left running). */
static uint64_t g_spawn_mark;  /* read by the vfork child in child_run: 0 for no mark */
static uint64_t g_mark_next;   /* the next exec's mark */

#define ARG_LOW(i) (offsetof(struct seccomp_data, args) + 8 * (i))      /* little endian */
#define ARG_HIGH(i) (offsetof(struct seccomp_data, args) + 8 * (i) + 4)
static struct sock_filter g_mark_filter[] = {
    BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
    BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_setrlimit, 0, 2),
    BPF_STMT(BPF_LD | BPF_W | BPF_ABS, ARG_LOW(0)),               /* setrlimit(resource, ..) */
    BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, RLIMIT_RTTIME, 7, 8),
    BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_prlimit64, 0, 7),
    BPF_STMT(BPF_LD | BPF_W | BPF_ABS, ARG_LOW(1)),               /* prlimit64(pid, resource, */
    BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, RLIMIT_RTTIME, 0, 5),     /*           new, old)      */
    BPF_STMT(BPF_LD | BPF_W | BPF_ABS, ARG_LOW(2)),
    BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, 0, 0, 2),                 /* new != NULL: refused */
    BPF_STMT(BPF_LD | BPF_W | BPF_ABS, ARG_HIGH(2)),
    BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, 0, 1, 0),
    BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | EPERM),
    BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
};

/* In the child (vfork: raw system calls only): the mark, and the filter that keeps it. */
static void mark_lineage(void) {
    if (!g_spawn_mark) return;
    struct rlimit rl = {(rlim_t)g_spawn_mark, (rlim_t)g_spawn_mark};
    /* best effort: a command without a mark is still killed by its process group */
    if (syscall(SYS_prlimit64, 0, RLIMIT_RTTIME, &rl, NULL) < 0) return;
    struct sock_fprog prog = {sizeof g_mark_filter / sizeof *g_mark_filter, g_mark_filter};
    syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, 0, &prog);
}

/* The soft RLIMIT_RTTIME of `pid` from /proc/<pid>/limits (0: gone, a zombie, unreadable). */
static uint64_t mark_of(long pid) {
    char path[64], buf[2048];
    snprintf(path, sizeof path, "/proc/%ld/limits", pid);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return 0;
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0) return 0;
    buf[n] = 0;
    char *line = strstr(buf, "Max realtime timeout");
    if (!line) return 0;
    line += strlen("Max realtime timeout");
    while (*line == ' ') line++;
    return strtoull(line, NULL, 10); /* "unlimited": 0 */
}

/* SIGKILLs every process marked `mark`, in rounds until a round finds none that was not already
 * killed (a process forking meanwhile hands its mark to the child; zombies show no limits). */
static void kill_marked(uint64_t mark) {
    long killed[256];
    size_t nk = 0;
    for (int round = 0; round < KILL_ROUNDS; round++) {
        int fresh = 0;
        DIR *d = opendir("/proc");
        struct dirent *de;
        while (d && (de = readdir(d))) {
            long pid = atol(de->d_name);
            if (pid <= 0 || pid == (long)getpid() || mark_of(pid) != mark) continue;
            kill((pid_t)pid, SIGKILL);
            int seen = 0;
            for (size_t i = 0; i < nk && !seen; i++) seen = killed[i] == pid;
            if (!seen) {
                fresh = 1;
                if (nk < sizeof killed / sizeof *killed) killed[nk++] = pid;
            }
        }
        if (d) closedir(d);
        if (!fresh) return;
    }
}

/* Kills everything the command started (timeout, KILL, its connection closing). */
static void exec_kill_tree(struct exec *e) {
    exec_kill(e, SIGKILL);
    if (e->mark) kill_marked(e->mark);
}

/* Pipes are read while the command runs, its output window has room and the socket keeps up. */
static void exec_update_streams(struct exec *e) {
    uint32_t ev = (e->running && !e->c->throttled && e->unacked < OUT_WINDOW) ? EPOLLIN : 0;
    watch_set(&e->w_out, ev);
    watch_set(&e->w_err, ev);
}

static void exec_free(struct exec *e) {
    struct conn *c = e->c;
    for (struct exec **pp = &c->execs; *pp; pp = &(*pp)->next)
        if (*pp == e) {
            *pp = e->next;
            break;
        }
    watch_close(&e->w_out);
    watch_close(&e->w_err);
    watch_close(&e->w_start);
    watch_close(&e->w_in);
    buf_free(&e->inq);
    free(e->name), free(e->cwd);
    e->name = e->cwd = NULL;
    e->gnext = g_dead_execs; /* freed at the end of this loop iteration */
    g_dead_execs = e;
}

/* STDIN_ACK for up to `n` bytes that left the stdin queue (the ^D of a tty is not counted). */
static void exec_ack_stdin(struct exec *e, uint64_t n) {
    if (n > e->in_unacked) n = e->in_unacked;
    if (!n) return;
    e->in_unacked -= n;
    send_u32(e->c, F_STDIN_ACK, e->id, (uint32_t)n);
}

static void exec_close_stdin(struct exec *e) {
    watch_close(&e->w_in);
    exec_ack_stdin(e, buf_pending(&e->inq)); /* dropped: the service may send more */
    e->inq.off = e->inq.len = 0;
}

/* Writes queued stdin; called on STDIN frames and when the pipe is writable again. */
static void exec_flush_stdin(struct exec *e) {
    uint64_t written = 0;
    while (e->w_in.fd >= 0 && buf_pending(&e->inq) > 0) {
        ssize_t n = write(e->w_in.fd, e->inq.d + e->inq.off, buf_pending(&e->inq));
        if (n > 0) e->inq.off += (size_t)n, written += (uint64_t)n;
        else if (n < 0 && errno == EINTR) continue;
        else if (n < 0 && errno == EAGAIN) break;
        else { /* EPIPE, EIO: the command stopped reading stdin */
            exec_ack_stdin(e, written);
            exec_close_stdin(e);
            return;
        }
    }
    exec_ack_stdin(e, written);
    if (e->w_in.fd < 0) return;
    if (buf_pending(&e->inq)) {
        watch_set(&e->w_in, EPOLLOUT);
    } else {
        watch_set(&e->w_in, 0);
        if (e->in_eof && !e->tty) exec_close_stdin(e);
    }
}

/* STDIN: the service keeps at most STDIN_WINDOW bytes unacknowledged per exec, so the queue is
 * bounded without ever pausing the connection; more is a protocol error. */
static void exec_stdin(struct exec *e, const uint8_t *p, size_t n) {
    if (e->in_unacked + n > STDIN_WINDOW) {
        e->c->dead = -1;
        return;
    }
    e->in_unacked += n;
    if (e->w_in.fd < 0 || e->in_eof) { /* nobody reads it: acknowledged as dropped */
        exec_ack_stdin(e, n);
        return;
    }
    if (n == 0) return;
    memcpy(buf_reserve(&e->inq, n), p, n);
    buf_commit(&e->inq, n);
    exec_flush_stdin(e);
}

/* STDIN_EOF: close the pipe, or on a tty send the terminal's EOF character (^D). */
static void exec_stdin_eof(struct exec *e) {
    if (e->w_in.fd < 0 || e->in_eof) return;
    if (e->tty) {
        struct termios t;
        uint8_t ch = 4;
        if (tcgetattr(e->w_in.fd, &t) == 0 && t.c_cc[VEOF] != _POSIX_VDISABLE) ch = t.c_cc[VEOF];
        memcpy(buf_reserve(&e->inq, 1), &ch, 1);
        buf_commit(&e->inq, 1);
    }
    e->in_eof = 1;
    exec_flush_stdin(e);
}

/* EXIT: i32 exit_code | i32 signal | u8 timed_out | u64 utime_us | stime_us | maxrss | wall_us */
static void exec_send_exit(struct exec *e) {
    int code = 0, sig = 0;
    if (WIFEXITED(e->status)) code = WEXITSTATUS(e->status);
    else if (WIFSIGNALED(e->status)) sig = WTERMSIG(e->status), code = 128 + sig;
    uint8_t *d = frame_begin(e->c, 41);
    put32(d, (uint32_t)code);
    put32(d + 4, (uint32_t)sig);
    d[8] = (uint8_t)e->timed_out;
    put64(d + 9, (uint64_t)e->ru.ru_utime.tv_sec * 1000000 + (uint64_t)e->ru.ru_utime.tv_usec);
    put64(d + 17, (uint64_t)e->ru.ru_stime.tv_sec * 1000000 + (uint64_t)e->ru.ru_stime.tv_usec);
    put64(d + 25, (uint64_t)e->ru.ru_maxrss * 1024);
    put64(d + 33, (e->t_end - e->t_start) / 1000);
    frame_end(e->c, F_EXIT, e->id, 41);
}

/* The exec is complete when the process is reaped and its pipes reached EOF, or when it was
 * reaped LINGER_NS ago (a background process may keep the pipes open forever). */
static void exec_maybe_finish(struct exec *e) {
    if (!e->reaped || !e->running) return;
    if (e->w_out.fd >= 0 || e->w_err.fd >= 0) {
        if (!e->linger) e->linger = now_mono() + LINGER_NS;
        return;
    }
    exec_send_exit(e);
    exec_free(e);
}

static void exec_read_stream(struct exec *e, struct watch *w) {
    struct conn *c = e->c;
    uint8_t *p = frame_begin(c, PIPE_CHUNK);
    ssize_t n = read(w->fd, p, PIPE_CHUNK);
    if (n > 0) {
        frame_end(c, w->kind == W_OUT ? F_STDOUT : F_STDERR, e->id, (size_t)n);
        e->unacked += (uint64_t)n;
        if (e->unacked >= OUT_WINDOW) exec_update_streams(e);
        conn_check_throttle(c);
    } else if (n == 0 || (errno != EAGAIN && errno != EINTR)) { /* EOF; EIO on a pty */
        watch_close(w);
        exec_maybe_finish(e);
    }
}

/* At the end of the linger time: take what is left in the pipes (even beyond the output
 * window, at most DRAIN_MAX per stream), then finish. */
static void exec_drain_and_finish(struct exec *e) {
    struct watch *ws[2] = {&e->w_out, &e->w_err};
    for (int i = 0; i < 2; i++) {
        size_t total = 0;
        while (ws[i]->fd >= 0 && total < DRAIN_MAX) {
            uint8_t *p = frame_begin(e->c, PIPE_CHUNK);
            ssize_t n = read(ws[i]->fd, p, PIPE_CHUNK);
            if (n <= 0) break;
            frame_end(e->c, i == 0 ? F_STDOUT : F_STDERR, e->id, (size_t)n);
            total += (size_t)n;
        }
        watch_close(ws[i]);
    }
    exec_maybe_finish(e);
}

/* A program that is missing or not executable ends the way a shell reports it: a message on
 * stderr and exit code 127 (not found) or 126 (found but not executable). That is an outcome of
 * the command, not a failure of the exec machinery, so it is not an ERROR frame. */
static void send_exec_refused(struct exec *e, int err) {
    char msg[1024];
    int n = err == ENOENT || err == ENOTDIR
                ? snprintf(msg, sizeof msg, "aviato: %s: command not found\n", e->name)
                : snprintf(msg, sizeof msg, "aviato: %s: %s\n", e->name, strerror(err));
    if (n < 0) n = 0;
    if ((size_t)n >= sizeof msg) n = sizeof msg - 1;
    send_frame(e->c, F_STDERR, e->id, msg, (size_t)n);
    uint8_t d[41] = {0};
    put32(d, err == ENOENT || err == ENOTDIR ? 127u : 126u);
    send_frame(e->c, F_EXIT, e->id, d, sizeof d);
}

/* The child's exec() succeeded (start pipe EOF) or failed (start pipe has {stage, errno}).
 * `force`: the child is already reaped, so an empty pipe means success. */
static void exec_check_start(struct exec *e, int force) {
    int rep[2];
    ssize_t n = read(e->w_start.fd, rep, sizeof rep);
    if (n < 0 && errno == EAGAIN && !force) return; /* a sibling's fork still holds the pipe */
    watch_close(&e->w_start);
    if (n == (ssize_t)sizeof rep) { /* the child _exit()s by itself and is reaped anonymously */
        const char *err = strerror(rep[1]);
        if (rep[0] == STAGE_EXEC && rep[1] != E2BIG && rep[1] != ENOMEM && rep[1] != EAGAIN)
            send_exec_refused(e, rep[1]);
        else if (rep[0] == STAGE_EXEC)
            send_error(e->c, e->id, rep[1], "cannot execute '%s': %s", e->name, err);
        else if (rep[0] == STAGE_CWD)
            send_error(e->c, e->id, rep[1], "working directory '%s': %s", e->cwd, err);
        else
            send_error(e->c, e->id, rep[1], "cannot set up the command: %s", err);
        exec_free(e);
        return;
    }
    e->running = 1;
    send_u32(e->c, F_STARTED, e->id, (uint32_t)e->pid);
    exec_update_streams(e);
    exec_maybe_finish(e);
}

/* ---- Starting processes ---------------------------------------------------------------- */

struct child_spec {
    char **argv, **envp;     /* envp NULL: the supervisor's own environment */
    const char *cwd;         /* NULL: inherit */
    int in_fd, out_fd, err_fd; /* -1 for stdin: /dev/null */
    int tty_fd;              /* pty slave: becomes the controlling terminal */
    int report_fd;           /* start pipe, -1 for the main process (errors go to stderr) */
    char **shv;              /* room for argv + 2: `sh FILE ARGS` for a script without #! */
    int protected;           /* run as the protected id (privileged mode only) */
};

/* In the child: reports why it could not start, and exits. No stdio: see spawn(). */
static __attribute__((noreturn)) void child_fail(const struct child_spec *s, int stage, int err) {
    if (s->report_fd >= 0) {
        int rep[2] = {stage, err};
        write_all(s->report_fd, rep, sizeof rep);
    } else {
        const char *parts[] = {"aviato: cannot start '", s->argv[0], "': ", strerror(err), "\n"};
        for (size_t i = 0; i < sizeof parts / sizeof *parts; i++)
            write_all(2, parts[i], strlen(parts[i]));
    }
    _exit(127);
}

static const char *env_get(char **envp, const char *key) {
    size_t k = strlen(key);
    for (; envp && *envp; envp++)
        if (!strncmp(*envp, key, k) && (*envp)[k] == '=') return *envp + k + 1;
    return NULL;
}

/* execve(); a file without #! (ENOEXEC) runs with /bin/sh, as execvp() does. `shv` has room
 * for argv and two more. */
static void exec_file(const char *file, char **argv, char **envp, char **shv) {
    execve(file, argv, envp);
    if (errno != ENOEXEC) return;
    int argc = 0;
    while (argv[argc]) argc++;
    shv[0] = "sh", shv[1] = (char *)file;
    memcpy(shv + 2, argv + 1, sizeof(char *) * (size_t)argc);
    execve("/bin/sh", shv, envp);
    errno = ENOEXEC;
}

/* execvp() semantics, but searching the PATH of the *given* environment. Returns on failure. */
static void exec_path(char **argv, char **envp, char **shv) {
    const char *file = argv[0];
    if (strchr(file, '/')) {
        exec_file(file, argv, envp, shv);
        return;
    }
    const char *path = env_get(envp, "PATH");
    if (!path) path = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
    int saw_eacces = 0;
    char full[PATH_MAX];
    for (const char *p = path;; p++) {
        const char *end = strchrnul(p, ':'), *dir = p;
        size_t dl = (size_t)(end - p);
        if (dl == 0) dir = ".", dl = 1; /* an empty entry means the current directory */
        if (dl + 2 + strlen(file) <= sizeof full) {
            memcpy(full, dir, dl);
            full[dl] = '/';
            strcpy(full + dl + 1, file);
            exec_file(full, argv, envp, shv);
            if (errno == EACCES) saw_eacces = 1;
            else if (errno != ENOENT && errno != ENOTDIR && errno != ENAMETOOLONG &&
                     errno != ELOOP)
                return;
        }
        if (!*end) break;
        p = end;
    }
    errno = saw_eacces ? EACCES : ENOENT;
}

/* Runs in the new child: new session, stdio, oom_score_adj, cwd, then exec. */
static __attribute__((noreturn)) void child_run(const struct child_spec *s) {
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL); /* all other dispositions are SIG_DFL already */
    signal(SIGPIPE, SIG_DFL);
    if (setsid() < 0) child_fail(s, STAGE_SETUP, errno);
    int in = s->in_fd;
    if (s->tty_fd >= 0) {
        if (ioctl(s->tty_fd, TIOCSCTTY, 0) < 0) child_fail(s, STAGE_SETUP, errno);
    }
    if (in < 0 && (in = open("/dev/null", O_RDONLY | O_CLOEXEC)) < 0)
        child_fail(s, STAGE_SETUP, errno);
    if (dup2(in, 0) < 0 || dup2(s->out_fd, 1) < 0 || dup2(s->err_fd, 2) < 0)
        child_fail(s, STAGE_SETUP, errno);
    write_number_file("/proc/self/oom_score_adj", 1000); /* best effort */
    mark_lineage(); /* before the credentials change: it needs no privilege either way */
    if (g_privileged && priv_child_become(&g_user, s->protected) < 0)
        child_fail(s, STAGE_SETUP, errno);
    if (s->cwd && chdir(s->cwd) < 0) child_fail(s, STAGE_CWD, errno);
    exec_path(s->argv, s->envp ? s->envp : environ, s->shv);
    child_fail(s, STAGE_EXEC, errno);
}

/* Starts `s` in a child process; returns its pid, or -1 with errno set.
 *
 * vfork: the child borrows this process's memory until its execve (or _exit), so there are no
 * page tables to copy and no copy-on-write faults afterwards; this saves ~0.1 ms of the ~0.7 ms
 * an exec of a small program takes here. This process waits meanwhile (microseconds: the
 * child makes a few syscalls and execs). What the child runs keeps to what is safe in a vfork
 * child: it never returns, allocates nothing (`shv` is allocated here), uses no stdio, and
 * ends in execve or _exit. Its own function, so that no local of the caller can be clobbered
 * by the child. */
static __attribute__((noinline)) pid_t spawn(struct child_spec *s) {
    size_t argc = 0;
    while (s->argv[argc]) argc++;
    s->shv = xrealloc(NULL, sizeof(char *) * (argc + 2));
    pid_t pid = vfork();
    if (pid == 0) child_run(s);
    int err = errno;
    free(s->shv);
    s->shv = NULL;
    errno = err;
    return pid;
}

/* ---- Incoming frames ------------------------------------------------------------------- */

/* A cursor over a payload. Any read past the end sets `bad` (the frame is malformed). */
struct rd {
    const uint8_t *p;
    size_t n;
    int bad;
};

static uint32_t rd_u32(struct rd *r) {
    if (r->n < 4) { r->bad = 1; return 0; }
    uint32_t v = get32(r->p);
    r->p += 4, r->n -= 4;
    return v;
}

static uint64_t rd_u64(struct rd *r) {
    uint64_t lo = rd_u32(r), hi = rd_u32(r);
    return lo | hi << 32;
}

static uint16_t rd_u16(struct rd *r) {
    if (r->n < 2) { r->bad = 1; return 0; }
    uint16_t v = (uint16_t)(r->p[0] | r->p[1] << 8);
    r->p += 2, r->n -= 2;
    return v;
}

/* A str as a new NUL-terminated string; *nul is set if it contains a NUL byte. */
static char *rd_str(struct rd *r, int *nul) {
    uint32_t len = rd_u32(r);
    if (r->bad || len > r->n) { r->bad = 1; return NULL; }
    char *s = xrealloc(NULL, (size_t)len + 1);
    memcpy(s, r->p, len);
    s[len] = 0;
    if (memchr(s, 0, len)) *nul = 1;
    r->p += len, r->n -= len;
    return s;
}

/* A list<str> as a NULL-terminated array. */
static char **rd_strlist(struct rd *r, int *nul, size_t *count) {
    uint32_t k = rd_u32(r);
    if (r->bad || k > r->n / 4) { r->bad = 1; return NULL; }
    char **v = xrealloc(NULL, sizeof(char *) * ((size_t)k + 1));
    size_t i = 0;
    for (; i < k && !r->bad; i++) v[i] = rd_str(r, nul);
    if (r->bad) i--;   /* the last one failed and is NULL */
    v[i] = NULL;
    *count = i;
    return v;
}

static void strlist_free(char **v) {
    for (size_t i = 0; v && v[i]; i++) free(v[i]);
    free(v);
}

/* The supervisor's environment overridden by `extra` ("K=V"; a later duplicate wins). */
static char **merge_env(char **extra, size_t nextra) {
    size_t n = 0;
    while (environ[n]) n++;
    char **out = xrealloc(NULL, sizeof(char *) * (n + nextra + 1));
    size_t k = 0;
    for (size_t i = 0; i < n + nextra; i++) {
        char *s = i < n ? environ[i] : extra[i - n];
        size_t kl = strcspn(s, "=");
        int shadowed = 0;
        for (size_t j = (i < n ? 0 : i - n + 1); j < nextra && !shadowed; j++)
            shadowed = !strncmp(extra[j], s, kl) && extra[j][kl] == '=';
        if (!shadowed) out[k++] = s;
    }
    out[k] = NULL;
    return out;
}

/* EXEC: u32 flags | u32 timeout_ms | u16 rows | u16 cols | str cwd | list argv | list env */
static void do_exec(struct conn *c, uint32_t id, struct rd *r) {
    int nul = 0;
    size_t argc = 0, envc = 0;
    uint32_t flags = rd_u32(r);
    uint32_t timeout_ms = rd_u32(r);
    struct winsize ws = {0};
    ws.ws_row = rd_u16(r);
    ws.ws_col = rd_u16(r);
    char *cwd = rd_str(r, &nul);
    char **argv = r->bad ? NULL : rd_strlist(r, &nul, &argc);
    char **env = r->bad ? NULL : rd_strlist(r, &nul, &envc);
    char **envp = NULL;
    int fds[8] = {-1, -1, -1, -1, -1, -1, -1, -1}; /* out r/w, err r/w, in r/w, start r/w */
    int master = -1, slave = -1;
    struct exec *e = NULL;
    if (r->bad) { /* malformed: close the connection */
        free(cwd), strlist_free(argv), strlist_free(env);
        c->dead = -1;
        return;
    }
    if (id_in_use(c, id)) {
        send_error(c, id, EEXIST, "id %u is already in use", id);
        goto out;
    }
    if (argc == 0 || nul) {
        send_error(c, id, EINVAL, argc ? "argument or environment contains a NUL byte"
                                        : "empty command");
        goto out;
    }
    for (size_t i = 0; i < envc; i++)
        if (!strchr(env[i], '=') || env[i][0] == '=') {
            send_error(c, id, EINVAL, "invalid environment entry '%s' (expected K=V)", env[i]);
            goto out;
        }
    if ((flags & EXEC_PROTECTED) && (flags & EXEC_TTY)) {
        send_error(c, id, EINVAL, "a protected command cannot have a terminal");
        goto out;
    }
    if ((flags & EXEC_PROTECTED) && !g_privileged) {
        send_error(c, id, EPERM, "protected commands need a sandbox with a user namespace of "
                                 "its own (a service running as root)");
        goto out;
    }
    envp = envc ? merge_env(env, envc) : NULL;
    if (pipe2(fds + 6, O_CLOEXEC) < 0) goto fail;
    if (flags & EXEC_TTY) {
        char name[128];
        if ((master = posix_openpt(O_RDWR | O_NOCTTY | O_CLOEXEC)) < 0 || grantpt(master) < 0 ||
            unlockpt(master) < 0 || ptsname_r(master, name, sizeof name) != 0 ||
            (slave = open(name, O_RDWR | O_NOCTTY | O_CLOEXEC)) < 0)
            goto fail;
        if (ws.ws_row && ws.ws_col) ioctl(slave, TIOCSWINSZ, &ws);
    } else {
        if (pipe2(fds, O_CLOEXEC) < 0 || pipe2(fds + 2, O_CLOEXEC) < 0) goto fail;
        if ((flags & EXEC_STDIN) && pipe2(fds + 4, O_CLOEXEC) < 0) goto fail;
    }
    struct child_spec cs = {
        .argv = argv, .envp = envp, .cwd = cwd[0] ? cwd : NULL,
        .in_fd = slave >= 0 ? slave : fds[4], .out_fd = slave >= 0 ? slave : fds[1],
        .err_fd = slave >= 0 ? slave : fds[3], .tty_fd = slave, .report_fd = fds[7],
        .protected = (flags & EXEC_PROTECTED) != 0,
    };
    uint64_t t0 = now_mono(), mark = MARK_BASE + ++g_mark_next;
    g_spawn_mark = mark; /* for the child: see mark_lineage */
    pid_t pid = spawn(&cs);
    g_spawn_mark = 0;
    if (pid < 0) goto fail;

    e = xrealloc(NULL, sizeof *e);
    memset(e, 0, sizeof *e);
    e->id = id, e->c = c, e->pid = pid, e->mark = mark, e->t_start = t0, e->tty = slave >= 0;
    e->name = strdup(argv[0]), e->cwd = cwd, cwd = NULL;
    if (timeout_ms) e->deadline = t0 + (uint64_t)timeout_ms * 1000000;
    if (e->tty) {
        int in = dup(master);
        if (in >= 0) fcntl(in, F_SETFD, FD_CLOEXEC), set_nonblock(in);
        watch_init(&e->w_out, master, W_OUT, e);
        watch_init(&e->w_in, in, W_STDIN, e);
        master = -1;
    } else {
        watch_init(&e->w_out, fds[0], W_OUT, e);
        watch_init(&e->w_in, fds[5], W_STDIN, e);
        fds[0] = fds[5] = -1;
    }
    watch_init(&e->w_err, fds[2], W_ERR, e);
    watch_init(&e->w_start, fds[6], W_START, e);
    fds[2] = fds[6] = -1;
    set_nonblock(e->w_out.fd);
    if (e->w_err.fd >= 0) set_nonblock(e->w_err.fd);
    if (e->w_in.fd >= 0) set_nonblock(e->w_in.fd);
    set_nonblock(e->w_start.fd);
    e->next = c->execs;
    c->execs = e;
    watch_set(&e->w_start, EPOLLIN);
    goto out;
fail:
    send_error(c, id, errno, "cannot start the command: %s", strerror(errno));
out:
    for (int i = 0; i < 8; i++)
        if (fds[i] >= 0) close(fds[i]);
    if (master >= 0) close(master);
    if (slave >= 0) close(slave);
    free(cwd), free(envp), strlist_free(argv), strlist_free(env);
}

/* ---- files ---- */

static struct rfile **rfile_find(struct conn *c, uint32_t id) {
    struct rfile **pp = &c->reads;
    while (*pp && (*pp)->id != id) pp = &(*pp)->next;
    return pp;
}

static struct wfile **wfile_find(struct conn *c, uint32_t id) {
    struct wfile **pp = &c->writes;
    while (*pp && (*pp)->id != id) pp = &(*pp)->next;
    return pp;
}

static int id_in_use(struct conn *c, uint32_t id) {
    return exec_find(c, id) || *rfile_find(c, id) || *wfile_find(c, id);
}

/* Streams pending file reads into the output queue: each read while its window has room (the
 * service credits what it consumed), all of them until the socket's queue is full. */
static void conn_pump_reads(struct conn *c) {
    struct rfile **pp = &c->reads;
    while (*pp && !c->throttled && !c->dead) {
        struct rfile *f = *pp;
        if (f->unacked >= OUT_WINDOW) { /* its reader is behind: serve the others */
            pp = &f->next;
            continue;
        }
        /* A sized file ends after its announced size (a snapshot even while it grows); an
         * unsized one (procfs, sysfs) ends at EOF, and is refused when it produces more than
         * UNSIZED_FILE_MAX (/proc/<pid>/pagemap would stream hundreds of GiB). A probe read
         * after the cap tells the two apart (a whole chunk: pagemap reads must be multiples of
         * 8 bytes). */
        size_t want = FILE_CHUNK;
        if (f->left < want) want = f->left ? (size_t)f->left : (f->sized ? 0 : FILE_CHUNK);
        ssize_t n = 0;
        uint8_t *p = NULL;
        if (want) {
            p = frame_begin(c, want);
            n = read(f->fd, p, want);
        }
        if (n < 0 && errno == EINTR) continue;
        if (n > 0 && !f->sized && f->left == 0) {
            send_error(c, f->id, EINVAL, "the file reports no size and produces more than %u "
                       "MiB: it cannot be read as a file", UNSIZED_FILE_MAX >> 20);
        } else if (n > 0) {
            f->left -= (uint64_t)n;
            f->unacked += (uint64_t)n;
            frame_end(c, F_FILE_DATA, f->id, (size_t)n);
            conn_check_throttle(c);
            continue;
        } else if (n == 0) {
            send_frame(c, F_FILE_END, f->id, NULL, 0);
        } else {
            send_error(c, f->id, errno, "read failed: %s", strerror(errno));
        }
        *pp = f->next;
        close(f->fd);
        free(f);
    }
}

/* ---- resolving paths ---- */

#ifndef SYS_openat2
#define SYS_openat2 437
#endif
struct how2 { uint64_t flags, mode, resolve; }; /* struct open_how */
#define NO_MAGICLINKS 0x02                      /* RESOLVE_NO_MAGICLINKS */
static int g_no_openat2;

/* Whether `fd` is one of the supervisor's own host-side files (see remember_own_files). */
static int is_own_file(int fd) {
    struct stat st;
    if (fstat(fd, &st) < 0) return 0;
    for (int i = 0; i < g_own_count; i++)
        if (g_own_files[i].dev == st.st_dev && g_own_files[i].ino == st.st_ino) return 1;
    return 0;
}

/* The regular files among the inherited descriptors (stdout/stderr: the runtime log; 4: main
 * log; 5: exit file) are host files: what the fallback of open_resolved refuses. */
static void remember_own_files(void) {
    for (int fd = 0; fd <= 5 && g_own_count < 8; fd++) {
        struct stat st;
        if (fstat(fd, &st) == 0 && S_ISREG(st.st_mode))
            g_own_files[g_own_count].dev = st.st_dev, g_own_files[g_own_count++].ino = st.st_ino;
    }
}

/* openat() for the file API, which must never follow a /proc "magic link" (/proc/<pid>/fd/N,
 * exe, cwd, root, ...): those are not paths but handles, and /proc/self/fd/4 or /proc/1/fd/4 is
 * the supervisor's own descriptor of a host file, reachable by any symlink planted in the
 * sandbox. openat2(RESOLVE_NO_MAGICLINKS) refuses them (ELOOP) at every step of the path; plain
 * symlinks and /proc/self itself still work. Kernels without openat2 (before 5.6): the file
 * opened is refused when it is one of our own files (ELOOP too). */
static int open_resolved(int dirfd, const char *path, int flags) {
    if (!g_no_openat2) {
        struct how2 how = {.flags = (uint64_t)flags, .mode = 0, .resolve = NO_MAGICLINKS};
        int fd = (int)syscall(SYS_openat2, dirfd, path, &how, sizeof how);
        if (fd >= 0 || (errno != ENOSYS && errno != E2BIG)) return fd;
        g_no_openat2 = 1;
    }
    int fd = openat(dirfd, path, flags);
    if (fd >= 0 && is_own_file(fd)) {
        close(fd);
        errno = ELOOP;
        return -1;
    }
    return fd;
}

static const char *path_error(int err) {
    return err == ELOOP ? "too many levels of symbolic links, or a link through /proc/<pid>/fd, "
                          "exe, cwd or root (file transfers do not follow those)"
                        : strerror(err);
}

/* Filesystems whose st_size says nothing about what a read returns (procfs: 0; sysfs: 4096). */
static int size_is_meaningless(int fd) {
    struct statfs sf;
    if (fstatfs(fd, &sf) < 0) return 0;
    switch ((unsigned long)sf.f_type) {
    case 0x9fa0:     /* procfs */
    case 0x62656572: /* sysfs */
    case 0x64626720: /* debugfs */
    case 0x74726163: /* tracefs */
    case 0x73636673: /* securityfs */
    case 0x27e0eb:   /* cgroup */
    case 0x63677270: /* cgroup2 */
    case 0x62656570: /* configfs */
        return 1;
    }
    return 0;
}

/* READ_FILE: str path → FILE_INFO, FILE_DATA..., FILE_END (or ERROR). */
static void do_read_file(struct conn *c, uint32_t id, struct rd *r) {
    int nul = 0;
    char *path = rd_str(r, &nul);
    if (r->bad) {
        c->dead = -1;
        return;
    }
    struct stat st;
    int fd = -1;
    if (id_in_use(c, id)) {
        send_error(c, id, EEXIST, "id %u is already in use", id);
    } else if (nul || !path[0]) {
        send_error(c, id, EINVAL, "invalid path");
    } else if ((fd = open_resolved(AT_FDCWD, path, O_RDONLY | O_CLOEXEC | O_NOCTTY | O_NONBLOCK)) <
                   0 ||
               fstat(fd, &st) < 0) {
        send_error(c, id, errno, "%s: %s", path, path_error(errno));
    } else if (S_ISDIR(st.st_mode)) {
        send_error(c, id, EISDIR, "%s: is a directory", path);
    } else if (!S_ISREG(st.st_mode)) {
        send_error(c, id, EINVAL, "%s: not a regular file", path);
    } else {
        off_t size = size_is_meaningless(fd) ? 0 : st.st_size;
        uint8_t info[12];
        put64(info, (uint64_t)size);
        put32(info + 8, st.st_mode & 07777);
        send_frame(c, F_FILE_INFO, id, info, sizeof info);
        struct rfile *f = xrealloc(NULL, sizeof *f);
        *f = (struct rfile){.id = id, .fd = fd, .next = NULL, .sized = size > 0,
                            .left = size > 0 ? (uint64_t)size : UNSIZED_FILE_MAX};
        *rfile_find(c, id) = f; /* append */
        fd = -1;
        conn_pump_reads(c);
    }
    if (fd >= 0) close(fd);
    free(path);
}

/* mkdir -p */
static int make_dirs(const char *dir) {
    char p[PATH_MAX];
    size_t n = strlen(dir);
    if (n >= sizeof p) return errno = ENAMETOOLONG, -1;
    memcpy(p, dir, n + 1);
    for (size_t i = 1; i <= n; i++) {
        if (p[i] != '/' && p[i] != '\0') continue;
        char saved = p[i];
        p[i] = '\0';
        if (mkdir(p, 0755) < 0 && errno != EEXIST) return -1;
        p[i] = saved;
    }
    return 0;
}

static void wfile_drop(struct conn *c, struct wfile **pp, int keep_tmp) {
    struct wfile *f = *pp;
    *pp = f->next;
    if (f->fd >= 0) close(f->fd);
    if (!keep_tmp) unlinkat(f->dirfd, f->tmp, 0);
    close(f->dirfd);
    free(f->path), free(f->base), free(f->tmp), free(f);
    (void)c;
}

/* A new temporary file `.aviato-tmp-XXXXXX` in `dirfd` (mode 0600, never following a link). */
static int tmp_create(int dirfd, char **name) {
    static const char abc[] = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
    static uint64_t counter;
    for (int attempt = 0; attempt < 100; attempt++) {
        uint64_t v = now_real() ^ ((uint64_t)getpid() << 40) ^ (++counter * 0x9e3779b97f4a7c15ull);
        char s[] = ".aviato-tmp-XXXXXX";
        for (int i = 12; i < 18; i++) s[i] = abc[v % 62], v /= 62;
        int fd = openat(dirfd, s, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, 0600);
        if (fd >= 0) {
            *name = strdup(s);
            return fd;
        }
        if (errno != EEXIST) return -1;
    }
    errno = EEXIST;
    return -1;
}

/* WRITE_BEGIN: u32 mode | u32 flags | str path. A temporary file next to the target, in the
 * target's directory opened once (without magic links); the rename happens in that directory. */
static void do_write_begin(struct conn *c, uint32_t id, struct rd *r) {
    int nul = 0;
    uint32_t mode = rd_u32(r), flags = rd_u32(r);
    char *path = rd_str(r, &nul);
    if (r->bad) {
        c->dead = -1;
        return;
    }
    struct stat st;
    size_t n = strlen(path);
    char *slash = strrchr(path, '/');
    char *dir = slash == path ? strdup("/") : slash ? strndup(path, (size_t)(slash - path))
                                                    : strdup(".");
    const char *base = slash ? slash + 1 : path;
    char *tmp = NULL;
    int fd = -1, dirfd = -1;
    if (id_in_use(c, id)) {
        send_error(c, id, EEXIST, "id %u is already in use", id);
    } else if (nul || n == 0) {
        send_error(c, id, EINVAL, "invalid path");
    } else if (path[n - 1] == '/' || (stat(path, &st) == 0 && S_ISDIR(st.st_mode))) {
        send_error(c, id, EISDIR, "%s: is a directory", path);
    } else if ((flags & 1) && make_dirs(dir) < 0) {
        send_error(c, id, errno, "cannot create %s: %s", dir, strerror(errno));
    } else if ((dirfd = open_resolved(AT_FDCWD, dir, O_PATH | O_DIRECTORY | O_CLOEXEC)) < 0) {
        send_error(c, id, errno, "%s: %s", path, path_error(errno));
    } else if ((fd = tmp_create(dirfd, &tmp)) < 0) {
        send_error(c, id, errno, "%s: %s", path, strerror(errno));
    } else if (fchmod(fd, mode & 07777) < 0) {
        send_error(c, id, errno, "%s: %s", path, strerror(errno));
        close(fd), unlinkat(dirfd, tmp, 0);
    } else {
        struct wfile *f = xrealloc(NULL, sizeof *f);
        *f = (struct wfile){.id = id, .fd = fd, .dirfd = dirfd, .path = path,
                            .base = strdup(base), .tmp = tmp, .next = c->writes};
        c->writes = f;
        path = tmp = NULL;
        dirfd = -1;
    }
    if (dirfd >= 0) close(dirfd);
    free(path), free(dir), free(tmp);
}

static void do_write_data(struct conn *c, uint32_t id, const uint8_t *p, size_t n) {
    struct wfile **pp = wfile_find(c, id);
    if (!*pp) return;
    if (write_all((*pp)->fd, p, n) < 0) {
        send_error(c, id, errno, "%s: %s", (*pp)->path, strerror(errno));
        wfile_drop(c, pp, 0);
        return;
    }
    (*pp)->written += n;
}

static void do_write_end(struct conn *c, uint32_t id) {
    struct wfile **pp = wfile_find(c, id), *f = *pp;
    if (!f) return;
    int rc = close(f->fd);
    f->fd = -1;
    if (rc < 0 || renameat(f->dirfd, f->tmp, f->dirfd, f->base) < 0) {
        send_error(c, id, errno, "%s: %s", f->path, strerror(errno));
        wfile_drop(c, pp, 0);
        return;
    }
    uint8_t v[8];
    put64(v, f->written);
    send_frame(c, F_WRITE_OK, id, v, 8);
    wfile_drop(c, pp, 1);
}

/* ---- main process and supervisor exit ---- */

/* Writes the exit record (with g_end_reason as its 4th field when set) and exits; as PID 1 of
 * the pid namespace, that kills every other process of the sandbox. */
static void supervisor_exit(int code, int sig, uint64_t when) {
    for (struct conn *c = g_conns; c; c = c->next) {
        for (struct exec *e = c->execs; e; e = e->next) exec_kill(e, SIGKILL);
        if (buf_pending(&c->out)) /* best effort, never wait */
            (void)!send(c->w.fd, c->out.d + c->out.off, buf_pending(&c->out),
                        MSG_NOSIGNAL | MSG_DONTWAIT);
    }
    if (g_exit_fd >= 0) {
        char s[160];
        int n = snprintf(s, sizeof s, "%d %d %llu%s%s\n", code, sig, (unsigned long long)when,
                         g_end_reason[0] ? " " : "", g_end_reason);
        write_all(g_exit_fd, s, (size_t)n);
    }
    _exit(code);
}

static void main_maybe_exit(void) {
    if (!g_main.reaped || g_main.w_out.fd >= 0 || g_main.w_err.fd >= 0) return;
    int st = g_main.status, code = 0, sig = 0;
    if (WIFEXITED(st)) code = WEXITSTATUS(st);
    else if (WIFSIGNALED(st)) sig = WTERMSIG(st), code = 128 + sig;
    supervisor_exit(code, sig, g_main.end_real);
}

/* Writes one main log record (data already at rec + LOG_HDR) with a single write(). */
static void log_record(uint8_t *rec, int stream, size_t n) {
    if (g_log_fd < 0 || g_log_stopped) return;
    static const char note[] = "[aviato: log truncated at 64 MiB]";
    uint8_t r2[LOG_HDR + sizeof note];
    if (g_log_size + LOG_HDR + n > LOG_LIMIT) {
        memcpy(r2 + LOG_HDR, note, sizeof note - 1);
        g_log_stopped = 1;
        rec = r2, stream = 2, n = sizeof note - 1;
    }
    put64(rec, now_real());
    rec[8] = (uint8_t)stream;
    put32(rec + 9, (uint32_t)n);
    if (write_all(g_log_fd, rec, LOG_HDR + n) == 0) g_log_size += LOG_HDR + n;
}

static void main_read(struct watch *w) {
    static uint8_t rec[LOG_HDR + PIPE_CHUNK];
    ssize_t n = read(w->fd, rec + LOG_HDR, PIPE_CHUNK);
    if (n > 0) {
        log_record(rec, w->kind == W_MAIN_OUT ? 1 : 2, (size_t)n);
    } else if (n == 0 || (errno != EAGAIN && errno != EINTR)) {
        watch_close(w);
        main_maybe_exit();
    }
}

static void main_start(char **argv) {
    int out[2], err[2];
    if (pipe2(out, O_CLOEXEC) < 0 || pipe2(err, O_CLOEXEC) < 0) die("pipe: %s", strerror(errno));
    struct child_spec cs = {.argv = argv, .in_fd = -1, .out_fd = out[1], .err_fd = err[1],
                            .tty_fd = -1, .report_fd = -1};
    pid_t pid = spawn(&cs);
    if (pid < 0) die("fork: %s", strerror(errno));
    close(out[1]), close(err[1]);
    set_nonblock(out[0]), set_nonblock(err[0]);
    g_main.pid = pid;
    watch_init(&g_main.w_out, out[0], W_MAIN_OUT, NULL);
    watch_init(&g_main.w_err, err[0], W_MAIN_ERR, NULL);
    watch_set(&g_main.w_out, EPOLLIN);
    watch_set(&g_main.w_err, EPOLLIN);
}

/* SIGTERM/SIGINT/TERMINATE/the deadline: forwarded to the main process group; with --keepalive
 * the supervisor exits, with 0, or 128+sig when a process inside sent the signal. */
static void terminate(int sig, int from_inside) {
    if (g_keepalive) supervisor_exit(from_inside ? 128 + sig : 0, from_inside ? sig : 0, now_real());
    if (g_main.pid > 0 && !g_main.reaped && kill(-g_main.pid, sig) < 0) kill(g_main.pid, sig);
}

/* DEADLINE: u64 unix_ns (0: none) | u32 grace_ms | str why ([a-z0-9_-], at most 31 bytes).
 * Replaces the previous deadline; one that has begun (SIGTERM sent) runs its course. */
static void do_deadline(struct rd *r) {
    int nul = 0;
    uint64_t at = rd_u64(r);
    uint32_t grace_ms = rd_u32(r);
    char *why = rd_str(r, &nul);
    if (r->bad) return;
    size_t n = strlen(why);
    int ok = !nul && n > 0 && n < sizeof g_deadline.why;
    for (size_t i = 0; ok && i < n; i++)
        ok = (why[i] >= 'a' && why[i] <= 'z') || (why[i] >= '0' && why[i] <= '9') ||
             why[i] == '-' || why[i] == '_';
    if (!ok) r->bad = 1;
    else if (!g_deadline.kill_mono) {
        g_deadline.at = at;
        g_deadline.grace_ns = (uint64_t)grace_ms * 1000000;
        memcpy(g_deadline.why, why, n + 1);
    }
    free(why);
}

/* ---- frame dispatch ---- */

static void handle_frame(struct conn *c, uint8_t type, uint32_t id, const uint8_t *p, size_t n) {
    struct rd r = {p, n, 0};
    struct exec *e = (type >= F_STDIN && type <= F_SIGNAL) || type == F_CREDIT || type == F_KILL
                         ? exec_find(c, id) : NULL;
    switch (type) {
    case F_EXEC: do_exec(c, id, &r); break;
    case F_STDIN: if (e) exec_stdin(e, p, n); break;
    case F_STDIN_EOF: if (e) exec_stdin_eof(e); break;
    case F_RESIZE: {
        struct winsize ws = {0};
        ws.ws_row = rd_u16(&r);
        ws.ws_col = rd_u16(&r);
        if (!r.bad && e && e->tty && e->w_in.fd >= 0) ioctl(e->w_in.fd, TIOCSWINSZ, &ws);
        break;
    }
    case F_SIGNAL: {
        uint32_t sig = rd_u32(&r);
        if (!r.bad && e && sig < 65) exec_kill(e, (int)sig);
        break;
    }
    case F_READ_FILE: do_read_file(c, id, &r); break;
    case F_WRITE_BEGIN: do_write_begin(c, id, &r); break;
    case F_WRITE_DATA: do_write_data(c, id, p, n); break;
    case F_WRITE_END: do_write_end(c, id); break;
    case F_WRITE_ABORT: { /* ABORT: drops a write (no file left) or stops a read */
        struct wfile **pp = wfile_find(c, id);
        struct rfile **rp = rfile_find(c, id), *f = *rp;
        if (*pp) wfile_drop(c, pp, 0);
        else if (f) *rp = f->next, close(f->fd), free(f);
        break;
    }
    case F_PING: send_frame(c, F_PONG, id, NULL, 0); break;
    case F_TERMINATE: {
        uint32_t sig = rd_u32(&r);
        if (!r.bad && sig < 65) terminate((int)sig, 0);
        break;
    }
    case F_CREDIT: {
        uint32_t k = rd_u32(&r);
        if (r.bad) break;
        if (e) {
            e->unacked = k < e->unacked ? e->unacked - k : 0;
            exec_update_streams(e);
        } else {
            struct rfile *f = *rfile_find(c, id);
            if (f) f->unacked = k < f->unacked ? f->unacked - k : 0, conn_pump_reads(c);
        }
        break;
    }
    case F_KILL: if (e) exec_kill_tree(e); break;
    case F_DEADLINE: do_deadline(&r); break;
    default: r.bad = 1; /* unknown frame type: protocol error */
    }
    if (r.bad) c->dead = -1;
}

/* ---- Connections ----------------------------------------------------------------------- */

static void conn_close(struct conn *c) {
    if (c->dead > 0) return;
    c->dead = 1;
    watch_close(&c->w);
    while (c->execs) { /* nobody can read them any more */
        exec_kill_tree(c->execs);
        exec_free(c->execs);
    }
    while (c->reads) {
        struct rfile *f = c->reads;
        c->reads = f->next;
        close(f->fd);
        free(f);
    }
    while (c->writes) wfile_drop(c, &c->writes, 0);
    for (struct conn **pp = &g_conns; *pp; pp = &(*pp)->next)
        if (*pp == c) {
            *pp = c->next;
            break;
        }
    c->gnext = g_dead_conns; /* freed at the end of this loop iteration */
    g_dead_conns = c;
}

static void conn_update_events(struct conn *c) {
    uint32_t ev = EPOLLIN | (c->blocked ? EPOLLOUT : 0);
    watch_set(&c->w, ev);
}

static void conn_set_throttle(struct conn *c, int on) {
    c->throttled = on;
    for (struct exec *e = c->execs; e; e = e->next) exec_update_streams(e);
    if (!on) conn_pump_reads(c);
}

static void conn_check_throttle(struct conn *c) {
    size_t q = buf_pending(&c->out);
    if (!c->throttled && q > OUT_HIGH) conn_set_throttle(c, 1);
    else if (c->throttled && q < OUT_LOW) conn_set_throttle(c, 0);
}

/* Sends as much queued output as the socket takes; EPOLLOUT is watched while some is left. */
static void conn_flush(struct conn *c) {
    for (int round = 0;; round++) {
        c->blocked = 0;
        while (buf_pending(&c->out)) {
            ssize_t n = send(c->w.fd, c->out.d + c->out.off, buf_pending(&c->out),
                             MSG_NOSIGNAL | MSG_DONTWAIT);
            if (n > 0) c->out.off += (size_t)n;
            else if (n < 0 && errno == EINTR) continue;
            else if (n < 0 && errno == EAGAIN) {
                c->blocked = 1;
                break;
            } else {
                conn_close(c);
                return;
            }
        }
        conn_check_throttle(c); /* may refill the queue from pending file reads */
        if (c->blocked || !buf_pending(&c->out)) break;
        if (round == 3) { /* give other fds a turn; EPOLLOUT brings us back */
            c->blocked = 1;
            break;
        }
    }
    conn_update_events(c);
}

/* Parses and handles complete frames in the input buffer (not while stdin is backed up). */
static void conn_process(struct conn *c) {
    size_t pos = 0;
    while (!c->dead && c->in_len - pos >= 4) {
        uint32_t len = get32(c->in + pos);
        if (len < 5 || len > MAX_FRAME) {
            c->dead = -1;
            break;
        }
        if (c->in_len - pos < 4 + (size_t)len) {
            if (c->in_cap < 4 + (size_t)len) { /* make room for the whole frame */
                memmove(c->in, c->in + pos, c->in_len - pos);
                c->in_len -= pos, pos = 0;
                c->in_cap = 4 + (size_t)len;
                c->in = xrealloc(c->in, c->in_cap);
            }
            break;
        }
        const uint8_t *f = c->in + pos;
        pos += 4 + (size_t)len;
        handle_frame(c, f[4], get32(f + 5), f + HDR, len - 5);
    }
    if (c->dead < 0) { /* malformed frame */
        conn_close(c);
        return;
    }
    if (c->dead) return;
    memmove(c->in, c->in + pos, c->in_len - pos);
    c->in_len -= pos;
}

static void conn_read(struct conn *c) {
    if (c->in_len == c->in_cap) {
        conn_process(c);
        return;
    }
    ssize_t n = read(c->w.fd, c->in + c->in_len, c->in_cap - c->in_len);
    if (n > 0) {
        c->in_len += (size_t)n;
        conn_process(c);
    } else if (n == 0 || (errno != EAGAIN && errno != EINTR)) {
        conn_close(c);
    }
}

static void accept_conns(void) {
    for (int i = 0; i < 16; i++) {
        int fd = accept4(g_listen.fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno == EMFILE || errno == ENFILE || errno == ENOBUFS || errno == ENOMEM) {
                watch_set(&g_listen, 0); /* out of fds: retry in a while instead of spinning */
                g_listen_resume = now_mono() + NS / 10;
            }
            return;
        }
        struct conn *c = xrealloc(NULL, sizeof *c);
        memset(c, 0, sizeof *c);
        watch_init(&c->w, fd, W_CONN, c);
        c->in_cap = 65536;
        c->in = xrealloc(NULL, c->in_cap);
        c->next = g_conns;
        g_conns = c;
        uint8_t hello[8];
        put32(hello, PROTOCOL_VERSION);
        put32(hello + 4, (uint32_t)getpid());
        send_frame(c, F_HELLO, 0, hello, 8);
        conn_update_events(c);
    }
}

/* ---- Event loop ------------------------------------------------------------------------ */

static void reap_children(void) {
    for (;;) {
        int st;
        struct rusage ru;
        pid_t pid = wait4(-1, &st, WNOHANG, &ru);
        if (pid <= 0) return;
        if (pid == g_main.pid) {
            g_main.reaped = 1, g_main.status = st, g_main.end_real = now_real();
            if (g_main.w_out.fd >= 0 || g_main.w_err.fd >= 0)
                g_main.linger = now_mono() + LINGER_NS; /* output held open by a daemon */
            main_maybe_exit();
            continue;
        }
        struct exec *e = exec_by_pid(pid); /* anything else is an orphan: reaped, forgotten */
        if (!e) continue;
        e->reaped = 1, e->status = st, e->ru = ru, e->t_end = now_mono(), e->deadline = 0;
        if (!e->running) exec_check_start(e, 1);
        else exec_maybe_finish(e);
    }
}

/* SIGTERM and SIGINT end the sandbox like TERMINATE. Sent from inside the sandbox (possible:
 * the sender is the same uid), the end is recorded as such ("signal:SIG:PID" in the exit record)
 * instead of passing for a clean exit. "Inside" is told by the sender's pid, as seen from our pid
 * namespace: a kill() from the host shows pid 0. Anything but a kill()/sigqueue()/tgkill() (e.g.
 * an F_SETSIG I/O signal a process aimed at us) also counts as inside. Run outside a pid
 * namespace of its own (getpid() != 1, as in tests), every signal counts as outside. */
static void handle_signals(void) {
    struct signalfd_siginfo si;
    while (read(g_sig.fd, &si, sizeof si) == (ssize_t)sizeof si) {
        if (si.ssi_signo == SIGCHLD) {
            reap_children();
            continue;
        }
        int by_kill = si.ssi_code == SI_USER || si.ssi_code == SI_QUEUE || si.ssi_code == SI_TKILL;
        int inside = getpid() == 1 && !(by_kill && si.ssi_pid == 0);
        if (inside && !g_end_reason[0])
            snprintf(g_end_reason, sizeof g_end_reason, "signal:%u:%u", si.ssi_signo, si.ssi_pid);
        terminate((int)si.ssi_signo, inside);
    }
}

/* Timeouts and linger ends. Returns the epoll_wait timeout until the next deadline (ms). */
static int handle_deadlines(void) {
    uint64_t now = now_mono(), next = UINT64_MAX;
    if (g_listen_resume) {
        if (now >= g_listen_resume) g_listen_resume = 0, watch_set(&g_listen, EPOLLIN);
        else next = g_listen_resume;
    }
    if (g_main.linger) {
        if (now >= g_main.linger) {
            watch_close(&g_main.w_out), watch_close(&g_main.w_err);
            main_maybe_exit();
        }
        if (g_main.linger < next) next = g_main.linger;
    }
    if (g_deadline.at && !g_deadline.kill_mono) { /* the sandbox's own deadline (wall clock) */
        uint64_t real = now_real();
        if (real >= g_deadline.at) {
            snprintf(g_end_reason, sizeof g_end_reason, "deadline:%s", g_deadline.why);
            g_deadline.kill_mono = now + g_deadline.grace_ns;
            if (!g_deadline.kill_mono) g_deadline.kill_mono = 1;
            terminate(SIGTERM, 0);
        } else { /* re-checked at least every minute, so a clock step is noticed */
            uint64_t at = now + (g_deadline.at - real);
            if (at < next) next = at;
        }
    }
    if (g_deadline.kill_mono) {
        if (now >= g_deadline.kill_mono) supervisor_exit(128 + SIGKILL, SIGKILL, now_real());
        if (g_deadline.kill_mono < next) next = g_deadline.kill_mono;
    }
    for (struct conn *c = g_conns; c; c = c->next) {
        for (struct exec *e = c->execs, *nx; e; e = nx) {
            nx = e->next;
            if (e->deadline && now >= e->deadline) { /* timeout: kill, then report timed_out */
                e->deadline = 0;
                e->timed_out = 1;
                exec_kill_tree(e);
            }
            if (e->linger && now >= e->linger) {
                exec_drain_and_finish(e);
                continue;
            }
            if (e->deadline && e->deadline < next) next = e->deadline;
            if (e->linger && e->linger < next) next = e->linger;
        }
    }
    if (next == UINT64_MAX) return -1;
    uint64_t ms = (next - now + 999999) / 1000000;
    return ms > 60000 ? 60000 : (int)ms;
}

static void dispatch(struct watch *w, uint32_t ev) {
    if (w->fd < 0) return; /* closed earlier in this batch */
    switch (w->kind) {
    case W_LISTEN: accept_conns(); break;
    case W_SIGNAL: handle_signals(); break;
    case W_CONN: {
        struct conn *c = w->obj;
        if (ev & EPOLLOUT) conn_flush(c);
        if (c->dead) break;
        if (ev & (EPOLLIN | EPOLLHUP | EPOLLERR)) conn_read(c);
        break;
    }
    case W_OUT:
    case W_ERR: exec_read_stream(w->obj, w); break;
    case W_START: exec_check_start(w->obj, 0); break;
    case W_STDIN: exec_flush_stdin(w->obj); break;
    case W_MAIN_OUT:
    case W_MAIN_ERR: main_read(w); break;
    }
}

static void loop(void) {
    struct epoll_event evs[64];
    for (;;) {
        int timeout = handle_deadlines();
        for (struct conn *c = g_conns, *nx; c; c = nx) { /* send what this round produced */
            nx = c->next;
            if (buf_pending(&c->out) && !c->blocked) conn_flush(c);
        }
        while (g_dead_conns) {
            struct conn *c = g_dead_conns;
            g_dead_conns = c->gnext;
            buf_free(&c->out);
            free(c->in);
            free(c);
        }
        while (g_dead_execs) {
            struct exec *e = g_dead_execs;
            g_dead_execs = e->gnext;
            free(e);
        }
        int n = epoll_wait(g_ep, evs, 64, timeout);
        if (n < 0 && errno != EINTR) die("epoll_wait: %s", strerror(errno));
        for (int i = 0; i < n; i++) dispatch(evs[i].data.ptr, evs[i].events);
    }
}

/* ---- Launcher mode (host side, before bubblewrap) -------------------------------------- */

static int launch(int argc, char **argv) {
    int i = 2;
    unsigned long ns_base = 0, ns_count = 0;
    char *stage_from = NULL, *stage_at = NULL;
    for (; i < argc && strcmp(argv[i], "--"); i++) {
        if (!strcmp(argv[i], "--userns") && i + 1 < argc) {
            char *end;
            ns_base = strtoul(argv[++i], &end, 10);
            if (*end != ':' || !(ns_count = strtoul(end + 1, &end, 10)) || *end)
                die("--userns: expected BASE:COUNT, got '%s'", argv[i]);
            continue;
        }
        if (!strcmp(argv[i], "--stage") && i + 1 < argc) {
            stage_from = argv[++i];
            char *colon = strrchr(stage_from, ':');
            if (!colon || colon == stage_from || !colon[1])
                die("--stage: expected FROM:AT, got '%s'", stage_from);
            *colon = 0, stage_at = colon + 1;
            continue;
        }
        if (!strcmp(argv[i], "--cgroup-procs") && i + 1 < argc) {
            if (write_number_file(argv[++i], (long)getpid()) < 0)
                die("cannot join cgroup via %s: %s", argv[i], strerror(errno));
        } else if (!strcmp(argv[i], "--oom-score-adj") && i + 1 < argc) {
            char *end;
            long v = strtol(argv[++i], &end, 10);
            if (*end || write_number_file("/proc/self/oom_score_adj", v) < 0)
                die("cannot set oom_score_adj to %s: %s", argv[i], strerror(errno));
        } else {
            die("--launch: unknown or incomplete option '%s'", argv[i]);
        }
    }
    if (i + 1 >= argc) die("--launch: missing '-- PROG ARGS...'");
    setsid(); /* EPERM if already a group leader: fine */
    char **prog = argv + i + 1;
    if (ns_count) {
        /* The program is opened now: as the namespace's root, host paths that only host root
         * may search (a venv under /root) are out of reach. */
        int fd = open(prog[0], O_PATH | O_CLOEXEC);
        if (fd < 0) die("cannot open %s: %s", prog[0], strerror(errno));
        if (priv_enter_userns(ns_base, ns_count, stage_from, stage_at) < 0) return 125;
        syscall(SYS_execveat, fd, "", prog, environ, AT_EMPTY_PATH);
        fprintf(stderr, "aviato-supervisor: cannot execute %s: %s\n", prog[0], strerror(errno));
        return 127;
    }
    if (strchr(prog[0], '/')) execv(prog[0], prog);
    else execvp(prog[0], prog);
    fprintf(stderr, "aviato-supervisor: cannot execute %s: %s\n", prog[0], strerror(errno));
    return 127;
}

/* ---- Start-up ------------------------------------------------------------------------- */

static int fd_valid(int fd) { return fcntl(fd, F_GETFD) >= 0; }

/* Whatever else was inherited (bubblewrap passes on every open fd) must not reach commands. */
static void cloexec_from(int low) {
#if defined(SYS_close_range)
    if (syscall(SYS_close_range, (unsigned)low, ~0u, 4u /* CLOSE_RANGE_CLOEXEC */) == 0) return;
#endif
    DIR *d = opendir("/proc/self/fd");
    struct dirent *de;
    while (d && (de = readdir(d)))
        if (atoi(de->d_name) >= low && atoi(de->d_name) != dirfd(d))
            fcntl(atoi(de->d_name), F_SETFD, FD_CLOEXEC);
    if (d) closedir(d);
}

int main(int argc, char **argv) {
    if (argc >= 2 && !strcmp(argv[1], "--launch")) return launch(argc, argv);
    if (argc >= 2 && !strcmp(argv[1], "--version")) {
        printf("aviato-supervisor protocol %d\n", PROTOCOL_VERSION);
        return 0;
    }
    char **main_argv = NULL;
    int a = 1;
    g_user.protected_id = 65536;
    for (; a + 1 < argc; a += 2) { /* privileged mode: --user UID:GID [--protected-id N] */
        char *end;
        if (!strcmp(argv[a], "--user")) {
            g_user.uid = (uid_t)strtoul(argv[a + 1], &end, 10);
            if (*end != ':') break;
            g_user.gid = (gid_t)strtoul(end + 1, &end, 10);
            if (*end) break;
            g_privileged = 1;
        } else if (!strcmp(argv[a], "--protected-id")) {
            g_user.protected_id = (uid_t)strtoul(argv[a + 1], &end, 10);
            if (*end) break;
        } else {
            break;
        }
    }
    if (argc == a + 1 && !strcmp(argv[a], "--keepalive")) g_keepalive = 1;
    else if (argc >= a + 2 && !strcmp(argv[a], "--")) main_argv = argv + a + 1;
    else {
        fprintf(stderr, "usage: aviato-supervisor [--user UID:GID [--protected-id N]] "
                        "[--keepalive | -- ARGV...]\n"
                        "       aviato-supervisor --launch [--cgroup-procs FILE]... "
                        "[--oom-score-adj N] [--userns BASE:COUNT [--stage FROM:AT]] "
                        "-- PROG ARGS...\n");
        return 2;
    }

    /* fds 0-2 must exist so that pipes never land on them. */
    for (int fd = 0; fd < 3; fd++)
        if (!fd_valid(fd) && open("/dev/null", O_RDWR) != fd) die("cannot open /dev/null");
    /* Inherited descriptors: 3 control socket, 4 main log, 5 exit file. */
    int acc = 0;
    socklen_t sl = sizeof acc;
    if (getsockopt(3, SOL_SOCKET, SO_ACCEPTCONN, &acc, &sl) == 0 && acc) g_listen.fd = 3;
    else fprintf(stderr, "aviato-supervisor: no listening control socket on fd 3\n");
    if (fd_valid(4)) {
        struct stat st;
        g_log_fd = 4;
        if (fstat(4, &st) == 0 && S_ISREG(st.st_mode)) g_log_size = (uint64_t)st.st_size;
    }
    if (fd_valid(5)) g_exit_fd = 5;
    cloexec_from(3);
    remember_own_files();
    uint32_t seed; /* marks unique to this supervisor, also where it is not alone in /proc */
    if (getrandom(&seed, sizeof seed, GRND_NONBLOCK) != (ssize_t)sizeof seed)
        seed = (uint32_t)getpid() ^ (uint32_t)now_real();
    g_mark_next = (uint64_t)(seed & 0x3fffffff) << 24;

    prctl(PR_SET_DUMPABLE, 0, 0, 0, 0);
    if (g_privileged && priv_supervisor_init(&g_user) < 0)
        die("cannot set up the sandbox's credentials: %s", strerror(errno));
    prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0); /* already implied as PID 1; for other uses */
    for (int sig = 1; sig < NSIG; sig++) /* ignored signals would be inherited by commands */
        if (sig != SIGKILL && sig != SIGSTOP) signal(sig, SIG_DFL);
    signal(SIGPIPE, SIG_IGN);
    sigset_t mask;
    sigemptyset(&mask);
    sigaddset(&mask, SIGCHLD);
    sigaddset(&mask, SIGTERM);
    sigaddset(&mask, SIGINT);
    sigprocmask(SIG_SETMASK, &mask, NULL);

    if ((g_ep = epoll_create1(EPOLL_CLOEXEC)) < 0) die("epoll_create1: %s", strerror(errno));
    if ((g_sig.fd = signalfd(-1, &mask, SFD_NONBLOCK | SFD_CLOEXEC)) < 0)
        die("signalfd: %s", strerror(errno));
    watch_set(&g_sig, EPOLLIN);
    if (g_listen.fd >= 0) {
        set_nonblock(g_listen.fd);
        watch_set(&g_listen, EPOLLIN);
    }
    if (main_argv) main_start(main_argv);
    loop();
    return 0;
}
