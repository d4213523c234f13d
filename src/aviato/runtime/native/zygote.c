/* `--zygote`: runs on the host beside the service, which started it with one end of a
 * SOCK_SEQPACKET socket pair on fd 3, and forks a launcher for each sandbox the service starts
 * (docs/internals/supervisor-protocol.md, "Command line").
 *
 * Why: a launcher the service spawns is a new execution of this static binary, and glibc's
 * start-up alone (its CPU feature and cache detection: `cpuid`, which traps to the hypervisor in
 * a virtual machine) took 0.67 ms here before the launcher's first system call; the service's
 * own posix_spawn took 0.39 ms more on its event loop. A fork of this small process costs a
 * fraction of both, and the child runs exactly the launcher a spawn would have (`launch`).
 * Built against musl, whose start-up takes ~0.06 ms, the binary gains nothing from a zygote
 * (spawning measured as fast or faster), and the service spawns its launchers (launch.py,
 * `launcher_for`).
 *
 * A request: one message holding the launcher's arguments (NUL-terminated strings: the argv a
 * spawn would have used, "--launch" included) and six descriptors: the control socket, main
 * log, exit file, seccomp filter, runtime log (stdout and stderr) and environment, which the
 * child puts at 3, 4, 5, 6, 1 and 2, and 7 (stdin is /dev/null). The answer: two int32, the
 * child's pid and 0, with a pidfd of the child attached (opened before anything could reap it,
 * so it names that process and no other); or 0 and an errno, with nothing attached. The child
 * starts with every signal at its default and none blocked, in the environment a spawn gives.
 * The zygote says "ready" once it runs (a binary without this mode never does, and the service
 * spawns its launchers itself). Until a launcher has joined its cgroups it dies with the
 * zygote (PR_SET_PDEATHSIG): a service that gave up on a zygote mid-request kills it, and the
 * create's abort kills what is in the sandbox's cgroups, so no launcher escapes both. End of
 * file on fd 3 (the service went away) ends the zygote; the launchers it forked keep running,
 * like any sandbox whose service ended. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "supervisor.h"

#ifndef SYS_pidfd_open
#define SYS_pidfd_open 434
#endif

#define ZYGOTE_SOCKET 3
#define ZYGOTE_FDS 6
#define ZYGOTE_MAX_REQUEST (128 << 10) /* the service spawns longer command lines itself */
#define ZYGOTE_MAX_ARGS 16384

extern char **environ;

static void answer(int sock, int32_t pid, int32_t err, int pidfd) {
    int32_t body[2] = {pid, err};
    struct iovec iov = {body, sizeof body};
    union { struct cmsghdr h; char room[CMSG_SPACE(sizeof(int))]; } ctl;
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1};
    if (pidfd >= 0) {
        memset(&ctl, 0, sizeof ctl);
        msg.msg_control = ctl.room;
        msg.msg_controllen = sizeof ctl.room;
        struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
        c->cmsg_level = SOL_SOCKET;
        c->cmsg_type = SCM_RIGHTS;
        c->cmsg_len = CMSG_LEN(sizeof(int));
        memcpy(CMSG_DATA(c), &pidfd, sizeof(int));
    }
    while (sendmsg(sock, &msg, MSG_NOSIGNAL) < 0 && errno == EINTR) {}
}

/* In the forked child: the descriptors in place, signals at their defaults, then the
 * launcher. Never returns. */
__attribute__((noreturn)) static void become_launcher(int sock, int *fds, char **args,
                                                      int nargs, pid_t zygote_pid) {
    if (prctl(PR_SET_PDEATHSIG, SIGKILL) < 0 || getppid() != zygote_pid) _exit(125);
    close(sock);
    /* Moved above every target first, so that no dup2 below overwrites one still needed. */
    int high[ZYGOTE_FDS];
    for (int i = 0; i < ZYGOTE_FDS; i++) {
        high[i] = fcntl(fds[i], F_DUPFD_CLOEXEC, 16);
        if (high[i] < 0) _exit(125);
    }
    static const int at[ZYGOTE_FDS] = {3, 4, 5, 6, 1, 7};
    for (int i = 0; i < ZYGOTE_FDS; i++)
        if (dup2(high[i], at[i]) < 0) _exit(125);
    if (dup2(high[4], 2) < 0) _exit(125);
    int null = open("/dev/null", O_RDONLY | O_CLOEXEC);
    if (null < 0 || dup2(null, 0) < 0) _exit(125);
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
    for (int s = 1; s < 32; s++)
        if (s != SIGKILL && s != SIGSTOP) signal(s, SIG_DFL);
    static char path[] = "PATH=/usr/sbin:/usr/bin:/sbin:/bin";
    static char *env[] = {path, NULL};
    environ = env;
    args[nargs] = NULL;
    _exit(launch(nargs, args)); /* closes 8 and above, then executes bubblewrap */
}

int zygote(void) {
    close_from(ZYGOTE_SOCKET + 1); /* what the service left inheritable is no business of ours */
    signal(SIGCHLD, SIG_IGN); /* the children are reaped by the kernel */
    signal(SIGPIPE, SIG_IGN);
    pid_t self = getpid();
    while (send(ZYGOTE_SOCKET, "ready", 5, MSG_NOSIGNAL) < 0 && errno == EINTR) {}
    static char buf[ZYGOTE_MAX_REQUEST + 1];
    static char *args[ZYGOTE_MAX_ARGS + 1];
    for (;;) {
        struct iovec iov = {buf, ZYGOTE_MAX_REQUEST};
        union { struct cmsghdr h; char room[CMSG_SPACE(ZYGOTE_FDS * sizeof(int))]; } ctl;
        struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = ctl.room,
                             .msg_controllen = sizeof ctl.room};
        ssize_t n = recvmsg(ZYGOTE_SOCKET, &msg, MSG_CMSG_CLOEXEC);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) return 0; /* the service went away */
        int fds[ZYGOTE_FDS], got = 0;
        for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c)) {
            if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
            int count = (int)((c->cmsg_len - CMSG_LEN(0)) / sizeof(int));
            for (int i = 0; i < count; i++) {
                int fd;
                memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof(int));
                if (got < ZYGOTE_FDS) fds[got++] = fd;
                else close(fd);
            }
        }
        int nargs = 0;
        int bad = got != ZYGOTE_FDS || (msg.msg_flags & (MSG_TRUNC | MSG_CTRUNC)) || n == 0 ||
                  buf[n - 1] != 0;
        for (ssize_t k = 0; !bad && k < n; k += (ssize_t)strlen(buf + k) + 1) {
            if (nargs == ZYGOTE_MAX_ARGS) bad = 1;
            else args[nargs++] = buf + k;
        }
        if (bad || nargs < 2) {
            for (int i = 0; i < got; i++) close(fds[i]);
            answer(ZYGOTE_SOCKET, 0, EINVAL, -1);
            continue;
        }
        pid_t pid = fork();
        if (pid == 0) become_launcher(ZYGOTE_SOCKET, fds, args, nargs, self);
        int err = pid < 0 ? errno : 0;
        for (int i = 0; i < got; i++) close(fds[i]);
        if (err) {
            answer(ZYGOTE_SOCKET, 0, err, -1);
            continue;
        }
        int pidfd = (int)syscall(SYS_pidfd_open, pid, 0);
        if (pidfd < 0) {
            err = errno;
            kill(pid, SIGKILL); /* nobody could watch it */
            answer(ZYGOTE_SOCKET, 0, err, -1);
            continue;
        }
        answer(ZYGOTE_SOCKET, pid, 0, pidfd);
        close(pidfd);
    }
}
