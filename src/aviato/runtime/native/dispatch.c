/* The top of a connection's life: reading its input, cutting it into frames and handing each to
 * its handler (handle_frame: exec.c, files.c, main_process.c, ports.c, egress.c); flushing its
 * output queue; and closing it, which reaches every handler (its execs are killed, its
 * transfers and port connects dropped). Flushing is here because a failed send closes the connection; it also sends the
 * descriptors queued to ride on frames (conn_queue_fd). The loop calls conn_read and conn_flush;
 * nothing below calls back up here. */
#define _GNU_SOURCE
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <unistd.h>

#include "supervisor.h"

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
    case F_CONNECT_PORT: do_connect_port(c, id, &r); break;
    case F_EGRESS_LISTEN: do_egress_listen(c, id, &r); break;
    case F_FS_OP: do_fs_op(c, id, &r); break;
    case F_READ_AT: do_read_at(c, id, &r); break;
    case F_WRITE_AT: do_write_at(c, id, &r); break;
    case F_OPEN_FILE: do_open_file(c, id, &r); break;
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
    while (c->ports) port_drop(c, &c->ports);
    conn_drop_fds(c);
    for (struct conn **pp = &g_conns; *pp; pp = &(*pp)->next)
        if (*pp == c) {
            *pp = c->next;
            break;
        }
    c->gnext = g_dead_conns; /* freed at the end of this loop iteration */
    g_dead_conns = c;
}

/* Sends as much queued output as the socket takes; EPOLLOUT is watched while some is left. A
 * queued descriptor goes with the first byte of its frame (the bytes before it are sent
 * without), and is closed here once sent. */
void conn_flush(struct conn *c) {
    for (int round = 0;; round++) {
        c->blocked = 0;
        while (buf_pending(&c->out)) {
            size_t want = buf_pending(&c->out);
            int fd = -1;
            if (c->npass) {
                uint64_t before = c->pass[0].at - c->out_sent; /* bytes ahead of its frame */
                if (!before) fd = c->pass[0].fd;
                else if (before < want) want = (size_t)before;
            }
            const uint8_t *p = c->out.d + c->out.off;
            ssize_t n = fd < 0 ? send(c->w.fd, p, want, MSG_NOSIGNAL | MSG_DONTWAIT)
                               : send_with_fd(c->w.fd, p, want, fd);
            if (n > 0) {
                c->out.off += (size_t)n;
                c->out_sent += (uint64_t)n;
                if (fd >= 0) { /* the peer has it now */
                    close(fd);
                    memmove(c->pass, c->pass + 1, --c->npass * sizeof c->pass[0]);
                }
            } else if (n < 0 && errno == EINTR) continue;
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

void conn_read(struct conn *c) {
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
