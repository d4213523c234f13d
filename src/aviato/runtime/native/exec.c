/* One command (EXEC): its pipes or pty, its stdin queue and acknowledgements, its output and
 * output window, its start (STARTED or ERROR) and its end (EXIT). How the child process itself
 * is started is spawn.c's; its lineage mark and killing it are lineage.c's; pausing its pipes
 * while the connection is throttled is conn.c's; finding it by id is ids.c's. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/ioctl.h>
#include <sys/wait.h>
#include <termios.h>
#include <unistd.h>

#include "supervisor.h"

struct exec *g_dead_execs;

struct exec *exec_by_pid(pid_t pid) {
    for (struct conn *c = g_conns; c; c = c->next)
        for (struct exec *e = c->execs; e; e = e->next)
            if (e->pid == pid) return e;
    return NULL;
}

void exec_free(struct exec *e) {
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
void exec_flush_stdin(struct exec *e) {
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
void exec_stdin(struct exec *e, const uint8_t *p, size_t n) {
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
void exec_stdin_eof(struct exec *e) {
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
    uint8_t *d = frame_begin(e->c, EXIT_SIZE);
    put32(d, (uint32_t)code);
    put32(d + 4, (uint32_t)sig);
    d[8] = (uint8_t)e->timed_out;
    put64(d + 9, (uint64_t)e->ru.ru_utime.tv_sec * 1000000 + (uint64_t)e->ru.ru_utime.tv_usec);
    put64(d + 17, (uint64_t)e->ru.ru_stime.tv_sec * 1000000 + (uint64_t)e->ru.ru_stime.tv_usec);
    put64(d + 25, (uint64_t)e->ru.ru_maxrss * 1024);
    put64(d + 33, (e->t_end - e->t_start) / 1000);
    frame_end(e->c, F_EXIT, e->id, EXIT_SIZE);
}

/* The exec is complete when the process is reaped and its pipes reached EOF, or when it was
 * reaped LINGER_NS ago (a background process may keep the pipes open forever). */
void exec_maybe_finish(struct exec *e) {
    if (!e->reaped || !e->running) return;
    if (e->w_out.fd >= 0 || e->w_err.fd >= 0) {
        if (!e->linger) e->linger = now_mono() + LINGER_NS;
        return;
    }
    exec_send_exit(e);
    exec_free(e);
}

void exec_read_stream(struct exec *e, struct watch *w) {
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
void exec_drain_and_finish(struct exec *e) {
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
    uint8_t d[EXIT_SIZE] = {0};
    put32(d, err == ENOENT || err == ENOTDIR ? 127u : 126u);
    send_frame(e->c, F_EXIT, e->id, d, sizeof d);
}

/* The child's exec() succeeded (start pipe EOF) or failed (start pipe has {stage, errno}).
 * `force`: the child is already reaped, so an empty pipe means success. */
void exec_check_start(struct exec *e, int force) {
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
void do_exec(struct conn *c, uint32_t id, struct rd *r) {
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
