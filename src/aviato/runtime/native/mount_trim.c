/*
 * Trimming the launcher's mount namespace before bubblewrap starts (root service, `--launch`
 * with `--stage`; called by privileges.c's helper, as host root, once the staged views are in
 * place).
 *
 * That namespace begins as a copy of the host's whole mount table, and bubblewrap reads the
 * whole table again (/proc/self/mountinfo) for each of its ~25 mounts, to remount what lies
 * beneath each one. So every mount the host has, the operator's, a container runtime's, a
 * leaked one, made every sandbox start slower: raw bubblewrap took 5.6 ms with this machine's
 * 43 mounts, 15.3 ms with 285, and 4.3 ms with 3. Here every mount bubblewrap has no use for is
 * detached (lazily, in this namespace only: the host keeps its table) before it starts.
 *
 * What bubblewrap uses, from its own command line: the host side of every bind and overlay
 * (`--bind`, `--ro-bind`, `--dev-bind` and their `-try` forms, `--overlay-src`, `--overlay`),
 * with every mount beneath it (those binds are recursive), the path as written and as resolved
 * (a symlink on the way may lead to another mount); /proc and /dev with what is beneath them
 * (its own work and `--proc` / `--dev`); the way to its own binary (its libraries) and to /tmp
 * (its base directory). A mount is kept when it is one of those paths, lies on the way to one,
 * or lies beneath a bind's source; every other one goes, with whatever is mounted beneath it.
 * When in doubt nothing is detached: an option it does not know, a table too large to read,
 * no memory.
 */
#define _GNU_SOURCE
#include "privileges.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <unistd.h>

#define TRIM_MAX_TABLE (4 << 20) /* bytes of mountinfo; a larger table is left as it is */
#define TRIM_MAX_KEEP 512        /* paths kept; more (a command line of thousands of binds)
                                    and the table is left as it is */
#define TRIM_MAX_STACK 16        /* mounts stacked on one path, detached one after another */

struct keep {
    const char *path;
    int with_below; /* the mounts beneath it are kept too */
};

struct keeps {
    struct keep at[TRIM_MAX_KEEP];
    int n, overflow;
};

static void keep_path(struct keeps *k, const char *path, int with_below) {
    if (!path || path[0] != '/') return;
    if (k->n == TRIM_MAX_KEEP) {
        k->overflow = 1;
        return;
    }
    k->at[k->n].path = path;
    k->at[k->n++].with_below = with_below;
}

/* `path` as written and as resolved (realpath; kept as written when it does not resolve). */
static void keep_both(struct keeps *k, const char *path, int with_below) {
    if (!path || path[0] != '/') return;
    keep_path(k, path, with_below);
    char *real = realpath(path, NULL); /* freed with the helper's exit */
    if (real && strcmp(real, path)) keep_path(k, real, with_below);
}

/* bubblewrap's options that aviato's runtime uses: how many arguments each takes, and how many
 * of those (the first ones) are host paths that it binds (or overlays). A command line with
 * any other option is not trimmed (tests/runtime/test_mount_trim.py keeps this table complete). */
static const struct option_shape {
    const char *name;
    int args, sources;
} bwrap_options[] = {
    {"--bind", 2, 1},          {"--bind-try", 2, 1},        {"--ro-bind", 2, 1},
    {"--ro-bind-try", 2, 1},   {"--dev-bind", 2, 1},        {"--dev-bind-try", 2, 1},
    {"--overlay-src", 1, 1},   {"--overlay", 3, 2},         {"--symlink", 2, 0},
    {"--setenv", 2, 0},        {"--hostname", 1, 0},        {"--cap-add", 1, 0},
    {"--cap-drop", 1, 0},      {"--seccomp", 1, 0},         {"--args", 1, 0},
    {"--size", 1, 0},          {"--perms", 1, 0},           {"--tmpfs", 1, 0},
    {"--dir", 1, 0},           {"--chdir", 1, 0},           {"--remount-ro", 1, 0},
    {"--proc", 1, 0},          {"--dev", 1, 0},             {"--uid", 1, 0},
    {"--gid", 1, 0},           {"--unshare-pid", 0, 0},     {"--unshare-ipc", 0, 0},
    {"--unshare-uts", 0, 0},   {"--unshare-net", 0, 0},     {"--unshare-user", 0, 0},
    {"--unshare-cgroup-try", 0, 0}, {"--as-pid-1", 0, 0},   {"--new-session", 0, 0},
    {"--clearenv", 0, 0},      {"--disable-userns", 0, 0},
};

static const struct option_shape *shape_of(const char *opt) {
    for (size_t i = 0; i < sizeof bwrap_options / sizeof bwrap_options[0]; i++)
        if (!strcmp(opt, bwrap_options[i].name)) return &bwrap_options[i];
    return NULL;
}

/* `mnt` (a mount point) is `path` or lies on the way to it, or, with `with_below`, beneath
 * it. Trailing slashes of `path` are ignored. */
static int related(const char *mnt, const char *path, int with_below) {
    size_t m = strlen(mnt), p = strlen(path);
    while (p > 1 && path[p - 1] == '/') p--;
    if (m == 1) return 1; /* the root is on the way to everything */
    if (m <= p && !strncmp(mnt, path, m) && (path[m] == '/' || m == p)) return 1;
    return with_below && p < m && !strncmp(mnt, path, p) && (p == 1 || mnt[p] == '/');
}

/* Undoes mountinfo's octal escapes (\040 space, \011 tab, \012 newline, \134 backslash) in
 * place. */
static void unescape(char *s) {
    char *out = s;
    for (; *s; s++) {
        if (s[0] == '\\' && s[1] >= '0' && s[1] <= '3' && s[2] >= '0' && s[2] <= '7' &&
            s[3] >= '0' && s[3] <= '7') {
            *out++ = (char)((s[1] - '0') * 64 + (s[2] - '0') * 8 + (s[3] - '0'));
            s += 3;
        } else {
            *out++ = *s;
        }
    }
    *out = 0;
}

struct mount_entry {
    long id, parent;
    char *at;
    int needed;
};

/* Reads /proc/self/mountinfo whole into a fresh buffer (NUL-terminated); NULL if it cannot or
 * it is larger than TRIM_MAX_TABLE. */
static char *read_table(void) {
    int fd = open("/proc/self/mountinfo", O_RDONLY | O_CLOEXEC);
    if (fd < 0) return NULL;
    size_t size = 0, cap = 64 << 10;
    char *buf = malloc(cap + 1);
    while (buf) {
        if (size == cap) {
            if (cap >= TRIM_MAX_TABLE) {
                free(buf);
                buf = NULL;
                break;
            }
            cap *= 2;
            char *grown = realloc(buf, cap + 1);
            if (!grown) free(buf);
            buf = grown;
            continue;
        }
        ssize_t n = read(fd, buf + size, cap - size);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) {
            free(buf);
            buf = NULL;
        } else if (n == 0) {
            buf[size] = 0;
            break;
        } else {
            size += (size_t)n;
        }
    }
    close(fd);
    return buf;
}

/* Splits the table into entries (id, parent id, mount point); the count, or -1. */
static int parse_table(char *table, struct mount_entry **out) {
    int n = 0, cap = 0;
    struct mount_entry *entries = NULL;
    for (char *line = table, *next; line && *line; line = next) {
        next = strchr(line, '\n');
        if (next) *next++ = 0;
        char *fields[5];
        char *cursor = line;
        int f = 0;
        for (; f < 5; f++) {
            fields[f] = strsep(&cursor, " ");
            if (!fields[f]) break;
        }
        if (f < 5) continue; /* not a mount line: ignored */
        if (n == cap) {
            cap = cap ? cap * 2 : 128;
            struct mount_entry *grown = realloc(entries, (size_t)cap * sizeof *entries);
            if (!grown) {
                free(entries);
                return -1;
            }
            entries = grown;
        }
        unescape(fields[4]);
        entries[n].id = strtol(fields[0], NULL, 10);
        entries[n].parent = strtol(fields[1], NULL, 10);
        entries[n].at = fields[4];
        entries[n++].needed = 0;
    }
    *out = entries;
    return n;
}

static const struct mount_entry *find(const struct mount_entry *e, int n, long id) {
    for (int i = 0; i < n; i++)
        if (e[i].id == id) return &e[i];
    return NULL;
}

int trim_mounts(char *const *prog) {
    static struct keeps keeps;
    keeps.n = keeps.overflow = 0;
    keep_path(&keeps, "/proc", 1);
    keep_path(&keeps, "/dev", 1);
    keep_path(&keeps, "/tmp", 0);
    keep_both(&keeps, prog[0], 0);
    /* bubblewrap's options up to its `--` (the sandbox's command after it is never looked at:
     * no path a sandbox names is resolved here, as host root). */
    int i = 1;
    for (; prog[i] && strcmp(prog[i], "--"); i++) {
        const struct option_shape *shape = shape_of(prog[i]);
        if (!shape) return 0; /* unknown: left as it is */
        for (int a = 0; a < shape->args; a++) {
            if (!prog[i + 1]) return 0;
            if (a < shape->sources) keep_both(&keeps, prog[i + 1], 1);
            i++;
        }
    }
    if (!prog[i] || keeps.overflow) return 0; /* no end of options: left as it is */
    char *table = read_table();
    if (!table) return 0;
    struct mount_entry *e = NULL;
    int n = parse_table(table, &e);
    for (int i = 0; i < n; i++)
        for (int k = 0; k < keeps.n && !e[i].needed; k++)
            e[i].needed = related(e[i].at, keeps.at[k].path, keeps.at[k].with_below);
    int detached = 0;
    for (int i = 0; i < n; i++) {
        const struct mount_entry *parent = find(e, n, e[i].parent);
        if (e[i].needed || (parent && !parent->needed && parent != &e[i]))
            continue; /* kept, or goes with the mount it lies on */
        /* Several mounts stacked on one path are all unneeded (neededness is the path's):
         * each call detaches the top one with everything beneath it. */
        for (int s = 0; s < TRIM_MAX_STACK; s++) {
            if (umount2(e[i].at, MNT_DETACH | UMOUNT_NOFOLLOW) < 0) break;
            detached++;
        }
    }
    free(e);
    free(table);
    return detached;
}
