/* Service connections, the layer under the frame handlers: accepting them (each gets
 * HELLO), their epoll interest, and their output's pace: throttling while the output queue is
 * full, which pauses the producers that fill it (command pipes, pending file reads) and resumes
 * them. It calls no handler: reading, dispatching and closing a connection are dispatch.c's. */
#define _GNU_SOURCE
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#include "supervisor.h"

struct conn *g_conns, *g_dead_conns;
struct watch g_listen = {-1, 0, W_LISTEN, NULL};
uint64_t g_listen_resume;

/* ---- Connections ----------------------------------------------------------------------- */

void conn_update_events(struct conn *c) {
    uint32_t ev = EPOLLIN | (c->blocked ? EPOLLOUT : 0);
    watch_set(&c->w, ev);
}

static void conn_set_throttle(struct conn *c, int on) {
    c->throttled = on;
    for (struct exec *e = c->execs; e; e = e->next) exec_update_streams(e);
    if (!on) conn_pump_reads(c);
}

void conn_check_throttle(struct conn *c) {
    size_t q = buf_pending(&c->out);
    if (!c->throttled && q > OUT_HIGH) conn_set_throttle(c, 1);
    else if (c->throttled && q < OUT_LOW) conn_set_throttle(c, 0);
}

/* ---- What the throttle paces ------------------------------------------------------------ */

/* Pipes are read while the command runs, its output window has room and the socket keeps up. */
void exec_update_streams(struct exec *e) {
    uint32_t ev = (e->running && !e->c->throttled && e->unacked < OUT_WINDOW) ? EPOLLIN : 0;
    watch_set(&e->w_out, ev);
    watch_set(&e->w_err, ev);
}

/* Streams pending file reads into the output queue: each read while its window has room (the
 * service credits what it consumed), all of them until the socket's queue is full. */
void conn_pump_reads(struct conn *c) {
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

/* ---- Descriptors that ride on frames ----------------------------------------------------- */

/* Queues `fd` to be sent with the next frame queued on `c` (call it just before queueing that
 * frame); conn_flush sends it with that frame's first byte and closes it. Returns -1 (fd not
 * taken) when PORT_CONNECTS_MAX are queued already. */
int conn_queue_fd(struct conn *c, int fd) {
    if (c->npass >= PORT_CONNECTS_MAX) return -1;
    c->pass[c->npass].at = c->out_sent + buf_pending(&c->out);
    c->pass[c->npass++].fd = fd;
    return 0;
}

/* Closes the descriptors still queued (the connection is closing). */
void conn_drop_fds(struct conn *c) {
    while (c->npass) close(c->pass[--c->npass].fd);
}

/* ---- Accepting --------------------------------------------------------------------------- */

void accept_conns(void) {
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
        uint8_t hello[HELLO_SIZE];
        put32(hello, PROTOCOL_VERSION);
        put32(hello + 4, (uint32_t)getpid());
        send_frame(c, F_HELLO, 0, hello, HELLO_SIZE);
        conn_update_events(c);
    }
}
