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
 * C11 + Linux/glibc, no other dependencies. Its modules are listed in supervisor.h. Build (setup.py
 * does it): cc -std=c11 -O2 -static -o aviato-supervisor with every .c file of this directory.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/prctl.h>
#include <sys/random.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "supervisor.h"

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
    if (argc == 2 && !strcmp(argv[1], "--zygote")) return zygote();
    if (argc >= 2 && !strcmp(argv[1], "--version")) {
        /* The C library matters to the speed of a sandbox's start (setup.py says why). */
#ifdef __GLIBC__
        const char *libc = "glibc";
#else
        const char *libc = "musl"; /* the only other one setup.py builds with */
#endif
        printf("aviato-supervisor protocol %d (%s)\n", PROTOCOL_VERSION, libc);
        return 0;
    }
    char **main_argv = NULL;
    int a = 1;
    g_user.protected_id = 65536;
    int egress = 0;
    /* Options before `--keepalive` or `--`: --egress (no value); privileged mode:
     * --user UID:GID [--protected-id N]. */
    while (a + 1 < argc) {
        char *end;
        if (!strcmp(argv[a], "--egress")) {
            egress = 1;
            a += 1;
            continue;
        }
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
        a += 2;
    }
    if (argc == a + 1 && !strcmp(argv[a], "--keepalive")) g_keepalive = 1;
    else if (argc >= a + 2 && !strcmp(argv[a], "--")) main_argv = argv + a + 1;
    else {
        fprintf(stderr, "usage: aviato-supervisor [--user UID:GID [--protected-id N]] [--egress] "
                        "[--keepalive | -- ARGV...]\n"
                        "       aviato-supervisor --launch [--cgroup-procs FILE]... [--cgroup-tasks FILE]... "
                        "[--oom-score-adj N] "
                        "[--userns BASE:COUNT [--stage FROM:AT [--layer FROM:AT] [--detach DIR]]] "
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
    /* --egress: the proxy variables must be in the environment the main process starts with. */
    int egress_err = egress ? egress_open() : 0;
    if (egress_err) die("cannot open the sandbox's egress listener: %s", strerror(egress_err));
    if (main_argv) main_start(main_argv);
    loop();
    return 0;
}
