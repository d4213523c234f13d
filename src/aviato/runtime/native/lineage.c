/* Lineage marks: how the supervisor tells which processes a command started; and killing a
 * command, its process group and (exec_kill_tree) everything that carries its mark. */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "supervisor.h"

/* ---- Lineage marks --------------------------------------------------------------------- */

/* The supervisor is PID 1, so every orphan of the sandbox is re-parented to it and which command
 * started it is lost: killing a command's process group leaves what it started in a new session
 * (setsid), a new process group or behind a double fork. So every command carries a mark that
 * all its descendants inherit, whatever they do to their session, group or parent: its
 * RLIMIT_RTTIME (soft = hard = MARK_BASE + a number unique to the exec). That limit bounds only
 * the CPU time of realtime-scheduled processes, which a sandbox cannot create (no CAP_SYS_NICE,
 * RLIMIT_RTPRIO 0), and 2^62 us is unlimited in practice anyway. /proc/<pid>/limits shows it to
 * everyone. A kill (timeout, KILL, the connection closing) SIGKILLs every process that carries
 * the exec's mark (kill_marked). Setting it costs one setrlimit in the child; a fork-based
 * per-command subreaper was measured at +110-150 us per exec here and was not taken.
 *
 * A process could leave its lineage by changing its own RLIMIT_RTTIME (lowering it needs no
 * privilege), so each marked command also gets a second seccomp filter, stacked on the sandbox's
 * and inherited by all it starts, that refuses every change of RLIMIT_RTTIME (setrlimit, and
 * prlimit64 with a new value) with EPERM: the mark cannot be shed. The supervisor itself is not
 * under that filter. What the mark says nothing about: processes started on a command's behalf
 * by something older (a server that an earlier command left running). */
uint64_t g_spawn_mark;  /* read by the vfork child in child_run: 0 for no mark */
uint64_t g_mark_next;   /* the next exec's mark */

#define ARG_LOW(i) (offsetof(struct seccomp_data, args) + 8 * (i))      /* little endian */
#define ARG_HIGH(i) (offsetof(struct seccomp_data, args) + 8 * (i) + 4)
static struct sock_filter g_mark_filter[] = {
    BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
    BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_setrlimit, 0, 2),
    BPF_STMT(BPF_LD | BPF_W | BPF_ABS, ARG_LOW(0)),               /* setrlimit(resource, ..) */
    BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, RLIMIT_RTTIME, 7, 8),
    BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_prlimit64, 0, 7),
    BPF_STMT(BPF_LD | BPF_W | BPF_ABS, ARG_LOW(1)),               /* prlimit64(pid, resource, */
    BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, RLIMIT_RTTIME, 0, 5),     /*           new, old)      */
    BPF_STMT(BPF_LD | BPF_W | BPF_ABS, ARG_LOW(2)),
    BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, 0, 0, 2),                 /* new != NULL: refused */
    BPF_STMT(BPF_LD | BPF_W | BPF_ABS, ARG_HIGH(2)),
    BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, 0, 1, 0),
    BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | EPERM),
    BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
};

/* In the child (vfork: raw system calls only): the mark, and the filter that keeps it. */
void mark_lineage(void) {
    if (!g_spawn_mark) return;
    struct rlimit rl = {(rlim_t)g_spawn_mark, (rlim_t)g_spawn_mark};
    /* best effort: a command without a mark is still killed by its process group */
    if (syscall(SYS_prlimit64, 0, RLIMIT_RTTIME, &rl, NULL) < 0) return;
    struct sock_fprog prog = {sizeof g_mark_filter / sizeof *g_mark_filter, g_mark_filter};
    syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, 0, &prog);
}

/* The soft RLIMIT_RTTIME of `pid` from /proc/<pid>/limits (0: gone, a zombie, unreadable). */
static uint64_t mark_of(long pid) {
    char path[64], buf[2048];
    snprintf(path, sizeof path, "/proc/%ld/limits", pid);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return 0;
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0) return 0;
    buf[n] = 0;
    char *line = strstr(buf, "Max realtime timeout");
    if (!line) return 0;
    line += strlen("Max realtime timeout");
    while (*line == ' ') line++;
    return strtoull(line, NULL, 10); /* "unlimited": 0 */
}

/* SIGKILLs every process marked `mark`, in rounds until a round finds none that was not already
 * killed (a process forking meanwhile hands its mark to the child; zombies show no limits). */
void kill_marked(uint64_t mark) {
    long killed[256];
    size_t nk = 0;
    for (int round = 0; round < KILL_ROUNDS; round++) {
        int fresh = 0;
        DIR *d = opendir("/proc");
        struct dirent *de;
        while (d && (de = readdir(d))) {
            long pid = atol(de->d_name);
            if (pid <= 0 || pid == (long)getpid() || mark_of(pid) != mark) continue;
            kill((pid_t)pid, SIGKILL);
            int seen = 0;
            for (size_t i = 0; i < nk && !seen; i++) seen = killed[i] == pid;
            if (!seen) {
                fresh = 1;
                if (nk < sizeof killed / sizeof *killed) killed[nk++] = pid;
            }
        }
        if (d) closedir(d);
        if (!fresh) return;
    }
}

/* ---- Killing a command ----------------------------------------------------------------- */

/* SIGKILL (or another signal) to the command's process group, and to the child itself in case
 * it has not called setsid() yet. */
void exec_kill(struct exec *e, int sig) {
    if (e->pid <= 0) return;
    if (kill(-e->pid, sig) < 0 && !e->reaped) kill(e->pid, sig);
}

/* Kills everything the command started (timeout, KILL, its connection closing). */
void exec_kill_tree(struct exec *e) {
    exec_kill(e, SIGKILL);
    if (e->mark) kill_marked(e->mark);
}
