/* `--launch` (docs/internals/supervisor-protocol.md, "Command line"): runs on the host before
 * bubblewrap, joins the sandbox's cgroups, sets oom_score_adj, starts a new session and, for a
 * sandbox with a user namespace of its own, enters it (privileges.c); then executes PROG. */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "supervisor.h"

/* ---- Launcher mode (host side, before bubblewrap) -------------------------------------- */

/* The highest descriptor the service hands the launcher: 3-6 control socket, main log, exit
 * file, seccomp filter; 7 the environment (runtime/bubblewrap/launch.py, FD_*). */
#define LAUNCH_MAX_FD 7

/* Closes every descriptor from `low` on: whatever the service (a library of it, its parent)
 * left inheritable must not reach bubblewrap or the sandbox. Done here rather than by the
 * service listing its own descriptors before every spawn (O(open descriptors) per create:
 * thousands with many sandboxes). */
void close_from(int low) {
#if defined(SYS_close_range)
    if (syscall(SYS_close_range, (unsigned)low, ~0u, 0u) == 0) return;
#endif
    DIR *d = opendir("/proc/self/fd");
    if (!d) die("cannot list /proc/self/fd to close inherited descriptors: %s", strerror(errno));
    int fds[256], n;
    do { /* close what one pass saw, then look again (closing changes the directory) */
        struct dirent *de;
        n = 0;
        rewinddir(d);
        while ((de = readdir(d)) && n < 256) {
            int fd = atoi(de->d_name);
            if (de->d_name[0] != '.' && fd >= low && fd != dirfd(d)) fds[n++] = fd;
        }
        for (int k = 0; k < n; k++) close(fds[k]);
    } while (n);
    closedir(d);
}

int launch(int argc, char **argv) {
    close_from(LAUNCH_MAX_FD + 1);
    int i = 2;
    unsigned long ns_base = 0, ns_count = 0;
    char *stage_from = NULL, *stage_at = NULL, *volumes_from = NULL, *volumes_at = NULL;
    char *layer_from = NULL, *layer_at = NULL;
    const char *volume_from[MAX_STAGED_VOLUMES], *volume_at[MAX_STAGED_VOLUMES];
    const char *detach[MAX_DETACH];
    int volumes = 0, detaches = 0;
    for (; i < argc && strcmp(argv[i], "--"); i++) {
        if (!strcmp(argv[i], "--userns") && i + 1 < argc) {
            char *end;
            ns_base = strtoul(argv[++i], &end, 10);
            if (*end != ':' || !(ns_count = strtoul(end + 1, &end, 10)) || *end)
                die("--userns: expected BASE:COUNT, got '%s'", argv[i]);
            continue;
        }
        if (!strcmp(argv[i], "--stage") && i + 1 < argc) {
            stage_from = argv[++i];
            char *colon = strrchr(stage_from, ':');
            if (!colon || colon == stage_from || !colon[1])
                die("--stage: expected FROM:AT, got '%s'", stage_from);
            *colon = 0, stage_at = colon + 1;
            continue;
        }
        if (!strcmp(argv[i], "--stage-volumes") && i + 1 < argc) {
            volumes_from = argv[++i];
            char *colon = strrchr(volumes_from, ':');
            if (!colon || colon == volumes_from || !colon[1])
                die("--stage-volumes: expected FROM:AT, got '%s'", volumes_from);
            *colon = 0, volumes_at = colon + 1;
            continue;
        }
        if (!strcmp(argv[i], "--layer") && i + 1 < argc) {
            layer_from = argv[++i];
            char *colon = strrchr(layer_from, ':');
            if (!colon || colon == layer_from || !colon[1])
                die("--layer: expected FROM:AT, got '%s'", layer_from);
            *colon = 0, layer_at = colon + 1;
            continue;
        }
        if (!strcmp(argv[i], "--volume") && i + 1 < argc) {
            char *from = argv[++i];
            char *colon = strrchr(from, ':');
            if (!colon || colon == from || !colon[1])
                die("--volume: expected FROM:AT, got '%s'", from);
            if (volumes == MAX_STAGED_VOLUMES)
                die("--volume: more than %d volumes", MAX_STAGED_VOLUMES);
            *colon = 0;
            volume_from[volumes] = from, volume_at[volumes++] = colon + 1;
            continue;
        }
        if (!strcmp(argv[i], "--detach") && i + 1 < argc) {
            if (detaches == MAX_DETACH) die("--detach: more than %d", MAX_DETACH);
            detach[detaches++] = argv[++i];
            continue;
        }
        if (!strcmp(argv[i], "--cgroup-procs") && i + 1 < argc) {
            if (write_number_file(argv[++i], (long)getpid()) < 0)
                die("cannot join cgroup via %s: %s", argv[i], strerror(errno));
        } else if (!strcmp(argv[i], "--cgroup-tasks") && i + 1 < argc) {
            /* v1: "0" into `tasks` moves this (single-threaded) process without the kernel's
             * cgroup_threadgroup_rwsem, whose RCU wait costs ~12 ms after an idle spell
             * (runtime/cgroups/__init__.py); done here, not by a shell before us (an exec). */
            if (write_number_file(argv[++i], 0) < 0)
                die("cannot join cgroup via %s: %s", argv[i], strerror(errno));
        } else if (!strcmp(argv[i], "--oom-score-adj") && i + 1 < argc) {
            char *end;
            long v = strtol(argv[++i], &end, 10);
            if (*end || write_number_file("/proc/self/oom_score_adj", v) < 0)
                die("cannot set oom_score_adj to %s: %s", argv[i], strerror(errno));
        } else {
            die("--launch: unknown or incomplete option '%s'", argv[i]);
        }
    }
    if (i + 1 >= argc) die("--launch: missing '-- PROG ARGS...'");
    if ((volumes_from || layer_from || volumes || detaches) && !stage_from)
        die("--stage-volumes, --volume, --layer and --detach need --stage");
    /* In the sandbox's cgroups now: no longer bound to a zygote's life (zygote.c). */
    prctl(PR_SET_PDEATHSIG, 0);
    setsid(); /* EPERM if already a group leader: fine */
    char **prog = argv + i + 1;
    if (ns_count) {
        /* The program is opened now: as the namespace's root, host paths that only host root
         * may search (a venv under /root) are out of reach. */
        int fd = open(prog[0], O_PATH | O_CLOEXEC);
        if (fd < 0) die("cannot open %s: %s", prog[0], strerror(errno));
        struct staging st = {stage_from, stage_at, volumes_from, volumes_at,
                             layer_from, layer_at, volume_from, volume_at, volumes,
                             detach, detaches, prog};
        if (priv_enter_userns(ns_base, ns_count, &st) < 0) return 125;
        syscall(SYS_execveat, fd, "", prog, environ, AT_EMPTY_PATH);
        fprintf(stderr, "aviato-supervisor: cannot execute %s: %s\n", prog[0], strerror(errno));
        return 127;
    }
    if (strchr(prog[0], '/')) execv(prog[0], prog);
    else execvp(prog[0], prog);
    fprintf(stderr, "aviato-supervisor: cannot execute %s: %s\n", prog[0], strerror(errno));
    return 127;
}
