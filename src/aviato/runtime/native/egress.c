/* EGRESS_LISTEN: the sandbox's egress listening socket, handed to the service (SCM_RIGHTS on
 * EGRESS_LISTENER) so that the service accepts on it and serves the sandbox's HTTP(S) proxy.
 *
 * The socket is made once (the first EGRESS_LISTEN, or `--egress` at start-up): TCP on
 * 127.0.0.1 with an ephemeral port (the kernel picks one nobody in the sandbox uses, so it never
 * conflicts with a user's server), backlog EGRESS_BACKLOG. The supervisor keeps it for the rest
 * of its life and never accepts on it; every EGRESS_LISTEN sends a duplicate of the same socket,
 * so a service that restarts and asks again gets the same port, and connections made while no
 * service held it wait in its backlog. At the same moment the supervisor writes the proxy's
 * address into its own environment (setenv): every process it starts from then on (commands
 * merge their env over it; see exec.c) finds HTTP_PROXY, HTTPS_PROXY, http_proxy and
 * https_proxy = http://127.0.0.1:PORT, and NO_PROXY and no_proxy = localhost,127.0.0.1,::1
 * unless the sandbox's environment set them already. Processes already running keep the
 * environment they started with: that is why `--egress` opens it before the main process starts.
 *
 * What this cannot do: make a program use the proxy. A program that ignores the variables and
 * connects by itself still gets ENETUNREACH (the sandbox's network namespace has loopback only).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "supervisor.h"

static int g_egress_fd = -1;      /* the listening socket, kept for the supervisor's life */
static uint16_t g_egress_port;

/* The variables that point programs at the proxy (always set), and those that keep loopback
 * off it (set only where the sandbox's environment has none of its own). */
static const char *const PROXY_VARS[] = {"HTTP_PROXY", "HTTPS_PROXY", "http_proxy",
                                         "https_proxy"};
static const char *const NO_PROXY_VARS[] = {"NO_PROXY", "no_proxy"};
#define NO_PROXY_VALUE "localhost,127.0.0.1,::1"

static int export_proxy(uint16_t port) {
    char url[40];
    snprintf(url, sizeof url, "http://127.0.0.1:%u", (unsigned)port);
    for (size_t i = 0; i < sizeof PROXY_VARS / sizeof PROXY_VARS[0]; i++)
        if (setenv(PROXY_VARS[i], url, 1) < 0) return errno;
    for (size_t i = 0; i < sizeof NO_PROXY_VARS / sizeof NO_PROXY_VARS[0]; i++)
        if (setenv(NO_PROXY_VARS[i], NO_PROXY_VALUE, 0) < 0) return errno;
    return 0;
}

/* Makes the listening socket and exports the proxy variables, once; later calls do nothing.
 * Returns 0 or the errno of a failure: the socket is not kept and a later call tries again (a
 * setenv that failed, ENOMEM only, may have left some variables naming a closed port: a
 * connection to it is refused at once). */
int egress_open(void) {
    if (g_egress_fd >= 0) return 0;
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (fd < 0) return errno;
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = 0};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t len = sizeof a;
    int err = 0;
    if (bind(fd, (struct sockaddr *)&a, sizeof a) < 0 || listen(fd, EGRESS_BACKLOG) < 0 ||
        getsockname(fd, (struct sockaddr *)&a, &len) < 0)
        err = errno;
    else
        err = export_proxy(ntohs(a.sin_port));
    if (err) {
        close(fd);
        return err;
    }
    g_egress_fd = fd;
    g_egress_port = ntohs(a.sin_port);
    return 0;
}

/* EGRESS_LISTEN: empty. Replies EGRESS_LISTENER (u16 port) with a duplicate of the listening
 * socket riding on it, or ERROR. */
void do_egress_listen(struct conn *c, uint32_t id, struct rd *r) {
    if (r->n) { /* the frame has no body: anything else is malformed */
        r->bad = 1;
        return;
    }
    if (id_in_use(c, id)) {
        send_error(c, id, EEXIST, "id %u is in use", id);
        return;
    }
    int err = egress_open();
    if (err) {
        send_error(c, id, err, "cannot open the sandbox's egress listener: %s", strerror(err));
        return;
    }
    int fd = fcntl(g_egress_fd, F_DUPFD_CLOEXEC, 3);
    if (fd < 0) {
        send_error(c, id, errno, "cannot hand over the sandbox's egress listener: %s",
                   strerror(errno));
        return;
    }
    if (conn_queue_fd(c, fd) < 0) { /* PORT_CONNECTS_MAX descriptors already queued here */
        close(fd);
        send_error(c, id, EAGAIN, "too many descriptors waiting to be sent on this control "
                   "connection (at most %d)", PORT_CONNECTS_MAX);
        return;
    }
    uint8_t port[EGRESS_LISTENER_SIZE] = {(uint8_t)g_egress_port, (uint8_t)(g_egress_port >> 8)};
    send_frame(c, F_EGRESS_LISTENER, id, port, sizeof port);
}
