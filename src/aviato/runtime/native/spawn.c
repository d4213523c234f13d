/* Starting a process (the main process or a command) in a vfork child: a new session, its stdio
 * and controlling terminal, oom_score_adj, its lineage mark (lineage.c), its credentials
 * (privileges.c), its working directory, and execve with a PATH search in its own environment. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>

#include "supervisor.h"

int g_privileged;
struct sandbox_user g_user;


/* In the child: reports why it could not start, and exits. No stdio: see spawn(). */
static __attribute__((noreturn)) void child_fail(const struct child_spec *s, int stage, int err) {
    if (s->report_fd >= 0) {
        int rep[2] = {stage, err};
        write_all(s->report_fd, rep, sizeof rep);
    } else {
        const char *parts[] = {"aviato: cannot start '", s->argv[0], "': ", strerror(err), "\n"};
        for (size_t i = 0; i < sizeof parts / sizeof *parts; i++)
            write_all(2, parts[i], strlen(parts[i]));
    }
    _exit(127);
}

static const char *env_get(char **envp, const char *key) {
    size_t k = strlen(key);
    for (; envp && *envp; envp++)
        if (!strncmp(*envp, key, k) && (*envp)[k] == '=') return *envp + k + 1;
    return NULL;
}

/* execve(); a file without #! (ENOEXEC) runs with /bin/sh, as execvp() does. `shv` has room
 * for argv and two more. */
static void exec_file(const char *file, char **argv, char **envp, char **shv) {
    execve(file, argv, envp);
    if (errno != ENOEXEC) return;
    int argc = 0;
    while (argv[argc]) argc++;
    shv[0] = "sh", shv[1] = (char *)file;
    memcpy(shv + 2, argv + 1, sizeof(char *) * (size_t)argc);
    execve("/bin/sh", shv, envp);
    errno = ENOEXEC;
}

/* execvp() semantics, but searching the PATH of the *given* environment. Returns on failure. */
static void exec_path(char **argv, char **envp, char **shv) {
    const char *file = argv[0];
    if (strchr(file, '/')) {
        exec_file(file, argv, envp, shv);
        return;
    }
    const char *path = env_get(envp, "PATH");
    if (!path) path = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
    int saw_eacces = 0;
    char full[PATH_MAX];
    for (const char *p = path;; p++) {
        const char *end = strchrnul(p, ':'), *dir = p;
        size_t dl = (size_t)(end - p);
        if (dl == 0) dir = ".", dl = 1; /* an empty entry means the current directory */
        if (dl + 2 + strlen(file) <= sizeof full) {
            memcpy(full, dir, dl);
            full[dl] = '/';
            strcpy(full + dl + 1, file);
            exec_file(full, argv, envp, shv);
            if (errno == EACCES) saw_eacces = 1;
            else if (errno != ENOENT && errno != ENOTDIR && errno != ENAMETOOLONG &&
                     errno != ELOOP)
                return;
        }
        if (!*end) break;
        p = end;
    }
    errno = saw_eacces ? EACCES : ENOENT;
}

/* Runs in the new child: new session, stdio, oom_score_adj, cwd, then exec. */
static __attribute__((noreturn)) void child_run(const struct child_spec *s) {
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL); /* all other dispositions are SIG_DFL already */
    signal(SIGPIPE, SIG_DFL);
    if (setsid() < 0) child_fail(s, STAGE_SETUP, errno);
    int in = s->in_fd;
    if (s->tty_fd >= 0) {
        if (ioctl(s->tty_fd, TIOCSCTTY, 0) < 0) child_fail(s, STAGE_SETUP, errno);
    }
    if (in < 0 && (in = open("/dev/null", O_RDONLY | O_CLOEXEC)) < 0)
        child_fail(s, STAGE_SETUP, errno);
    if (dup2(in, 0) < 0 || dup2(s->out_fd, 1) < 0 || dup2(s->err_fd, 2) < 0)
        child_fail(s, STAGE_SETUP, errno);
    write_number_file("/proc/self/oom_score_adj", 1000); /* best effort */
    mark_lineage(); /* before the credentials change: it needs no privilege either way */
    if (g_privileged && priv_child_become(&g_user, s->protected) < 0)
        child_fail(s, STAGE_SETUP, errno);
    if (s->cwd && chdir(s->cwd) < 0) child_fail(s, STAGE_CWD, errno);
    exec_path(s->argv, s->envp ? s->envp : environ, s->shv);
    child_fail(s, STAGE_EXEC, errno);
}

/* Starts `s` in a child process; returns its pid, or -1 with errno set.
 *
 * vfork: the child borrows this process's memory until its execve (or _exit), so there are no
 * page tables to copy and no copy-on-write faults afterwards; this saves ~0.1 ms of the ~0.7 ms
 * an exec of a small program takes here. This process waits meanwhile (microseconds: the
 * child makes a few syscalls and execs). What the child runs keeps to what is safe in a vfork
 * child: it never returns, allocates nothing (`shv` is allocated here), uses no stdio, and
 * ends in execve or _exit. Its own function, so that no local of the caller can be clobbered
 * by the child. */
__attribute__((noinline)) pid_t spawn(struct child_spec *s) {
    size_t argc = 0;
    while (s->argv[argc]) argc++;
    s->shv = xrealloc(NULL, sizeof(char *) * (argc + 2));
    pid_t pid = vfork();
    if (pid == 0) child_run(s);
    int err = errno;
    free(s->shv);
    s->shv = NULL;
    errno = err;
    return pid;
}
