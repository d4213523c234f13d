/*
 * Credentials of an aviato sandbox: its own user namespace on the host, and who each of its
 * processes runs as inside it. See privileges.c.
 */
#ifndef AVIATO_PRIVILEGES_H
#define AVIATO_PRIVILEGES_H

#include <sys/types.h>

/* Who a sandbox's processes run as (privileged mode only). */
struct sandbox_user {
    uid_t uid;          /* the sandbox's user: the image's `User`, or 0 */
    gid_t gid;
    uid_t protected_id; /* uid and gid of protected commands */
};

/* Launcher, on the host, as root: enters a new user namespace whose ids 0..count-1 are the
 * host's base..base+count-1, as its uid 0 with every capability in it. With `stage_from` set,
 * first gives this process a private mount namespace in which `stage_from` (a directory of the
 * service's, typically private to host root) is visible read-only at `stage_at`, id-mapped so
 * that the sandbox's root owns what host root owns there. The other views of `st` are staged the
 * same way but writable (still nosuid, nodev): `volumes_from` (the service's volumes) at
 * `volumes_at`, `layer_from` (a mount point: the sandbox's writable-layer filesystem, mounted by
 * the service) at `layer_at`, and each `volume_from[i]` (a mount point: a volume's own
 * filesystem, mounted by the service) at `volume_at[i]`. `detach`: mount points unmounted
 * (lazily) in that mount namespace afterwards, and then every mount `prog` (bubblewrap's command
 * line) has no use for (`trim_mounts`). Returns 0, or -1 with a message on stderr. */
#define MAX_STAGED_VOLUMES 32
#define MAX_DETACH 4
struct staging {
    const char *stage_from, *stage_at;
    const char *volumes_from, *volumes_at;
    const char *layer_from, *layer_at;
    const char *const *volume_from, *const *volume_at;
    int volumes;
    const char *const *detach;
    int detaches;
    char *const *prog;
};
int priv_enter_userns(unsigned long base, unsigned long count, const struct staging *st);

/* In the launcher's own mount namespace, as host root: detaches every mount that `prog`
 * (bubblewrap's command line) cannot reach (mount_trim.c). Returns how many it detached. */
int trim_mounts(char *const *prog);

/* Supervisor, once at start in privileged mode: checks and narrows its capabilities (keeps
 * only what starting commands as other users needs; only CAP_KILL stays effective) and makes
 * its file operations act as the sandbox's user. Returns 0, or -1 with errno set. */
int priv_supervisor_init(const struct sandbox_user *user);

/* In a new child (after vfork, before exec): becomes the sandbox's user, with no capability at
 * all, or, with `protected`, the protected id with only CAP_DAC_OVERRIDE and
 * CAP_DAC_READ_SEARCH (so it reads and writes what the sandbox's user can, while no other
 * process of the sandbox can signal, trace or open it). Raw system calls only: safe in a vfork
 * child. Returns 0, or -1 with errno set. */
int priv_child_become(const struct sandbox_user *user, int protected);

#endif
