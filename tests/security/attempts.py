"""Escape attempts, run *inside* a sandbox: `python3 attempts.py NAME [ARGS...]`.

Uploaded into the sandbox by tests/security/test_escape.py. Each attempt really tries (libc
calls through ctypes, files, sockets) and prints one JSON line:
`{"name": ..., "escaped": bool, "details": [...]}`: `escaped` is true when an attempt that must
fail succeeded from the sandbox's point of view. The test then also checks the host's side (a
listener that counts connections, a host process that must still be alive, the host's clock
and hostname).

With `--as UID` the attempt first drops to that uid and gid (setresgid/setresuid); the line says
whether that was possible (`"dropped"`), since a sandbox without CAP_SETUID cannot.
Only the standard library; Python 3.8+.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import json
import os
import platform
import resource
import signal
import socket
import sys
import time

libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)

# Syscall numbers that libc may not wrap (x86_64, aarch64).
SYSCALLS = {
    "x86_64": {
        "bpf": 321,
        "perf_event_open": 298,
        "kexec_load": 246,
        "userfaultfd": 323,
        "io_uring_setup": 425,
        "pidfd_getfd": 438,
        "open_by_handle_at": 304,
        "keyctl": 250,
    },
    "aarch64": {
        "bpf": 280,
        "perf_event_open": 241,
        "kexec_load": 104,
        "userfaultfd": 282,
        "io_uring_setup": 425,
        "pidfd_getfd": 438,
        "open_by_handle_at": 265,
        "keyctl": 219,
    },
}
CLONE_NEWNS, CLONE_NEWUSER, CLONE_NEWNET, CLONE_NEWPID = 0x20000, 0x10000000, 0x40000000, 0x20000000
PTRACE_TRACEME, PTRACE_ATTACH = 0, 16


class Attempt:
    def __init__(self, name: str) -> None:
        self.name = name
        self.escaped = False
        self.details: list[str] = []

    def note(self, text: str) -> None:
        self.details.append(text[:300])

    def succeeded(self, text: str) -> None:
        """Something that must fail worked."""
        self.escaped = True
        self.note("ESCAPED: " + text)

    def call(self, what: str, rc: int) -> None:
        """A libc call that must fail: rc -1 with an errno is expected."""
        if rc == -1:
            self.note(f"{what}: {errno.errorcode.get(ctypes.get_errno(), ctypes.get_errno())}")
        else:
            self.succeeded(f"{what} returned {rc}")


def _syscall(name: str, *args: int) -> int:
    nr = SYSCALLS.get(platform.machine(), {}).get(name)
    if nr is None:
        return -1
    return int(libc.syscall(ctypes.c_long(nr), *[ctypes.c_long(a) for a in args]))


# --- files ------------------------------------------------------------------------------------


def find_canary(a: Attempt, canary: str, *paths: str) -> None:
    """Reads every path (files; directories recursively, not following symlinks) looking for
    `canary` in a name or in the first MiB of a file."""
    needle = canary.encode()
    budget = [20000]

    def look_file(path: str) -> None:
        try:
            with open(path, "rb") as f:
                data = f.read(1 << 20)
        except OSError as e:
            a.note(f"{path}: {errno.errorcode.get(e.errno or 0, e)}")
            return
        if needle in data:
            a.succeeded(f"found the canary in {path}")

    def walk(path: str) -> None:
        for root, dirs, files in os.walk(path, onerror=lambda e: a.note(f"walk {e}")):
            for name in dirs + files:
                if canary in name:
                    a.succeeded(f"found a file named with the canary: {root}/{name}")
            for name in files:
                budget[0] -= 1
                if budget[0] > 0:
                    look_file(os.path.join(root, name))

    for path in paths:
        if not os.path.lexists(path):
            a.note(f"{path}: absent")
        elif os.path.isdir(path) and not os.path.islink(path):
            walk(path)
        else:
            look_file(path)


def find_name(a: Attempt, name: str, *roots: str) -> None:
    """Walks the whole filesystem (but /proc and /sys) looking for a file or directory named
    `name`: another sandbox's file, the service's registry.db or socket."""
    for top in roots or ("/",):
        for root, dirs, files in os.walk(top):
            if root == "/":
                dirs[:] = [d for d in dirs if d not in ("proc", "sys")]
            if name in dirs or name in files:
                a.succeeded(f"{root}/{name} exists in the sandbox")
    a.note(f"walked {roots or ('/',)} for {name!r}")


def shadow(a: Attempt) -> None:
    for path in ("/etc/shadow", "/etc/gshadow", "/etc/shadow-", "/etc/gshadow-"):
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            a.note(f"{path}: {errno.errorcode.get(e.errno or 0, e)}")
            continue
        if b":" in data:
            a.succeeded(f"{path} has {len(data)} bytes of entries")
        else:
            a.note(f"{path}: {len(data)} bytes")
    if os.path.isdir("/etc/ssl/private") and os.listdir("/etc/ssl/private"):
        a.succeeded("/etc/ssl/private lists " + ",".join(os.listdir("/etc/ssl/private")))


def proc_environ(a: Attempt, canary: str) -> None:
    """The host's /proc/1/environ and the service's environment: the canary is in the
    service's environment; no /proc entry visible here may contain it."""
    with open("/proc/1/cmdline", "rb") as f:
        cmdline = f.read().split(b"\0")[0]
    if cmdline != b"/.aviato/supervisor":
        a.succeeded(f"/proc/1 is {cmdline!r}, not the sandbox's supervisor")
    pids = [p for p in os.listdir("/proc") if p.isdigit() and int(p) != os.getpid()]
    a.note(f"{len(pids)} pids visible")
    for pid in pids:
        for what in ("environ", "cmdline"):
            try:
                with open(f"/proc/{pid}/{what}", "rb") as f:
                    if canary.encode() in f.read():
                        a.succeeded(f"/proc/{pid}/{what} holds the service's canary")
            except OSError as e:
                a.note(f"/proc/{pid}/{what}: {errno.errorcode.get(e.errno or 0, e)}")
    # The supervisor's inherited descriptors (control socket, log, exit file).
    for fd in ("3", "4", "5"):
        try:
            os.open(f"/proc/1/fd/{fd}", os.O_RDONLY)
            a.succeeded(f"opened /proc/1/fd/{fd}")
        except OSError as e:
            a.note(f"/proc/1/fd/{fd}: {errno.errorcode.get(e.errno or 0, e)}")


# --- processes --------------------------------------------------------------------------------


def see_processes(a: Attempt, *markers: str) -> None:
    for pid in (p for p in os.listdir("/proc") if p.isdigit() and int(p) != os.getpid()):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                text = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        for marker in markers:
            if marker in text:
                a.succeeded(f"pid {pid} ({text[:80]}) is visible")


def signal_pids(a: Attempt, *pids: str) -> None:
    """Signals host pids (they name other processes in this pid namespace, if any)."""
    for text in pids:
        pid = int(text)
        for signo in (0, signal.SIGKILL):
            try:
                os.kill(pid, signo)
                a.note(f"kill({pid}, {signo}) returned 0 (a pid of this namespace?)")
            except OSError as e:
                a.note(f"kill({pid}, {signo}): {errno.errorcode.get(e.errno or 0, e)}")
    a.note("the host checks that the targets are alive")


# --- network ----------------------------------------------------------------------------------


def connect(a: Attempt, *targets: str) -> None:
    """TCP to HOST:PORT (IPv6 as [addr]:port); 'unix:PATH' and 'abstract:NAME' unix sockets;
    'udp:HOST:PORT' sends a datagram (the host counts what arrives)."""
    for target in targets:
        try:
            if target.startswith("unix:") or target.startswith("abstract:"):
                kind, _, name = target.partition(":")
                address = ("\0" + name) if kind == "abstract" else name
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                    s.settimeout(2)
                    s.connect(address)
                    a.succeeded(f"connected to {target}")
                continue
            udp = target.startswith("udp:")
            host, _, port = target.removeprefix("udp:").rpartition(":")
            host = host.strip("[]")
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            kind = socket.SOCK_DGRAM if udp else socket.SOCK_STREAM
            with socket.socket(family, kind) as s:
                s.settimeout(2)
                if udp:
                    s.sendto(b"escape", (host, int(port)))
                    a.note(f"sent a datagram to {target} (the host counts arrivals)")
                else:
                    s.connect((host, int(port)))
                    a.succeeded(f"connected to {target}")
        except OSError as e:
            a.note(f"{target}: {errno.errorcode.get(e.errno or 0, type(e).__name__)}")
    with contextlib.suppress(OSError):
        a.note("interfaces: " + ",".join(name for _, name in socket.if_nameindex()))


# --- privileged operations --------------------------------------------------------------------


def kernel(a: Attempt) -> None:
    os.makedirs("/tmp/mnt", exist_ok=True)
    a.call("mount tmpfs", libc.mount(b"none", b"/tmp/mnt", b"tmpfs", 0, None))
    a.call("mount proc", libc.mount(b"proc", b"/tmp/mnt", b"proc", 0, None))
    a.call("mount cgroup", libc.mount(b"cgroup", b"/tmp/mnt", b"cgroup", 0, b"memory"))
    a.call("remount / rw", libc.mount(None, b"/usr", None, 0x20 | 0x1000, None))  # MS_REMOUNT|BIND
    a.call("umount /proc", libc.umount2(b"/proc", 2))
    for flag, name in (
        (CLONE_NEWUSER, "user"),
        (CLONE_NEWNS, "mnt"),
        (CLONE_NEWNET, "net"),
        (CLONE_NEWPID, "pid"),
    ):
        a.call(f"unshare({name})", libc.unshare(flag))
    for ns in ("net", "mnt", "pid", "user", "uts"):
        try:
            fd = os.open(f"/proc/1/ns/{ns}", os.O_RDONLY)
        except OSError as e:
            a.note(f"open /proc/1/ns/{ns}: {errno.errorcode.get(e.errno or 0, e)}")
            continue
        a.call(f"setns({ns})", libc.setns(fd, 0))
        os.close(fd)
    a.call("chroot", libc.chroot(b"/tmp"))
    a.call("mknod block device", libc.mknod(b"/tmp/sda", 0o60600, os.makedev(8, 0)))
    a.call("bpf", _syscall("bpf", 0, 0, 0))
    a.call("perf_event_open", _syscall("perf_event_open", 0, 0, -1, -1, 0))
    a.call("kexec_load", _syscall("kexec_load", 0, 0, 0, 0))
    a.call("keyctl", _syscall("keyctl", 0, 0, 0, 0, 0))
    a.call("open_by_handle_at", _syscall("open_by_handle_at", -100, 0, 0))
    a.call("io_uring_setup", _syscall("io_uring_setup", 1, 0))


def ptrace(a: Attempt) -> None:
    child = os.fork()
    if child == 0:
        time.sleep(30)
        os._exit(0)
    try:
        libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
        a.call(f"ptrace(ATTACH, {child})", libc.ptrace(PTRACE_ATTACH, child, None, None))
        a.call("ptrace(ATTACH, 1)", libc.ptrace(PTRACE_ATTACH, 1, None, None))
        buf = ctypes.create_string_buffer(16)

        class IoVec(ctypes.Structure):
            _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]

        local = IoVec(ctypes.cast(buf, ctypes.c_void_p), 16)
        remote = IoVec(0x400000, 16)
        libc.process_vm_readv.restype = ctypes.c_ssize_t
        a.call(
            "process_vm_readv",
            int(libc.process_vm_readv(child, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0)),
        )
        try:
            with open(f"/proc/{child}/mem", "rb") as f:
                f.seek(0x400000)
                f.read(16)
            a.note(f"/proc/{child}/mem readable (own child, same uid: allowed by the kernel)")
        except OSError as e:
            a.note(f"/proc/{child}/mem: {errno.errorcode.get(e.errno or 0, e)}")
    finally:
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)
    pid = os.fork()
    if pid == 0:
        rc = libc.ptrace(PTRACE_TRACEME, 0, None, None)
        os._exit(0 if rc == -1 else 1)
    _, status = os.waitpid(pid, 0)
    if os.WEXITSTATUS(status) != 0:
        a.succeeded("ptrace(TRACEME) worked")
    else:
        a.note("ptrace(TRACEME): refused")


def modules(a: Attempt) -> None:
    libc.init_module.argtypes = [ctypes.c_void_p, ctypes.c_ulong, ctypes.c_char_p]
    image = ctypes.create_string_buffer(b"\x7fELF" + b"\0" * 60)
    a.call("init_module", libc.init_module(image, 64, b""))
    fd = os.open("/dev/null", os.O_RDONLY)
    a.call(
        "finit_module",
        int(
            libc.syscall(ctypes.c_long(313 if platform.machine() == "x86_64" else 273), fd, b"", 0)
        ),
    )
    os.close(fd)
    a.call(
        "delete_module(ext4)",
        int(
            libc.syscall(ctypes.c_long(176 if platform.machine() == "x86_64" else 106), b"ext4", 0)
        ),
    )
    if os.path.exists("/proc/sys/kernel/modprobe"):
        try:
            with open("/proc/sys/kernel/modprobe", "w") as f:
                f.write("/tmp/evil")
            a.succeeded("wrote /proc/sys/kernel/modprobe")
        except OSError as e:
            a.note(f"/proc/sys/kernel/modprobe: {errno.errorcode.get(e.errno or 0, e)}")


def clock_and_hostname(a: Attempt) -> None:
    class Timespec(ctypes.Structure):
        _fields_ = [("sec", ctypes.c_long), ("nsec", ctypes.c_long)]

    class Timeval(ctypes.Structure):
        _fields_ = [("sec", ctypes.c_long), ("usec", ctypes.c_long)]

    future = int(time.time()) + 86400 * 365
    a.call("clock_settime", libc.clock_settime(0, ctypes.byref(Timespec(future, 0))))
    a.call("settimeofday", libc.settimeofday(ctypes.byref(Timeval(future, 0)), None))
    a.call("stime-like adjtimex", libc.adjtimex(ctypes.byref((ctypes.c_char * 256)(b"\x01"))))
    a.call("sethostname", libc.sethostname(b"escaped", 7))
    a.call("setdomainname", libc.setdomainname(b"escaped", 7))
    for path, value in (
        ("/proc/sys/kernel/hostname", "escaped"),
        ("/proc/sys/kernel/core_pattern", "|/tmp/evil"),
        ("/proc/sys/vm/drop_caches", "3"),
        ("/proc/sysrq-trigger", "h"),
    ):
        try:
            with open(path, "w") as f:
                f.write(value)
            a.succeeded(f"wrote {path}")
        except OSError as e:
            a.note(f"{path}: {errno.errorcode.get(e.errno or 0, e)}")
    if socket.gethostname() != "sandbox":
        a.note(f"hostname inside is {socket.gethostname()!r}")


def rlimits(a: Attempt) -> None:
    for name in (
        "RLIMIT_NOFILE",
        "RLIMIT_NPROC",
        "RLIMIT_AS",
        "RLIMIT_CORE",
        "RLIMIT_MEMLOCK",
        "RLIMIT_STACK",
        "RLIMIT_FSIZE",
    ):
        which = getattr(resource, name)
        _, hard = resource.getrlimit(which)
        if hard == resource.RLIM_INFINITY:
            a.note(f"{name}: hard limit already unlimited")
            continue
        try:
            resource.setrlimit(which, (hard + 1, hard + 1))
            a.succeeded(f"raised {name} above its hard limit {hard}")
        except (ValueError, OSError) as e:
            a.note(f"{name} (hard {hard}): {e}")
    libc.setpriority.argtypes = [ctypes.c_int, ctypes.c_uint, ctypes.c_int]
    a.call("setpriority(-20)", libc.setpriority(0, 0, -20))
    try:
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write("-1000")
        a.succeeded("lowered oom_score_adj to -1000")
    except OSError as e:
        a.note(f"oom_score_adj: {errno.errorcode.get(e.errno or 0, e)}")


def uid(a: Attempt) -> None:
    """Reports the credentials; gaining uid 0 or capabilities counts as an escape."""
    with open("/proc/self/status") as f:
        status = {k: v.strip() for k, v in (ln.split(":", 1) for ln in f if ":" in ln)}
    a.note(
        f"uid {status['Uid']} caps {status['CapEff']} seccomp {status.get('Seccomp')} "
        f"no_new_privs {status.get('NoNewPrivs')}"
    )
    if int(status["CapEff"], 16) or int(status["CapPrm"], 16):
        a.succeeded(f"has capabilities {status['CapEff']}")
    if os.getuid() != 0:
        try:
            os.setresuid(0, 0, 0)
            a.succeeded("became uid 0")
        except OSError as e:
            a.note(f"setresuid(0): {errno.errorcode.get(e.errno or 0, e)}")


# --- staying alive ----------------------------------------------------------------------------


SLEEPER = (
    "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
    "signal.signal(signal.SIGHUP, signal.SIG_IGN); time.sleep(86400)"
)


def daemonize(a: Attempt, marker: str) -> None:
    """Leaves processes behind in every classic way (each ignores SIGTERM and SIGHUP and has
    `marker` in its command line); the host checks they die with the sandbox."""
    py = sys.executable
    os.system(f"nohup {py} -c '{SLEEPER}' {marker}-nohup >/dev/null 2>&1 &")
    os.system(f"setsid {py} -c '{SLEEPER}' {marker}-setsid >/dev/null 2>&1 < /dev/null &")
    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:
            for fd in (0, 1, 2):
                os.close(fd)
            os.execv(py, [py, "-c", SLEEPER, f"{marker}-double"])
        os._exit(0)
    time.sleep(0.5)
    a.note("started nohup, setsid and double-forked daemons")


ATTEMPTS = {
    "find_canary": find_canary,
    "find_name": find_name,
    "shadow": shadow,
    "proc_environ": proc_environ,
    "see_processes": see_processes,
    "signal_pids": signal_pids,
    "connect": connect,
    "kernel": kernel,
    "ptrace": ptrace,
    "modules": modules,
    "clock_and_hostname": clock_and_hostname,
    "rlimits": rlimits,
    "uid": uid,
    "daemonize": daemonize,
}


def main() -> None:
    args = sys.argv[1:]
    dropped = None
    if args[:1] == ["--as"]:
        target = int(args[1])
        args = args[2:]
        try:
            os.setgroups([])
            os.setresgid(target, target, target)
            os.setresuid(target, target, target)
            dropped = True
        except OSError as e:
            dropped = f"cannot drop to uid {target}: {errno.errorcode.get(e.errno or 0, e)}"
    name, rest = args[0], args[1:]
    a = Attempt(name)
    if dropped is not None and dropped is not True:
        a.note(str(dropped))
    try:
        ATTEMPTS[name](a, *rest)
    except Exception as e:  # an attempt that crashes did not escape, but say so
        a.note(f"attempt raised {type(e).__name__}: {e}")
    print(
        json.dumps(
            {
                "name": name,
                "escaped": a.escaped,
                "details": a.details,
                "dropped": dropped,
                "uid": os.getuid(),
            }
        )
    )


if __name__ == "__main__":
    main()
