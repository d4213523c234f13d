/* CONNECT_PORT: a TCP connection to a port of the sandbox's own loopback, handed to the service
 * as a descriptor riding on PORT_CONNECTED (SCM_RIGHTS), so that the service relays the bytes
 * and the supervisor never touches them.
 *
 * The frame names a port and nothing else: the address is always 127.0.0.1, then ::1 when
 * 127.0.0.1 refuses (a server bound to ::1 only), and the supervisor lives in the sandbox's
 * network namespace, whose loopback is the sandbox's own; nothing outside the sandbox can be
 * reached this way. connect() never blocks the loop: a refusal comes back at once, and a connect
 * that has not completed PORT_CONNECT_TIMEOUT_MS after the frame (a listener whose backlog is
 * full drops the handshake) fails with ETIMEDOUT. The supervisor closes its copy of the socket
 * once the frame carrying it has been sent. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#include "supervisor.h"

struct port_connect *g_dead_ports; /* dropped in this loop iteration; freed by the loop */

/* Starts a non-blocking connect of a new socket to the port on the current address. Returns 0
 * (in progress or done: EPOLLOUT on p->w tells) or the errno of a failure (no socket left). */
static int port_start(struct port_connect *p) {
    int fd = socket(p->ipv6 ? AF_INET6 : AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) return errno;
    struct sockaddr_in v4 = {.sin_family = AF_INET, .sin_port = htons(p->port)};
    struct sockaddr_in6 v6 = {.sin6_family = AF_INET6, .sin6_port = htons(p->port)};
    v4.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    v6.sin6_addr = in6addr_loopback;
    int r = p->ipv6 ? connect(fd, (struct sockaddr *)&v6, sizeof v6)
                    : connect(fd, (struct sockaddr *)&v4, sizeof v4);
    if (r < 0 && errno != EINPROGRESS) {
        int err = errno;
        close(fd);
        return err;
    }
    watch_init(&p->w, fd, W_PORT, p);
    watch_set(&p->w, EPOLLOUT);
    return 0;
}

/* Forgets a port connect (closing its socket, if it still holds one). */
void port_drop(struct conn *c, struct port_connect **pp) {
    struct port_connect *p = *pp;
    *pp = p->next;
    c->nports--;
    watch_close(&p->w);
    p->next = g_dead_ports; /* a later event of this batch may still name its watch */
    g_dead_ports = p;
}

static void port_fail(struct conn *c, struct port_connect **pp, int err) {
    unsigned port = (*pp)->port;
    if (err == ECONNREFUSED)
        send_error(c, (*pp)->id, err, "nothing listens on port %u in the sandbox "
                   "(127.0.0.1 and ::1 refused the connection)", port);
    else if (err == ETIMEDOUT)
        send_error(c, (*pp)->id, err, "port %u in the sandbox did not accept the connection "
                   "within %u seconds", port, PORT_CONNECT_TIMEOUT_MS / 1000);
    else
        send_error(c, (*pp)->id, err, "cannot connect to port %u in the sandbox: %s", port,
                   strerror(err));
    port_drop(c, pp);
}

/* The connected socket goes to the service: queued to ride on PORT_CONNECTED, and closed here
 * once that frame is sent (conn_flush). */
static void port_hand_over(struct conn *c, struct port_connect **pp) {
    struct port_connect *p = *pp;
    int fd = p->w.fd;
    watch_set(&p->w, 0);
    p->w.fd = -1;
    if (conn_queue_fd(c, fd) < 0) { /* cannot happen: do_connect_port counted it */
        close(fd);
        port_fail(c, pp, EAGAIN);
        return;
    }
    send_frame(c, F_PORT_CONNECTED, p->id, NULL, 0);
    port_drop(c, pp);
}

/* The current attempt ended with `err` (0: connected). 127.0.0.1 refused: ::1 is tried; ::1
 * refused or absent: nothing listens. */
static void port_attempt_done(struct conn *c, struct port_connect **pp, int err) {
    struct port_connect *p = *pp;
    if (!err) {
        port_hand_over(c, pp);
        return;
    }
    if (err == ECONNREFUSED && !p->ipv6) {
        watch_close(&p->w);
        p->ipv6 = 1;
        err = port_start(p);
        if (!err) return;
    }
    if (p->ipv6 && (err == ECONNREFUSED || err == EADDRNOTAVAIL || err == EAFNOSUPPORT ||
                    err == ENETUNREACH || err == EHOSTUNREACH))
        err = ECONNREFUSED; /* as 127.0.0.1 said */
    port_fail(c, pp, err);
}

/* CONNECT_PORT: u16 port. */
void do_connect_port(struct conn *c, uint32_t id, struct rd *r) {
    uint16_t port = rd_u16(r);
    if (r->bad) return;
    if (id_in_use(c, id)) {
        send_error(c, id, EEXIST, "id %u is in use", id);
        return;
    }
    if (port == 0) {
        send_error(c, id, EINVAL, "port 0 is not a port to connect to (ports are 1 to 65535)");
        return;
    }
    if (c->nports + c->npass >= PORT_CONNECTS_MAX) {
        send_error(c, id, EAGAIN, "too many port connections in progress on this control "
                   "connection (at most %d)", PORT_CONNECTS_MAX);
        return;
    }
    struct port_connect *p = xrealloc(NULL, sizeof *p);
    memset(p, 0, sizeof *p);
    p->id = id;
    p->port = port;
    p->c = c;
    p->w.fd = -1;
    p->deadline = now_mono() + (uint64_t)PORT_CONNECT_TIMEOUT_MS * 1000000;
    p->next = c->ports;
    c->ports = p;
    c->nports++;
    int err = port_start(p);
    if (err) port_attempt_done(c, &c->ports, err);
}

/* EPOLLOUT (or an error) on a connecting socket: the connect has finished, one way or the
 * other. */
void port_connect_ready(struct port_connect *p) {
    int err = 0;
    socklen_t len = sizeof err;
    if (getsockopt(p->w.fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0) err = errno;
    if (err == EINPROGRESS || err == EALREADY) return; /* not finished after all */
    port_attempt_done(p->c, port_find(p->c, p->id), err);
}

/* Fails the connects of `c` whose time is up; returns the next deadline (UINT64_MAX: none). */
uint64_t port_check_timeouts(struct conn *c, uint64_t now) {
    uint64_t next = UINT64_MAX;
    for (struct port_connect **pp = &c->ports; *pp;) {
        if (now >= (*pp)->deadline) {
            port_fail(c, pp, ETIMEDOUT); /* unlinks *pp: the next one is now at pp */
            continue;
        }
        if ((*pp)->deadline < next) next = (*pp)->deadline;
        pp = &(*pp)->next;
    }
    return next;
}
