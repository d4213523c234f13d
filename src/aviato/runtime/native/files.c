/* File transfers: READ_FILE (opened here, then streamed within its output window by conn.c's
 * conn_pump_reads) and WRITE_BEGIN..END (a temporary file renamed into place), with paths
 * resolved inside the sandbox and never through a /proc magic link. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/epoll.h>
#include <sys/statfs.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "supervisor.h"

static struct { dev_t dev; ino_t ino; } g_own_files[8]; /* see is_own_file */
static int g_own_count;

/* ---- resolving paths ---- */

#ifndef SYS_openat2
#define SYS_openat2 437
#endif
struct how2 { uint64_t flags, mode, resolve; }; /* struct open_how */
#define NO_MAGICLINKS 0x02                      /* RESOLVE_NO_MAGICLINKS */
static int g_no_openat2;

/* Whether `fd` is one of the supervisor's own host-side files (see remember_own_files). */
static int is_own_file(int fd) {
    struct stat st;
    if (fstat(fd, &st) < 0) return 0;
    for (int i = 0; i < g_own_count; i++)
        if (g_own_files[i].dev == st.st_dev && g_own_files[i].ino == st.st_ino) return 1;
    return 0;
}

/* The regular files among the inherited descriptors (stdout/stderr: the runtime log; 4: main
 * log; 5: exit file) are host files: what the fallback of open_resolved refuses. */
void remember_own_files(void) {
    for (int fd = 0; fd <= 5 && g_own_count < 8; fd++) {
        struct stat st;
        if (fstat(fd, &st) == 0 && S_ISREG(st.st_mode))
            g_own_files[g_own_count].dev = st.st_dev, g_own_files[g_own_count++].ino = st.st_ino;
    }
}

/* openat() for the file API, which must never follow a /proc "magic link" (/proc/<pid>/fd/N,
 * exe, cwd, root, ...): those are not paths but handles, and /proc/self/fd/4 or /proc/1/fd/4 is
 * the supervisor's own descriptor of a host file, reachable by any symlink planted in the
 * sandbox. openat2(RESOLVE_NO_MAGICLINKS) refuses them (ELOOP) at every step of the path; plain
 * symlinks and /proc/self itself still work. Kernels without openat2 (before 5.6): the file
 * opened is refused when it is one of our own files (ELOOP too). */
int open_resolved(int dirfd, const char *path, int flags) {
    if (!g_no_openat2) {
        struct how2 how = {.flags = (uint64_t)flags, .mode = 0, .resolve = NO_MAGICLINKS};
        int fd = (int)syscall(SYS_openat2, dirfd, path, &how, sizeof how);
        if (fd >= 0 || (errno != ENOSYS && errno != E2BIG)) return fd;
        g_no_openat2 = 1;
    }
    int fd = openat(dirfd, path, flags);
    if (fd >= 0 && is_own_file(fd)) {
        close(fd);
        errno = ELOOP;
        return -1;
    }
    return fd;
}

const char *path_error(int err) {
    return err == ELOOP ? "too many levels of symbolic links, or a link through /proc/<pid>/fd, "
                          "exe, cwd or root (file transfers do not follow those)"
                        : strerror(err);
}

/* Filesystems whose st_size says nothing about what a read returns (procfs: 0; sysfs: 4096). */
static int size_is_meaningless(int fd) {
    struct statfs sf;
    if (fstatfs(fd, &sf) < 0) return 0;
    switch ((unsigned long)sf.f_type) {
    case 0x9fa0:     /* procfs */
    case 0x62656572: /* sysfs */
    case 0x64626720: /* debugfs */
    case 0x74726163: /* tracefs */
    case 0x73636673: /* securityfs */
    case 0x27e0eb:   /* cgroup */
    case 0x63677270: /* cgroup2 */
    case 0x62656570: /* configfs */
        return 1;
    }
    return 0;
}

/* READ_FILE: str path → FILE_INFO, FILE_DATA..., FILE_END (or ERROR). */
void do_read_file(struct conn *c, uint32_t id, struct rd *r) {
    int nul = 0;
    char *path = rd_str(r, &nul);
    if (r->bad) {
        c->dead = -1;
        return;
    }
    int fd = -1;
    if (id_in_use(c, id)) {
        send_error(c, id, EEXIST, "id %u is already in use", id);
    } else if (nul || !path[0]) {
        send_error(c, id, EINVAL, "invalid path");
    } else if ((fd = open_resolved(AT_FDCWD, path, O_RDONLY | O_CLOEXEC | O_NOCTTY | O_NONBLOCK)) <
               0) {
        send_error(c, id, errno, "%s: %s", path, path_error(errno));
    } else {
        read_opened(c, id, fd, path);
        fd = -1;
    }
    if (fd >= 0) close(fd);
    free(path);
}

/* Starts sending the file opened as `fd` (taken over) as FILE_INFO, FILE_DATA..., FILE_END. */
void read_opened(struct conn *c, uint32_t id, int fd, const char *path) {
    struct stat st;
    if (fstat(fd, &st) < 0) {
        send_error(c, id, errno, "%s: %s", path, strerror(errno));
    } else if (S_ISDIR(st.st_mode)) {
        send_error(c, id, EISDIR, "%s: is a directory", path);
    } else if (!S_ISREG(st.st_mode)) {
        send_error(c, id, EINVAL, "%s: not a regular file", path);
    } else {
        off_t size = size_is_meaningless(fd) ? 0 : st.st_size;
        uint8_t info[FILE_INFO_SIZE];
        put64(info, (uint64_t)size);
        put32(info + 8, st.st_mode & 07777);
        send_frame(c, F_FILE_INFO, id, info, sizeof info);
        struct rfile *f = xrealloc(NULL, sizeof *f);
        *f = (struct rfile){.id = id, .fd = fd, .next = NULL, .sized = size > 0,
                            .left = size > 0 ? (uint64_t)size : UNSIZED_FILE_MAX};
        *rfile_find(c, id) = f; /* append */
        conn_pump_reads(c);
        return;
    }
    close(fd);
}

/* mkdir -p */
int make_dirs(const char *dir) {
    char p[PATH_MAX];
    size_t n = strlen(dir);
    if (n >= sizeof p) return errno = ENAMETOOLONG, -1;
    memcpy(p, dir, n + 1);
    for (size_t i = 1; i <= n; i++) {
        if (p[i] != '/' && p[i] != '\0') continue;
        char saved = p[i];
        p[i] = '\0';
        if (mkdir(p, 0755) < 0 && errno != EEXIST) return -1;
        p[i] = saved;
    }
    return 0;
}

struct wfile *g_dead_wfiles;

/* Ends the write *pp (removing its temporary file unless `keep_tmp`). A pipe's read end is
 * closed here, so that a client still writing into it gets EPIPE at once; the struct itself is
 * freed at the end of the loop's turn (its pipe's watch may be in the current epoll batch). */
void wfile_drop(struct conn *c, struct wfile **pp, int keep_tmp) {
    struct wfile *f = *pp;
    *pp = f->next;
    if (f->piped) watch_close(&f->pipe);
    if (f->fd >= 0) close(f->fd);
    if (!keep_tmp) unlinkat(f->dirfd, f->tmp, 0);
    close(f->dirfd);
    free(f->path), free(f->base), free(f->tmp);
    f->gnext = g_dead_wfiles;
    g_dead_wfiles = f;
    (void)c;
}

/* A new temporary file `.aviato-tmp-XXXXXX` in `dirfd` (mode 0600, never following a link). */
int tmp_create(int dirfd, char **name) {
    static const char abc[] = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
    static uint64_t counter;
    for (int attempt = 0; attempt < 100; attempt++) {
        uint64_t v = now_real() ^ ((uint64_t)getpid() << 40) ^ (++counter * 0x9e3779b97f4a7c15ull);
        char s[] = ".aviato-tmp-XXXXXX";
        for (int i = 12; i < 18; i++) s[i] = abc[v % 62], v /= 62;
        int fd = openat(dirfd, s, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, 0600);
        if (fd >= 0) {
            *name = strdup(s);
            return fd;
        }
        if (errno != EEXIST) return -1;
    }
    errno = EEXIST;
    return -1;
}

/* WRITE_BEGIN: u32 mode | u32 flags | str path. */
void do_write_begin(struct conn *c, uint32_t id, struct rd *r) {
    int nul = 0;
    uint32_t mode = rd_u32(r), flags = rd_u32(r);
    char *path = rd_str(r, &nul);
    if (r->bad) {
        free(path);
        c->dead = -1;
        return;
    }
    if (nul) {
        send_error(c, id, EINVAL, "invalid path");
        free(path);
        return;
    }
    begin_write(c, id, mode, flags, path);
}

/* Starts a write of `path` (taken over): a temporary file next to the target, in the target's
 * directory opened once (without magic links); WRITE_END renames it in that directory. Returns
 * the new write (at the head of c->writes), or NULL after sending the ERROR. */
struct wfile *begin_write(struct conn *c, uint32_t id, uint32_t mode, uint32_t flags, char *path) {
    struct stat st;
    size_t n = strlen(path);
    char *slash = strrchr(path, '/');
    char *dir = slash == path ? strdup("/") : slash ? strndup(path, (size_t)(slash - path))
                                                    : strdup(".");
    const char *base = slash ? slash + 1 : path;
    char *tmp = NULL;
    int fd = -1, dirfd = -1;
    struct wfile *made = NULL;
    if (id_in_use(c, id)) {
        send_error(c, id, EEXIST, "id %u is already in use", id);
    } else if (n == 0) {
        send_error(c, id, EINVAL, "invalid path");
    } else if (path[n - 1] == '/' || (stat(path, &st) == 0 && S_ISDIR(st.st_mode))) {
        send_error(c, id, EISDIR, "%s: is a directory", path);
    } else if ((flags & WRITE_MAKE_PARENTS) && make_dirs(dir) < 0) {
        send_error(c, id, errno, "cannot create %s: %s", dir, strerror(errno));
    } else if ((dirfd = open_resolved(AT_FDCWD, dir, O_PATH | O_DIRECTORY | O_CLOEXEC)) < 0) {
        send_error(c, id, errno, "%s: %s", path, path_error(errno));
    } else if ((fd = tmp_create(dirfd, &tmp)) < 0) {
        send_error(c, id, errno, "%s: %s", path, strerror(errno));
    } else if (fchmod(fd, mode & 07777) < 0) {
        send_error(c, id, errno, "%s: %s", path, strerror(errno));
        close(fd), unlinkat(dirfd, tmp, 0);
    } else {
        made = xrealloc(NULL, sizeof *made);
        *made = (struct wfile){.id = id, .fd = fd, .dirfd = dirfd, .path = path,
                               .base = strdup(base), .tmp = tmp, .next = c->writes, .c = c,
                               .pipe = {-1, 0, W_WRITE_PIPE, NULL}};
        c->writes = made;
        path = tmp = NULL;
        dirfd = -1;
    }
    if (dirfd >= 0) close(dirfd);
    free(path), free(dir), free(tmp);
    return made;
}

static void hand_over_file(struct conn *c, uint32_t id, int fd, uint64_t size, uint32_t mode);
static int write_pipe_open(struct wfile *f);

/* Whether the file `fd` is kept in memory: tmpfs and ramfs, and an overlay unless the service
 * says its upper layer is on disk (OPEN_LAYER_ON_DISK: an overlay reports its own type). Bytes
 * written through a handed-out descriptor are charged to the writer's memory, not the
 * sandbox's, so such files are written by the supervisor: from a pipe (OPEN_THROUGH_PIPE, see
 * write_pipe_open) or from WRITE_DATA frames. */
static int in_memory(int fd, uint32_t flags) {
    struct statfs sf;
    if (fstatfs(fd, &sf) < 0) return 1;
    switch ((unsigned long)sf.f_type) {
    case 0x01021994: /* tmpfs */
    case 0x858458f6: /* ramfs */
        return 1;
    case 0x794c7630: /* overlayfs */
        return !(flags & OPEN_LAYER_ON_DISK);
    }
    return 0;
}

/* OPEN_FILE: u32 flags | u32 mode | str path → FILE_OPENED (u64 size | u32 mode), with the
 * file's descriptor riding on it (SCM_RIGHTS), so that the service moves the bytes without
 * them crossing this connection. Without OPEN_FOR_WRITE: the file opened for reading, as
 * READ_FILE opens it; refused (EINVAL) unless it is a regular file whose size says what a read
 * returns (the service streams the others). With it: the temporary file of a write, as
 * WRITE_BEGIN makes it (OPEN_MAKE_PARENTS as WRITE_MAKE_PARENTS), opened for writing; WRITE_END
 * renames it into place and answers WRITE_OK with its size, and WRITE_ABORT or the end of this
 * connection removes it. A file kept in memory (see in_memory) is refused (EINVAL), unless
 * OPEN_THROUGH_PIPE asks for a pipe instead (see write_pipe_open): the descriptor handed over
 * is then the write end of a pipe. With that flag, `| u64 size` ends the payload: the bytes to
 * come, which WRITE_END checks before the rename (either kind of write). */
void do_open_file(struct conn *c, uint32_t id, struct rd *r) {
    int nul = 0;
    uint32_t flags = rd_u32(r), mode = rd_u32(r);
    char *path = rd_str(r, &nul);
    uint64_t declared = flags & OPEN_THROUGH_PIPE ? rd_u64(r) : 0;
    if (r->bad) {
        free(path);
        c->dead = -1;
        return;
    }
    if (nul || !path[0]) {
        send_error(c, id, EINVAL, "invalid path");
        free(path);
        return;
    }
    if (c->npass >= PORT_CONNECTS_MAX) {
        send_error(c, id, EAGAIN, "too many descriptors queued on this control connection");
        free(path);
        return;
    }
    if (flags & OPEN_FOR_WRITE) {
        uint32_t wflags = flags & OPEN_MAKE_PARENTS ? WRITE_MAKE_PARENTS : 0;
        struct wfile *f = begin_write(c, id, mode, wflags, path); /* takes `path` */
        if (!f) return;
        f->by_descriptor = 1;
        int memory = in_memory(f->fd, flags);
        if (memory && !(flags & OPEN_THROUGH_PIPE)) {
            send_error(c, id, EINVAL, "%s: its file system is kept in memory (stream it)",
                       f->path);
            wfile_drop(c, wfile_find(c, id), 0);
            return;
        }
        f->sized = (flags & OPEN_THROUGH_PIPE) != 0; /* WRITE_END checks `declared` */
        f->declared = declared;
        int fd = memory ? write_pipe_open(f) : fcntl(f->fd, F_DUPFD_CLOEXEC, 3);
        if (fd < 0) {
            send_error(c, id, errno, "%s: %s", f->path, strerror(errno));
            wfile_drop(c, wfile_find(c, id), 0);
            return;
        }
        hand_over_file(c, id, fd, 0, mode & 07777);
        return;
    }
    struct stat st;
    int fd = -1;
    if (id_in_use(c, id)) {
        send_error(c, id, EEXIST, "id %u is already in use", id);
    } else if ((fd = open_resolved(AT_FDCWD, path, O_RDONLY | O_CLOEXEC | O_NOCTTY | O_NONBLOCK))
               < 0) {
        send_error(c, id, errno, "%s: %s", path, path_error(errno));
    } else if (fstat(fd, &st) < 0) {
        send_error(c, id, errno, "%s: %s", path, strerror(errno));
    } else if (S_ISDIR(st.st_mode)) {
        send_error(c, id, EISDIR, "%s: is a directory", path);
    } else if (!S_ISREG(st.st_mode) || size_is_meaningless(fd)) {
        send_error(c, id, EINVAL, "%s: not a regular file with a size", path);
    } else {
        hand_over_file(c, id, fd, (uint64_t)st.st_size, st.st_mode & 07777);
        fd = -1;
    }
    if (fd >= 0) close(fd);
    free(path);
}

/* FILE_OPENED with `fd` (taken over: closed once the frame carrying it is sent). */
static void hand_over_file(struct conn *c, uint32_t id, int fd, uint64_t size, uint32_t mode) {
    if (conn_queue_fd(c, fd) < 0) { /* cannot happen: do_open_file counted it */
        close(fd);
        send_error(c, id, EAGAIN, "too many descriptors queued on this control connection");
        return;
    }
    uint8_t info[FILE_INFO_SIZE];
    put64(info, size);
    put32(info + 8, mode);
    send_frame(c, F_FILE_OPENED, id, info, sizeof info);
}

void do_write_data(struct conn *c, uint32_t id, const uint8_t *p, size_t n) {
    struct wfile **pp = wfile_find(c, id);
    if (!*pp) return;
    if (write_all((*pp)->fd, p, n) < 0) {
        send_error(c, id, errno, "%s: %s", (*pp)->path, strerror(errno));
        wfile_drop(c, pp, 0);
        return;
    }
    (*pp)->written += n;
}

/* A write through a pipe (OPEN_THROUGH_PIPE): the service hands the pipe's write end over and
 * this process, which runs in the sandbox's cgroups, moves the bytes into the temporary file
 * (write_pipe_drain), so that the file's pages count against the sandbox's memory exactly as
 * WRITE_DATA's do, and a full memory or disk fails the write as it fails WRITE_DATA. The pipe
 * is non-blocking at both ends; it is this process's own, so no host descriptor enters the
 * sandbox. Returns the write end (the caller hands it over), or -1 (errno). */
static int write_pipe_open(struct wfile *f) {
    int p[2];
    if (pipe2(p, O_CLOEXEC | O_NONBLOCK) < 0) return -1;
    (void)fcntl(p[1], F_SETPIPE_SZ, WRITE_PIPE_SIZE); /* refused above pipe-max-size: smaller */
    watch_init(&f->pipe, p[0], W_WRITE_PIPE, f);
    watch_set(&f->pipe, EPOLLIN);
    f->piped = 1;
    return p[1];
}

static void write_finish(struct conn *c, struct wfile **pp);

/* Moves what the pipe of write `f` holds into its file: at most WRITE_PIPE_STEP per turn of the
 * loop (epoll calls again while more is there; other connections are served meanwhile), and
 * never more than one byte past the declared size. At the pipe's EOF (every write end closed)
 * a write whose WRITE_END came is finished. A failure (a full memory or disk, more bytes than
 * declared) ends the write at once: its ERROR is sent (the service reads it when it sends
 * WRITE_END), the temporary file removed and the read end closed, so that a client still
 * writing gets EPIPE. */
void write_pipe_drain(struct wfile *f) {
    struct conn *c = f->c;
    size_t moved = 0;
    while (moved < WRITE_PIPE_STEP && f->pipe.fd >= 0) {
        size_t want = WRITE_PIPE_STEP - moved;
        if (f->declared - f->written < want) want = (size_t)(f->declared - f->written) + 1;
        ssize_t n = splice(f->pipe.fd, NULL, f->fd, NULL, want, SPLICE_F_NONBLOCK);
        if (n > 0) {
            moved += (size_t)n;
            f->written += (uint64_t)n;
            if (f->written <= f->declared) continue;
            send_error(c, f->id, EFBIG, "%s: more bytes arrived than the %llu declared",
                       f->path, (unsigned long long)f->declared);
        } else if (n < 0 && errno == EINTR) {
            continue;
        } else if (n < 0 && errno == EAGAIN) {
            return;
        } else if (n == 0) {
            f->pipe_eof = 1;
            watch_close(&f->pipe);
            if (f->ending) write_finish(c, wfile_find(c, f->id));
            return;
        } else {
            send_error(c, f->id, errno, "%s: %s", f->path, strerror(errno));
        }
        wfile_drop(c, wfile_find(c, f->id), 0);
        return;
    }
}

/* WRITE_END: the file is renamed into place and WRITE_OK answers its size. A write through a
 * pipe is answered once the pipe's EOF came (the client closed its end before the service sent
 * WRITE_END, so only what is in the pipe is left to move); one with a declared size
 * (OPEN_THROUGH_PIPE) is renamed only when exactly that many bytes arrived. */
void do_write_end(struct conn *c, uint32_t id) {
    struct wfile **pp = wfile_find(c, id), *f = *pp;
    if (!f) return;
    if (f->piped && !f->pipe_eof) {
        f->ending = 1;
        write_pipe_drain(f); /* may finish (or drop) it */
        return;
    }
    write_finish(c, pp);
}

static void write_finish(struct conn *c, struct wfile **pp) {
    struct wfile *f = *pp;
    uint32_t id = f->id;
    if (f->by_descriptor && !f->piped) { /* the bytes came through the descriptor */
        struct stat st;
        f->written = fstat(f->fd, &st) == 0 ? (uint64_t)st.st_size : 0;
    }
    if (f->sized && f->written != f->declared) {
        send_error(c, id, EIO, "%s: incomplete write: %llu of %llu bytes", f->path,
                   (unsigned long long)f->written, (unsigned long long)f->declared);
        wfile_drop(c, pp, 0);
        return;
    }
    if (f->set_mtime) {
        struct timespec ts[2] = {{.tv_nsec = UTIME_OMIT},
                                 {.tv_sec = (time_t)(f->mtime_ns / 1000000000u),
                                  .tv_nsec = (long)(f->mtime_ns % 1000000000u)}};
        (void)futimens(f->fd, ts); /* a time the file system cannot keep is not an error */
    }
    int rc = close(f->fd);
    f->fd = -1;
    if (rc < 0 || renameat(f->dirfd, f->tmp, f->dirfd, f->base) < 0) {
        send_error(c, id, errno, "%s: %s", f->path, strerror(errno));
        wfile_drop(c, pp, 0);
        return;
    }
    uint8_t v[8];
    put64(v, f->written);
    send_frame(c, F_WRITE_OK, id, v, 8);
    wfile_drop(c, pp, 1);
}
