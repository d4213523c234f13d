/* Small helpers of the supervisor: fatal errors, memory, clocks, descriptors, epoll watches and
 * byte queues. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#include "supervisor.h"

int g_ep = -1; /* the epoll set of every watch */

void die(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fputs("aviato-supervisor: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    _exit(125);
}

void *xrealloc(void *p, size_t n) {
    void *q = realloc(p, n ? n : 1);
    if (!q) die("out of memory");
    return q;
}

uint64_t clock_ns(clockid_t id) {
    struct timespec ts;
    clock_gettime(id, &ts);
    return (uint64_t)ts.tv_sec * NS + (uint64_t)ts.tv_nsec;
}
int set_nonblock(int fd) {
    int fl = fcntl(fd, F_GETFL);
    return fl < 0 ? -1 : fcntl(fd, F_SETFL, fl | O_NONBLOCK);
}

int write_all(int fd, const void *p, size_t n) {
    const uint8_t *b = p;
    while (n > 0) {
        ssize_t w = write(fd, b, n);
        if (w < 0 && errno == EINTR) continue;
        if (w == 0) errno = EIO; /* no progress and no error: never a stale errno */
        if (w <= 0) return -1;
        b += w;
        n -= (size_t)w;
    }
    return 0;
}

/* Writes a decimal number to a file such as cgroup.procs or /proc/self/oom_score_adj. */
int write_number_file(const char *path, long v) {
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

/* send() of n bytes with `fd` attached (SCM_RIGHTS: the peer receives a descriptor of the same
 * open file, with the first byte sent). Never blocks, never raises SIGPIPE. */
ssize_t send_with_fd(int sock, const void *p, size_t n, int fd) {
    union { struct cmsghdr h; char room[CMSG_SPACE(sizeof(int))]; } ctl;
    memset(&ctl, 0, sizeof ctl);
    struct iovec iov = {.iov_base = (void *)p, .iov_len = n};
    struct msghdr m = {.msg_iov = &iov, .msg_iovlen = 1,
                       .msg_control = ctl.room, .msg_controllen = sizeof ctl.room};
    struct cmsghdr *h = CMSG_FIRSTHDR(&m);
    h->cmsg_level = SOL_SOCKET;
    h->cmsg_type = SCM_RIGHTS;
    h->cmsg_len = CMSG_LEN(sizeof(int));
    memcpy(CMSG_DATA(h), &fd, sizeof(int));
    return sendmsg(sock, &m, MSG_NOSIGNAL | MSG_DONTWAIT);
}

/* epoll registration: add, modify or remove so that `ev` is what is watched. */
void watch_set(struct watch *w, uint32_t ev) {
    if (w->fd < 0 || w->events == ev) return;
    struct epoll_event e = {.events = ev, .data.ptr = w};
    int op = !w->events ? EPOLL_CTL_ADD : !ev ? EPOLL_CTL_DEL : EPOLL_CTL_MOD;
    if (epoll_ctl(g_ep, op, w->fd, &e) < 0) die("epoll_ctl: %s", strerror(errno));
    w->events = ev;
}

/* Unregister (before close: a forked child may still hold the same open file) and close. */
void watch_close(struct watch *w) {
    if (w->fd < 0) return;
    watch_set(w, 0);
    close(w->fd);
    w->fd = -1;
}

void watch_init(struct watch *w, int fd, enum wkind kind, void *obj) {
    w->fd = fd;
    w->events = 0;
    w->kind = kind;
    w->obj = obj;
}

uint8_t *buf_reserve(struct buf *b, size_t n) {
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

void buf_free(struct buf *b) {
    free(b->d);
    memset(b, 0, sizeof *b);
}
