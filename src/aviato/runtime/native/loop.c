/* The event loop: one epoll set for the listening socket, the signalfd, connections, command
 * pipes, the main process's pipes, connecting port sockets and the pipes of writes (files.c);
 * reaping children; exec timeouts, linger ends, port connect timeouts and the sandbox's
 * deadline as epoll_wait timeouts. */
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/signalfd.h>
#include <sys/wait.h>
#include <unistd.h>

#include "supervisor.h"

struct watch g_sig = {-1, 0, W_SIGNAL, NULL};

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
        uint64_t port_next = port_check_timeouts(c, now);
        if (port_next < next) next = port_next;
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
    case W_PORT: port_connect_ready(w->obj); break;
    case W_WRITE_PIPE: write_pipe_drain(w->obj); break;
    }
}

void loop(void) {
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
        while (g_dead_ports) {
            struct port_connect *p = g_dead_ports;
            g_dead_ports = p->next;
            free(p);
        }
        while (g_dead_wfiles) {
            struct wfile *f = g_dead_wfiles;
            g_dead_wfiles = f->gnext;
            free(f);
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
