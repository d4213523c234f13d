/* Directories and metadata (FS_OP), and the reads and writes of whole trees (READ_AT, WRITE_AT),
 * in the sandbox's own view of its file system, with the privileges of the file transfers.
 *
 * Two ways to name a path (FS_BENEATH):
 * - without it, `path` is a sandbox path: its directory is resolved like READ_FILE's (ordinary
 *   symlinks followed, /proc magic links never), and the last component is acted on without
 *   being followed (stat is lstat, remove removes a link, not its target);
 * - with it, `path` is a root directory (resolved that way) and `rel` a relative path under it,
 *   walked one component at a time with O_NOFOLLOW: no symlink is followed anywhere below the
 *   root, and `..`, `.`, empty components and absolute names are refused. This is what a tree
 *   transfer uses, so that a symlink planted in the target never redirects an entry. */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "supervisor.h"

/* Where an operation acts: the last component `name` in the directory `dirfd`. */
struct place {
    int dirfd;
    char name[NAME_MAX + 1];
};

static int bad_component(const char *s, size_t n) {
    return n == 0 || n > NAME_MAX || (n == 1 && s[0] == '.') || (n == 2 && s[0] == '.' && s[1] == '.');
}

/* Resolves `path` (and `rel` when beneath) to a place; -1 with errno on failure. `parents`:
 * create missing directories on the way (0755). `rel` empty names the root itself ("."). */
static int resolve(const char *path, const char *rel, int beneath, int parents, struct place *pl) {
    pl->dirfd = -1;
    if (!beneath) {
        size_t n = strlen(path);
        while (n > 1 && path[n - 1] == '/') n--; /* "/a/b/" names b */
        if (n == 1 && path[0] == '/') {
            strcpy(pl->name, ".");
            pl->dirfd = open_resolved(AT_FDCWD, "/", O_PATH | O_DIRECTORY | O_CLOEXEC);
            return pl->dirfd < 0 ? -1 : 0;
        }
        const char *slash = memrchr(path, '/', n);
        const char *base = slash ? slash + 1 : path;
        size_t bn = (size_t)(path + n - base);
        if (bn > NAME_MAX) return errno = ENAMETOOLONG, -1;
        memcpy(pl->name, base, bn), pl->name[bn] = '\0';
        char *dir = slash == path ? strdup("/") : slash ? strndup(path, (size_t)(slash - path))
                                                        : strdup(".");
        pl->dirfd = parents && make_dirs(dir) < 0
                        ? -1
                        : open_resolved(AT_FDCWD, dir, O_PATH | O_DIRECTORY | O_CLOEXEC);
        int err = errno;
        free(dir);
        return pl->dirfd < 0 ? (errno = err, -1) : 0;
    }
    int fd = open_resolved(AT_FDCWD, path, O_PATH | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0) return -1;
    if (!rel[0]) {
        strcpy(pl->name, ".");
        pl->dirfd = fd;
        return 0;
    }
    if (rel[0] == '/') return close(fd), errno = EINVAL, -1;
    const char *s = rel;
    for (;;) {
        const char *slash = strchr(s, '/');
        size_t n = slash ? (size_t)(slash - s) : strlen(s);
        if (bad_component(s, n)) return close(fd), errno = EINVAL, -1;
        char comp[NAME_MAX + 1];
        memcpy(comp, s, n), comp[n] = '\0';
        if (!slash) {
            strcpy(pl->name, comp);
            pl->dirfd = fd;
            return 0;
        }
        if (parents && mkdirat(fd, comp, 0755) < 0 && errno != EEXIST) return close(fd), -1;
        int next = openat(fd, comp, O_PATH | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
        int err = errno;
        close(fd);
        if (next < 0) return errno = (err == ENOTDIR || err == ELOOP) ? ENOTDIR : err, -1;
        fd = next;
        s = slash + 1;
    }
}

static uint8_t entry_type(mode_t m) {
    return S_ISREG(m) ? ENTRY_FILE : S_ISDIR(m) ? ENTRY_DIR : S_ISLNK(m) ? ENTRY_SYMLINK
                                                                         : ENTRY_OTHER;
}

/* Appends one entry to `b`: u8 type | u32 mode | u64 size | u64 mtime_ns | str name | str target */
static void put_entry(struct buf *b, int dirfd, const char *name, const struct stat *st) {
    char target[PATH_MAX];
    ssize_t tn = 0;
    if (S_ISLNK(st->st_mode)) {
        tn = readlinkat(dirfd, name, target, sizeof target);
        if (tn < 0) tn = 0;
    }
    size_t nn = strlen(name);
    uint8_t *p = buf_reserve(b, 1 + 4 + 8 + 8 + 4 + nn + 4 + (size_t)tn);
    p[0] = entry_type(st->st_mode);
    put32(p + 1, st->st_mode & 07777);
    put64(p + 5, (uint64_t)st->st_size);
    put64(p + 13, (uint64_t)st->st_mtim.tv_sec * 1000000000u + (uint64_t)st->st_mtim.tv_nsec);
    put32(p + 21, (uint32_t)nn), memcpy(p + 25, name, nn);
    put32(p + 25 + nn, (uint32_t)tn), memcpy(p + 29 + nn, target, (size_t)tn);
    buf_commit(b, 29 + nn + (size_t)tn);
}

static void flush_entries(struct conn *c, uint32_t id, struct buf *b) {
    if (buf_pending(b)) send_frame(c, F_FS_ENTRIES, id, b->d + b->off, buf_pending(b));
    b->off = b->len = 0;
}

/* LIST: at most `limit` entries after skipping `skip`, in the directory's own order (not
 * sorted); `.` and `..` are not entries. Returns whether more remained (truncated), or -1. */
static int list_dir(struct conn *c, uint32_t id, int dfd, uint64_t skip, uint32_t limit) {
    DIR *d = fdopendir(dfd);
    if (!d) return close(dfd), -1;
    struct buf b = {0};
    struct dirent *de;
    uint64_t seen = 0;
    uint32_t sent = 0;
    int truncated = 0;
    errno = 0;
    while ((de = readdir(d))) {
        if (!strcmp(de->d_name, ".") || !strcmp(de->d_name, "..")) continue;
        if (seen++ < skip) continue;
        if (sent == limit) {
            truncated = 1;
            break;
        }
        struct stat st;
        if (fstatat(dirfd(d), de->d_name, &st, AT_SYMLINK_NOFOLLOW) < 0) continue; /* gone */
        put_entry(&b, dirfd(d), de->d_name, &st);
        sent++;
        if (buf_pending(&b) >= FILE_CHUNK) flush_entries(c, id, &b);
    }
    flush_entries(c, id, &b);
    buf_free(&b);
    closedir(d);
    return truncated;
}

/* Removes everything inside the directory `dfd` (taken over), following no link. */
static int empty_dir(int dfd, int depth) {
    if (depth > FS_DEPTH_MAX) return close(dfd), errno = ELOOP, -1;
    DIR *d = fdopendir(dfd);
    if (!d) return close(dfd), -1;
    struct dirent *de;
    int rc = 0, removed = 1;
    for (int pass = 0; rc == 0 && removed && pass < 3; pass++, rewinddir(d)) {
        removed = 0; /* a pass that removed something may have missed entries moved meanwhile */
    while (rc == 0 && (de = readdir(d))) {
        if (!strcmp(de->d_name, ".") || !strcmp(de->d_name, "..")) continue;
        if (unlinkat(dirfd(d), de->d_name, 0) == 0) {
            removed++;
            continue;
        }
        if (errno != EISDIR && errno != EPERM) rc = -1;
        else {
            int sub = openat(dirfd(d), de->d_name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
            if (sub < 0 || empty_dir(sub, depth + 1) < 0 ||
                unlinkat(dirfd(d), de->d_name, AT_REMOVEDIR) < 0)
                rc = -1;
        }
        removed += rc == 0;
    }
    }
    int err = errno;
    closedir(d);
    errno = err;
    return rc;
}

static int remove_at(struct place *pl, int recursive) {
    if (unlinkat(pl->dirfd, pl->name, 0) == 0) return 0;
    if (errno != EISDIR && errno != EPERM) return -1;
    if (unlinkat(pl->dirfd, pl->name, AT_REMOVEDIR) == 0) return 0;
    if (!recursive || (errno != ENOTEMPTY && errno != EEXIST)) return -1;
    int d = openat(pl->dirfd, pl->name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    if (d < 0 || empty_dir(d, 0) < 0) return -1;
    return unlinkat(pl->dirfd, pl->name, AT_REMOVEDIR);
}

/* Sets the mode and/or the mtime of a place without following it: a symlink gets only its time. */
static int set_meta(struct place *pl, uint32_t flags, uint32_t mode, uint64_t mtime_ns) {
    struct timespec ts[2] = {{.tv_nsec = UTIME_OMIT},
                             {.tv_sec = (time_t)(mtime_ns / 1000000000u),
                              .tv_nsec = (long)(mtime_ns % 1000000000u)}};
    int fd = openat(pl->dirfd, pl->name, O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_NOCTTY | O_CLOEXEC);
    if (fd < 0) {
        if (errno != ELOOP) return -1;
        return (flags & FS_SET_MTIME) ? utimensat(pl->dirfd, pl->name, ts, AT_SYMLINK_NOFOLLOW) : 0;
    }
    int rc = 0;
    if ((flags & FS_SET_MODE) && fchmod(fd, mode & 07777) < 0) rc = -1;
    if (rc == 0 && (flags & FS_SET_MTIME) && futimens(fd, ts) < 0) rc = -1;
    int err = errno;
    close(fd);
    errno = err;
    return rc;
}

static int symlink_at(const char *target, struct place *pl) {
    if (symlinkat(target, pl->dirfd, pl->name) == 0) return 0;
    if (errno != EEXIST) return -1;
    struct stat st; /* an entry of the same name is replaced, unless it is a directory */
    if (fstatat(pl->dirfd, pl->name, &st, AT_SYMLINK_NOFOLLOW) == 0 && S_ISDIR(st.st_mode))
        return errno = EISDIR, -1;
    if (unlinkat(pl->dirfd, pl->name, 0) < 0) return -1;
    return symlinkat(target, pl->dirfd, pl->name);
}

static int make_dir_at(struct place *pl, uint32_t flags, uint32_t mode) {
    if (mkdirat(pl->dirfd, pl->name, 0700) < 0) {
        struct stat st;
        int err = errno;
        if (err == EEXIST && (flags & FS_PARENTS) &&
            fstatat(pl->dirfd, pl->name, &st, AT_SYMLINK_NOFOLLOW) == 0 && S_ISDIR(st.st_mode))
            return 0; /* as mkdir -p: an existing directory keeps its mode */
        return errno = err, -1;
    }
    return set_meta(pl, FS_SET_MODE, mode, 0); /* exactly `mode`, whatever the umask */
}

/* FS_OP: u8 op | u32 flags | u32 mode | u64 num | u32 limit | str path | str rel | str arg.
 * Answers FS_ENTRIES (STAT, LIST) then FS_DONE, or ERROR. */
void do_fs_op(struct conn *c, uint32_t id, struct rd *r) {
    int nul = 0;
    uint8_t op = 0;
    if (r->n >= 1) op = r->p[0], r->p++, r->n--;
    else r->bad = 1;
    uint32_t flags = rd_u32(r), mode = rd_u32(r);
    uint64_t num = rd_u64(r);
    uint32_t limit = rd_u32(r);
    char *path = rd_str(r, &nul), *rel = r->bad ? NULL : rd_str(r, &nul);
    char *arg = r->bad ? NULL : rd_str(r, &nul);
    if (r->bad) {
        free(path), free(rel), free(arg);
        c->dead = -1;
        return;
    }
    int beneath = flags & FS_BENEATH, truncated = 0;
    struct place pl = {.dirfd = -1}, dst = {.dirfd = -1};
    struct stat st;
    int rc = -1, shown = 0;
    const char *what = beneath && rel[0] ? rel : path;
    if (id_in_use(c, id)) {
        send_error(c, id, EEXIST, "id %u is already in use", id);
        shown = 1;
    } else if (nul || !path[0]) {
        send_error(c, id, EINVAL, "invalid path");
        shown = 1;
    } else if (resolve(path, rel, beneath, (flags & FS_PARENTS) && op != FS_STAT && op != FS_LIST,
                       &pl) < 0) {
        /* errno set */
    } else if (op == FS_STAT) {
        if ((rc = fstatat(pl.dirfd, pl.name, &st, AT_SYMLINK_NOFOLLOW)) == 0) {
            struct buf b = {0};
            put_entry(&b, pl.dirfd, pl.name, &st);
            flush_entries(c, id, &b);
            buf_free(&b);
        }
    } else if (op == FS_LIST) {
        int d = beneath || !strcmp(pl.name, ".")
                    ? openat(pl.dirfd, pl.name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC)
                    : open_resolved(AT_FDCWD, path, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        if (d >= 0) {
            truncated = list_dir(c, id, d, num, limit < FS_LIST_MAX ? limit : FS_LIST_MAX);
            rc = truncated < 0 ? -1 : 0;
        }
    } else if ((op == FS_REMOVE || op == FS_RENAME) &&
               (!strcmp(pl.name, ".") || !strcmp(pl.name, ".."))) {
        send_error(c, id, EINVAL, "%s: cannot remove or rename this directory itself", what);
        shown = 1;
    } else if (op == FS_REMOVE) {
        rc = remove_at(&pl, flags & FS_RECURSIVE);
    } else if (op == FS_MKDIR) {
        rc = make_dir_at(&pl, flags, mode);
    } else if (op == FS_RENAME) {
        if (resolve(beneath ? path : arg, beneath ? arg : "", beneath, 0, &dst) == 0) {
            if (!strcmp(dst.name, ".") || !strcmp(dst.name, "..")) errno = EINVAL;
            else rc = renameat(pl.dirfd, pl.name, dst.dirfd, dst.name);
        }
        if (rc < 0 && dst.dirfd < 0) what = arg; /* the destination's directory failed */
    } else if (op == FS_SYMLINK) {
        rc = symlink_at(arg, &pl);
    } else if (op == FS_SET_META) {
        rc = set_meta(&pl, flags, mode, num);
    } else {
        send_error(c, id, EINVAL, "unknown file operation %u", op);
        shown = 1;
    }
    if (rc == 0) {
        uint8_t t = (uint8_t)(truncated > 0);
        send_frame(c, F_FS_DONE, id, &t, 1);
    } else if (!shown) {
        send_error(c, id, errno, "%s: %s", what, errno == EINVAL && beneath
                                                     ? "not a plain relative name (no '..', '.', "
                                                       "empty or absolute components)"
                                                     : path_error(errno));
    }
    if (pl.dirfd >= 0) close(pl.dirfd);
    if (dst.dirfd >= 0) close(dst.dirfd);
    free(path), free(rel), free(arg);
}

/* READ_AT: str root | str rel. READ_FILE of a file beneath a root, following no link. */
void do_read_at(struct conn *c, uint32_t id, struct rd *r) {
    int nul = 0;
    char *root = rd_str(r, &nul), *rel = r->bad ? NULL : rd_str(r, &nul);
    if (r->bad) {
        free(root), free(rel);
        c->dead = -1;
        return;
    }
    struct place pl = {.dirfd = -1};
    int fd;
    if (id_in_use(c, id)) send_error(c, id, EEXIST, "id %u is already in use", id);
    else if (nul || !root[0] || !rel[0]) send_error(c, id, EINVAL, "invalid path");
    else if (resolve(root, rel, 1, 0, &pl) < 0 ||
             (fd = openat(pl.dirfd, pl.name,
                          O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_NOCTTY | O_CLOEXEC)) < 0)
        send_error(c, id, errno, "%s: %s", rel, path_error(errno));
    else read_opened(c, id, fd, rel);
    if (pl.dirfd >= 0) close(pl.dirfd);
    free(root), free(rel);
}

/* WRITE_AT: u32 mode | u32 flags | u64 mtime_ns | str root | str rel. WRITE_BEGIN of a file
 * beneath a root, following no link; WRITE_DATA, WRITE_END and WRITE_ABORT continue it. */
void do_write_at(struct conn *c, uint32_t id, struct rd *r) {
    int nul = 0;
    uint32_t mode = rd_u32(r), flags = rd_u32(r);
    uint64_t mtime = rd_u64(r);
    char *root = rd_str(r, &nul), *rel = r->bad ? NULL : rd_str(r, &nul);
    if (r->bad) {
        free(root), free(rel);
        c->dead = -1;
        return;
    }
    struct place pl = {.dirfd = -1};
    struct stat st;
    char *tmp = NULL;
    int fd = -1;
    if (id_in_use(c, id)) {
        send_error(c, id, EEXIST, "id %u is already in use", id);
    } else if (nul || !root[0] || !rel[0]) {
        send_error(c, id, EINVAL, "invalid path");
    } else if (resolve(root, rel, 1, flags & WRITE_MAKE_PARENTS, &pl) < 0) {
        send_error(c, id, errno, "%s: %s", rel, errno == EINVAL ? "not a plain relative name"
                                                                : path_error(errno));
    } else if (fstatat(pl.dirfd, pl.name, &st, AT_SYMLINK_NOFOLLOW) == 0 && S_ISDIR(st.st_mode)) {
        send_error(c, id, EISDIR, "%s: is a directory", rel);
    } else if ((fd = tmp_create(pl.dirfd, &tmp)) < 0 || fchmod(fd, mode & 07777) < 0) {
        send_error(c, id, errno, "%s: %s", rel, strerror(errno));
        if (fd >= 0) close(fd), unlinkat(pl.dirfd, tmp, 0);
    } else {
        struct wfile *f = xrealloc(NULL, sizeof *f);
        *f = (struct wfile){.id = id, .fd = fd, .dirfd = pl.dirfd, .path = rel,
                            .base = strdup(pl.name), .tmp = tmp, .next = c->writes,
                            .set_mtime = !!(flags & WRITE_SET_MTIME), .mtime_ns = mtime};
        c->writes = f;
        rel = tmp = NULL;
        pl.dirfd = -1;
    }
    if (pl.dirfd >= 0) close(pl.dirfd);
    free(root), free(rel), free(tmp);
}
