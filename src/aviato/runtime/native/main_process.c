/* The sandbox's main process: starting it, logging its output to the main log (fd 4), the
 * sandbox's deadline, TERMINATE and signals, and the supervisor's own exit with its exit record
 * (fd 5). */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include "supervisor.h"

int g_log_fd = -1, g_exit_fd = -1;
uint64_t g_log_size;
static int g_log_stopped;
int g_keepalive;
struct sandbox_deadline g_deadline;
char g_end_reason[64];
struct main_process g_main = {0, 0, 0, 0, 0, {-1, 0, W_MAIN_OUT, NULL}, {-1, 0, W_MAIN_ERR, NULL}};

/* Writes the exit record (with g_end_reason as its 4th field when set) and exits; as PID 1 of
 * the pid namespace, that kills every other process of the sandbox. */
void supervisor_exit(int code, int sig, uint64_t when) {
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

void main_maybe_exit(void) {
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
        rec = r2, stream = LOG_STDERR, n = sizeof note - 1;
    }
    put64(rec, now_real());
    rec[8] = (uint8_t)stream;
    put32(rec + 9, (uint32_t)n);
    if (write_all(g_log_fd, rec, LOG_HDR + n) == 0) g_log_size += LOG_HDR + n;
}

void main_read(struct watch *w) {
    static uint8_t rec[LOG_HDR + PIPE_CHUNK];
    ssize_t n = read(w->fd, rec + LOG_HDR, PIPE_CHUNK);
    if (n > 0) {
        log_record(rec, w->kind == W_MAIN_OUT ? LOG_STDOUT : LOG_STDERR, (size_t)n);
    } else if (n == 0 || (errno != EAGAIN && errno != EINTR)) {
        watch_close(w);
        main_maybe_exit();
    }
}

void main_start(char **argv) {
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
void terminate(int sig, int from_inside) {
    if (g_keepalive) supervisor_exit(from_inside ? 128 + sig : 0, from_inside ? sig : 0, now_real());
    if (g_main.pid > 0 && !g_main.reaped && kill(-g_main.pid, sig) < 0) kill(g_main.pid, sig);
}

/* DEADLINE: u64 unix_ns (0: none) | u32 grace_ms | str why ([a-z0-9_-], at most 31 bytes).
 * Replaces the previous deadline; one that has begun (SIGTERM sent) runs its course. */
void do_deadline(struct rd *r) {
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
