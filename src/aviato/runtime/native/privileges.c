/*
 * Credentials of an aviato sandbox (see privileges.h and docs/security.md).
 *
 * When the service runs as root, every sandbox gets a user namespace of its own, mapped to a
 * range of unprivileged host ids that no other sandbox and no host user has. Its processes are
 * then never host root, and the kernel's per-user counters (inotify instances, pipe buffers,
 * RLIMIT_NPROC, keys) are the sandbox's own. Inside, the supervisor is the namespace's uid 0
 * with a few capabilities *in that namespace* (never on the host), which it uses only to start
 * each command as the right user:
 *
 *   - an ordinary command runs as the sandbox's user (uid 0 or the image's `User`) with no
 *     capability at all, an empty bounding set and no ambient set (and no_new_privs from
 *     bubblewrap, so nothing it executes can gain one);
 *   - a protected command runs as a uid of its own (no image uses it) keeping only
 *     CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH, so it can read and write the sandbox's files as
 *     the sandbox's root could, while nothing else in the sandbox can signal it, ptrace it, or
 *     open its /proc files, descriptors or memory: the kernel allows those only to the same uid
 *     or to a holder of CAP_KILL / CAP_SYS_PTRACE, which no other process has.
 *
 * Everything here that runs in a vfork child uses raw system calls only.
 */
#define _GNU_SOURCE
#include "privileges.h"

#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <grp.h>
#include <linux/capability.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#ifndef PR_CAP_AMBIENT
#define PR_CAP_AMBIENT 47
#define PR_CAP_AMBIENT_RAISE 2
#define PR_CAP_AMBIENT_CLEAR_ALL 4
#endif
#ifndef SYS_open_tree
#define SYS_open_tree 428
#endif
#ifndef SYS_move_mount
#define SYS_move_mount 429
#endif
#ifndef SYS_mount_setattr
#define SYS_mount_setattr 442
#endif
#define OPEN_TREE_CLONE_ 1
#define MOVE_MOUNT_F_EMPTY_PATH_ 0x4
#define MOUNT_ATTR_RDONLY_ 0x1
#define MOUNT_ATTR_NOSUID_ 0x2
#define MOUNT_ATTR_NODEV_ 0x4
#define MOUNT_ATTR_IDMAP_ 0x100000

struct mount_attr_ {
    uint64_t attr_set, attr_clr, propagation, userns_fd;
};

#define BIT(c) (1ull << (c))
/* What the supervisor keeps (permitted): switching ids, dropping the bounding set, signalling
 * commands of other uids, and the two capabilities it hands to protected commands. */
#define SUPERVISOR_CAPS                                                                     \
    (BIT(CAP_SETUID) | BIT(CAP_SETGID) | BIT(CAP_SETPCAP) | BIT(CAP_KILL) |                 \
     BIT(CAP_DAC_OVERRIDE) | BIT(CAP_DAC_READ_SEARCH))
#define PROTECTED_CAPS (BIT(CAP_DAC_OVERRIDE) | BIT(CAP_DAC_READ_SEARCH))
/* At start only: giving the writable layer to a sandbox user other than root. */
#define START_CAPS (SUPERVISOR_CAPS | BIT(CAP_CHOWN))
#define LAST_CAP 63

/* ---- capabilities (raw system calls) ---- */

static int caps_get(uint64_t *eff, uint64_t *prm) {
    struct __user_cap_header_struct h = {_LINUX_CAPABILITY_VERSION_3, 0};
    struct __user_cap_data_struct d[2];
    if (syscall(SYS_capget, &h, d) < 0) return -1;
    *eff = d[0].effective | (uint64_t)d[1].effective << 32;
    *prm = d[0].permitted | (uint64_t)d[1].permitted << 32;
    return 0;
}

static int caps_set(uint64_t eff, uint64_t prm, uint64_t inh) {
    struct __user_cap_header_struct h = {_LINUX_CAPABILITY_VERSION_3, 0};
    struct __user_cap_data_struct d[2] = {
        {(uint32_t)eff, (uint32_t)prm, (uint32_t)inh},
        {(uint32_t)(eff >> 32), (uint32_t)(prm >> 32), (uint32_t)(inh >> 32)},
    };
    return (int)syscall(SYS_capset, &h, d);
}

/* Drops every capability of `have` outside `keep` from the bounding set (needs CAP_SETPCAP). */
static int bounding_keep(uint64_t have, uint64_t keep) {
    for (int c = 0; c <= LAST_CAP; c++) {
        if ((keep & BIT(c)) || !(have & BIT(c))) continue;
        if (syscall(SYS_prctl, PR_CAPBSET_DROP, c, 0, 0, 0) < 0 && errno != EINVAL) return -1;
    }
    return 0;
}

static int become_ids(uid_t uid, gid_t gid) {
    if (syscall(SYS_setgroups, 1, &gid) < 0) return -1;
    if (syscall(SYS_setresgid, gid, gid, gid) < 0) return -1;
    return (int)syscall(SYS_setresuid, uid, uid, uid);
}

static uint64_t g_permitted; /* the supervisor's, read by vfork children (shared memory) */
static uid_t g_owner_uid;
static gid_t g_owner_gid;

static int give(const char *path, const struct stat *st, int type, struct FTW *ftw) {
    (void)st, (void)type, (void)ftw;
    lchown(path, g_owner_uid, g_owner_gid); /* best effort: e.g. read-only bind targets */
    return 0;
}

/* The writable layer (the tmpfs at /, as bubblewrap left it: directories, mount points and
 * symlinks) belongs to the sandbox's user, as it did when bubblewrap made the user namespace
 * for that user alone. Filesystems mounted on it (the image's read-only trees, /proc, /dev)
 * are not entered. */
static void give_writable_layer(const struct sandbox_user *user) {
    g_owner_uid = user->uid, g_owner_gid = user->gid;
    nftw("/", give, 16, FTW_PHYS | FTW_MOUNT);
}

int priv_supervisor_init(const struct sandbox_user *user) {
    uint64_t eff, prm;
    if (caps_get(&eff, &prm) < 0) return -1;
    if ((prm & START_CAPS) != START_CAPS) {
        errno = EPERM;
        return -1;
    }
    if (caps_set(prm, prm, 0) < 0) return -1;
    if (user->uid != 0) give_writable_layer(user);
    if (syscall(SYS_prctl, PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) < 0) return -1;
    if (bounding_keep(~0ull, SUPERVISOR_CAPS) < 0) return -1;
    /* File operations (reads and writes the service asks for) as the sandbox's user. */
    gid_t g = user->gid;
    if (syscall(SYS_setgroups, 1, &g) < 0) return -1;
    syscall(SYS_setfsgid, user->gid);
    syscall(SYS_setfsuid, user->uid);
    if ((uid_t)syscall(SYS_setfsuid, -1) != user->uid) {
        errno = EPERM;
        return -1;
    }
    g_permitted = SUPERVISOR_CAPS;
    return caps_set(BIT(CAP_KILL), SUPERVISOR_CAPS, 0);
}

int priv_child_become(const struct sandbox_user *user, int protected) {
    uint64_t keep = protected ? PROTECTED_CAPS : 0;
    if (caps_set(g_permitted, g_permitted, keep) < 0) return -1;
    /* The supervisor's bounding set is SUPERVISOR_CAPS already: a few calls, not 64. */
    if (bounding_keep(SUPERVISOR_CAPS, keep) < 0) return -1;
    if (syscall(SYS_prctl, PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) < 0) return -1;
    if (protected && syscall(SYS_prctl, PR_SET_KEEPCAPS, 1, 0, 0, 0) < 0) return -1;
    uid_t uid = protected ? user->protected_id : user->uid;
    gid_t gid = protected ? (gid_t)user->protected_id : user->gid;
    if (become_ids(uid, gid) < 0) return -1;
    if (caps_set(keep, keep, keep) < 0) return -1;
    for (int c = 0; c <= LAST_CAP; c++)
        if ((keep & BIT(c)) &&
            syscall(SYS_prctl, PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, c, 0, 0) < 0)
            return -1;
    return 0;
}

/* ---- the launcher's user namespace ---- */

static int write_text(const char *path, const char *text) {
    int fd = open(path, O_WRONLY | O_CLOEXEC);
    if (fd < 0) return -1;
    ssize_t n = write(fd, text, strlen(text));
    int err = errno;
    close(fd);
    errno = err;
    return n == (ssize_t)strlen(text) ? 0 : -1;
}

/* Attaches an id-mapped (through `userns`), nosuid, nodev clone of the mount at `from` at `at`:
 * read-only (the state directory) or writable (the service's volumes; a sandbox's layer, a
 * filesystem of its own mounted by the service). */
static int stage_idmapped(int userns, const char *from, const char *at, int writable,
                          const char **what) {
    *what = "cloning a mount to stage (open_tree)";
    int tree = (int)syscall(SYS_open_tree, AT_FDCWD, from, OPEN_TREE_CLONE_ | O_CLOEXEC);
    if (tree < 0) return errno;
    struct mount_attr_ attr = {
        .attr_set = MOUNT_ATTR_IDMAP_ | MOUNT_ATTR_NOSUID_ | MOUNT_ATTR_NODEV_ |
                    (writable ? 0 : MOUNT_ATTR_RDONLY_),
        .userns_fd = (uint64_t)userns,
    };
    *what = "id-mapping a staged mount (mount_setattr; does its filesystem support "
            "id-mapped mounts?)";
    if (syscall(SYS_mount_setattr, tree, "", AT_EMPTY_PATH, &attr, sizeof attr) < 0) {
        int err = errno;
        close(tree);
        return err;
    }
    *what = "attaching a staged mount (move_mount)";
    int rc = syscall(SYS_move_mount, tree, "", AT_FDCWD, at, MOVE_MOUNT_F_EMPTY_PATH_) < 0
                 ? errno : 0;
    close(tree);
    return rc;
}

/* In the helper (host root, in the launcher's mount namespace): maps the launcher's new user
 * namespace and stages the id-mapped views. Returns 0 or an errno, with `what` saying which
 * step failed. */
static int map_and_stage(pid_t target, unsigned long base, unsigned long count,
                         const struct staging *st, const char **what) {
    const char *from = st->stage_from;
    char path[64], map[96];
    snprintf(map, sizeof map, "0 %lu %lu\n", base, count);
    snprintf(path, sizeof path, "/proc/%d/uid_map", (int)target);
    *what = "writing uid_map";
    if (write_text(path, map) < 0) return errno;
    snprintf(path, sizeof path, "/proc/%d/gid_map", (int)target);
    *what = "writing gid_map";
    if (write_text(path, map) < 0) return errno;
    if (!from) return 0;
    snprintf(path, sizeof path, "/proc/%d/ns/user", (int)target);
    *what = "opening the user namespace";
    int userns = open(path, O_RDONLY | O_CLOEXEC);
    if (userns < 0) return errno;
    int rc = stage_idmapped(userns, from, st->stage_at, 0, what);
    if (!rc && st->volumes_from)
        rc = stage_idmapped(userns, st->volumes_from, st->volumes_at, 1, what);
    if (!rc && st->layer_from) rc = stage_idmapped(userns, st->layer_from, st->layer_at, 1, what);
    for (int i = 0; !rc && i < st->volumes; i++)
        rc = stage_idmapped(userns, st->volume_from[i], st->volume_at[i], 1, what);
    close(userns);
    /* Every sandbox's layer (and every volume filesystem) is mounted under a `detach` tree:
     * without this, this mount namespace would keep a copy of each and pin it (and its loop
     * device) until this sandbox ends. */
    if (!rc) *what = "detaching the other sandboxes' layers and volumes";
    for (int i = 0; !rc && i < st->detaches; i++)
        if (umount2(st->detach[i], MNT_DETACH) < 0 && errno != EINVAL) rc = errno;
    if (!rc && st->prog) trim_mounts(st->prog);
    return rc;
}

/* On the host, as root: becomes host uid and gid `base` (the sandbox's uid 0), keeping only
 * CAP_SYS_ADMIN for the unshare(CLONE_NEWUSER) that follows. The namespace is then *owned* by
 * `base`, not by root: the kernel charges what a namespace's processes use of per-user limits
 * (inotify instances, RLIMIT_NPROC, ...) to its owner at every level above it, so a namespace
 * owned by root would draw on host root's allowances. Returns 0 or an errno. */
static int become_owner(unsigned long base, const char **what) {
    gid_t none = 0;
    *what = "keeping capabilities across the uid change";
    if (syscall(SYS_prctl, PR_SET_KEEPCAPS, 1, 0, 0, 0) < 0) return errno;
    *what = "becoming the range's host uid";
    if (setgroups(0, &none) < 0 || setresgid((gid_t)base, (gid_t)base, (gid_t)base) < 0 ||
        setresuid((uid_t)base, (uid_t)base, (uid_t)base) < 0)
        return errno;
    *what = "keeping CAP_SYS_ADMIN";
    if (caps_set(BIT(CAP_SYS_ADMIN), BIT(CAP_SYS_ADMIN), 0) < 0) return errno;
    return 0;
}

int priv_enter_userns(unsigned long base, unsigned long count, const struct staging *st) {
    if (st->stage_from) {
        if (unshare(CLONE_NEWNS) < 0) {
            fprintf(stderr, "aviato-supervisor: unshare(mount namespace): %s\n",
                    strerror(errno));
            return -1;
        }
        if (mount(NULL, "/", NULL, MS_REC | MS_PRIVATE, NULL) < 0) {
            fprintf(stderr, "aviato-supervisor: making mounts private: %s\n", strerror(errno));
            return -1;
        }
    }
    int go[2];
    if (pipe2(go, O_CLOEXEC) < 0) return -1;
    pid_t self = getpid();
    pid_t helper = fork();
    if (helper < 0) return -1;
    if (helper == 0) {
        char c;
        close(go[1]);
        int result = EPIPE;
        const char *what = "waiting for the launcher";
        if (read(go[0], &c, 1) == 1)
            result = map_and_stage(self, base, count, st, &what);
        if (result)
            fprintf(stderr, "aviato-supervisor: %s: %s\n", what, strerror(result));
        _exit(result ? 1 : 0);
    }
    close(go[0]);
    int status = 0;
    const char *what = "";
    int err = become_owner(base, &what);
    if (!err && unshare(CLONE_NEWUSER) < 0) err = errno, what = "unshare(user namespace)";
    if (!err && write(go[1], "x", 1) != 1) err = errno, what = "waking the helper";
    close(go[1]);
    while (waitpid(helper, &status, 0) < 0 && errno == EINTR) {}
    if (err) {
        fprintf(stderr, "aviato-supervisor: %s: %s\n", what, strerror(err));
        return -1;
    }
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) return -1;
    gid_t root = 0;
    syscall(SYS_prctl, PR_SET_KEEPCAPS, 0, 0, 0, 0);
    if (setgroups(0, &root) < 0 || setresgid(0, 0, 0) < 0 || setresuid(0, 0, 0) < 0) {
        fprintf(stderr, "aviato-supervisor: becoming the namespace's root: %s\n",
                strerror(errno));
        return -1;
    }
    return 0;
}
