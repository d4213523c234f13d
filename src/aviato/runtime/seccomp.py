"""The sandbox's seccomp filter: a classic-BPF deny-list, generated in pure Python.

bubblewrap's `--seccomp FD` reads an array of `struct sock_filter` (8 bytes each: u16 code,
u8 jt, u8 jf, u32 k, in the machine's byte order) from FD and installs it, with
`PR_SET_NO_NEW_PRIVS`, just before it executes the sandbox's first program. Every process of the
sandbox inherits it, the supervisor included. This module builds those bytes without libseccomp.

Policy (a deny-list; everything else is allowed, capabilities are already dropped):

- the architecture must be the one the filter was built for. Any other `AUDIT_ARCH` (i386 via
  `int 0x80` on x86_64, arm32 compat on aarch64) kills the process: a deny-list keyed on syscall
  numbers is meaningless under another numbering, and that is the classic bypass of deny-lists;
- on x86_64 the x32 ABI (syscall numbers with bit 30 set) fails with ENOSYS, as on a kernel built
  without it;
- the calls in `DENIED` fail with EPERM: mounts and namespaces, kernel modules and kexec, keyrings,
  bpf/perf, ptrace and cross-process memory access, clock and host-name changes, swap, reboot,
  io_uring (its attack surface is large and most programs fall back to plain syscalls);
- `clone` with any `CLONE_NEW*` flag fails with EPERM (so `unshare -U` and friends cannot make
  namespaces), and `clone3` fails with ENOSYS so that libc falls back to `clone`, whose flags a
  classic BPF filter can inspect (clone3 passes them in memory, out of the filter's reach);
- `ioctl(TIOCSTI)` and `ioctl(TIOCLINUX)` fail with EPERM (pushing input into a terminal);
- `personality` is allowed only with the values ordinary programs use (0, PER_LINUX32, and
  ADDR_NO_RANDOMIZE variants, and the query 0xffffffff); anything else fails with EPERM.

Integer arguments are compared on their low 32 bits only: the kernel truncates `ioctl`'s command
and `personality`'s argument to 32 bits, so comparing the whole 64-bit register would let a caller
slip past the filter by setting high bits.
"""

from __future__ import annotations

import errno
import os
import platform
import struct
from dataclasses import dataclass
from functools import cache

# --- classic BPF opcodes (linux/filter.h, linux/bpf_common.h) ---------------------------------
BPF_LD_W_ABS = 0x20  # BPF_LD | BPF_W | BPF_ABS
BPF_JMP_JA = 0x05  # BPF_JMP | BPF_JA
BPF_JMP_JEQ_K = 0x15  # BPF_JMP | BPF_JEQ | BPF_K
BPF_JMP_JGE_K = 0x35  # BPF_JMP | BPF_JGE | BPF_K
BPF_JMP_JSET_K = 0x45  # BPF_JMP | BPF_JSET | BPF_K
BPF_RET_K = 0x06  # BPF_RET | BPF_K

# --- seccomp return actions (linux/seccomp.h) --------------------------------------------------
SECCOMP_RET_KILL_PROCESS = 0x80000000
SECCOMP_RET_ERRNO = 0x00050000
SECCOMP_RET_ALLOW = 0x7FFF0000

# --- struct seccomp_data offsets: int nr; u32 arch; u64 ip; u64 args[6] ------------------------
OFF_NR = 0
OFF_ARCH = 4


def _arg_low(index: int) -> int:
    """Offset of the low 32 bits of syscall argument `index` (both supported arches are LE)."""
    return 16 + 8 * index


AUDIT_ARCH_X86_64 = 0xC000003E
AUDIT_ARCH_AARCH64 = 0xC00000B7
X32_SYSCALL_BIT = 0x40000000

CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
# CLONE_NEWTIME (0x80) shares its bit with the exit signal in clone(2); only unshare/clone3
# accept it, and both are denied outright.
CLONE_NEW_MASK = (
    CLONE_NEWNS
    | CLONE_NEWCGROUP
    | CLONE_NEWUTS
    | CLONE_NEWIPC
    | CLONE_NEWUSER
    | CLONE_NEWPID
    | CLONE_NEWNET
)

TIOCSTI = 0x5412
TIOCLINUX = 0x541C
# personality(2) values that ordinary programs use: PER_LINUX, PER_LINUX32, with or without
# ADDR_NO_RANDOMIZE (setarch -R, debuggers), and 0xffffffff, which only queries.
ALLOWED_PERSONALITIES = (0x0, 0x8, 0x20000, 0x20008, 0xFFFFFFFF)

# Calls refused with EPERM. Names not present in an architecture's table are skipped there.
DENIED: tuple[str, ...] = (
    # mounts, pivoting and namespaces
    "mount", "umount2", "pivot_root", "unshare", "setns",
    "fsopen", "fsconfig", "fsmount", "move_mount", "open_tree", "open_tree_attr", "fspick",
    "mount_setattr",
    # other processes' memory and state
    "ptrace", "process_vm_readv", "process_vm_writev", "pidfd_getfd", "kcmp",
    "process_madvise",
    # kernel keyrings
    "keyctl", "add_key", "request_key",
    # kernel programmability and introspection
    "bpf", "perf_event_open", "userfaultfd", "lookup_dcookie", "syslog",
    "io_uring_setup", "io_uring_enter", "io_uring_register",
    # kernel code
    "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module",
    "uselib", "_sysctl", "nfsservctl",
    # machine-wide state
    "swapon", "swapoff", "reboot", "acct", "quotactl", "quotactl_fd",
    "settimeofday", "clock_settime", "clock_adjtime", "adjtimex",
    "sethostname", "setdomainname", "vhangup",
    # file handles bypass path-based confinement
    "open_by_handle_at", "name_to_handle_at",
    # x86 port I/O and LDT
    "iopl", "ioperm", "modify_ldt",
)  # fmt: skip

# Syscall numbers. x86_64: arch/x86/entry/syscalls/syscall_64.tbl. aarch64 uses the generic
# table (include/uapi/asm-generic/unistd.h). Only the calls the filter names are listed.
SYSCALLS_X86_64: dict[str, int] = {
    "ioctl": 16, "clone": 56, "ptrace": 101, "syslog": 103, "uselib": 134, "personality": 135,
    "vhangup": 153, "modify_ldt": 154, "pivot_root": 155, "_sysctl": 156, "adjtimex": 159,
    "acct": 163, "settimeofday": 164, "mount": 165, "umount2": 166, "swapon": 167,
    "swapoff": 168, "reboot": 169, "sethostname": 170, "setdomainname": 171, "iopl": 172,
    "ioperm": 173, "init_module": 175, "delete_module": 176, "quotactl": 179,
    "nfsservctl": 180, "lookup_dcookie": 212, "clock_settime": 227, "kexec_load": 246,
    "add_key": 248, "request_key": 249, "keyctl": 250, "unshare": 272, "perf_event_open": 298,
    "name_to_handle_at": 303, "open_by_handle_at": 304, "clock_adjtime": 305, "setns": 308,
    "process_vm_readv": 310, "process_vm_writev": 311, "kcmp": 312, "finit_module": 313,
    "kexec_file_load": 320, "bpf": 321, "userfaultfd": 323, "io_uring_setup": 425,
    "io_uring_enter": 426, "io_uring_register": 427, "open_tree": 428, "move_mount": 429,
    "fsopen": 430, "fsconfig": 431, "fsmount": 432, "fspick": 433, "clone3": 435,
    "pidfd_getfd": 438, "process_madvise": 440, "mount_setattr": 442, "quotactl_fd": 443,
    "open_tree_attr": 467,
}  # fmt: skip

SYSCALLS_AARCH64: dict[str, int] = {
    "lookup_dcookie": 18, "ioctl": 29, "umount2": 39, "mount": 40, "pivot_root": 41,
    "nfsservctl": 42, "vhangup": 58, "quotactl": 60, "acct": 89, "personality": 92,
    "unshare": 97, "kexec_load": 104, "init_module": 105, "delete_module": 106,
    "clock_settime": 112, "syslog": 116, "ptrace": 117, "reboot": 142, "sethostname": 161,
    "setdomainname": 162, "settimeofday": 170, "adjtimex": 171, "add_key": 217,
    "request_key": 218, "keyctl": 219, "clone": 220, "swapon": 224, "swapoff": 225,
    "perf_event_open": 241, "name_to_handle_at": 264, "open_by_handle_at": 265,
    "clock_adjtime": 266, "setns": 268, "process_vm_readv": 270, "process_vm_writev": 271,
    "kcmp": 272, "finit_module": 273, "bpf": 280, "userfaultfd": 282, "kexec_file_load": 294,
    "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427, "open_tree": 428,
    "move_mount": 429, "fsopen": 430, "fsconfig": 431, "fsmount": 432, "fspick": 433,
    "clone3": 435, "pidfd_getfd": 438, "process_madvise": 440, "mount_setattr": 442,
    "quotactl_fd": 443, "open_tree_attr": 467,
}  # fmt: skip


@dataclass(frozen=True)
class ArchInfo:
    name: str
    audit_arch: int
    syscalls: dict[str, int]
    has_x32: bool


ARCHES: dict[str, ArchInfo] = {
    "x86_64": ArchInfo("x86_64", AUDIT_ARCH_X86_64, SYSCALLS_X86_64, has_x32=True),
    "aarch64": ArchInfo("aarch64", AUDIT_ARCH_AARCH64, SYSCALLS_AARCH64, has_x32=False),
}


class SeccompUnsupported(Exception):
    """No filter can be generated for this machine's architecture."""


@dataclass(frozen=True)
class Insn:
    """One instruction before assembly; jump targets are label names (None: next insn)."""

    code: int
    k: int = 0
    jt: str | None = None
    jf: str | None = None


def _assemble(program: list[Insn | str]) -> list[tuple[int, int, int, int]]:
    """Resolves labels (strings in `program`) into relative jump offsets.

    Classic BPF jumps only forwards and by at most 255 instructions for conditional jumps; a
    program that breaks either rule raises ValueError instead of producing a corrupt filter.
    """
    labels: dict[str, int] = {}
    insns: list[Insn] = []
    for item in program:
        if isinstance(item, str):
            if item in labels:
                raise ValueError(f"duplicate label {item}")
            labels[item] = len(insns)
        else:
            insns.append(item)

    def offset(at: int, target: str | None, limit: int) -> int:
        if target is None:
            return 0
        if target not in labels:
            raise ValueError(f"unknown label {target}")
        delta = labels[target] - at - 1
        if delta < 0 or delta > limit:
            raise ValueError(f"jump from {at} to {target} out of range ({delta})")
        return delta

    out: list[tuple[int, int, int, int]] = []
    for at, insn in enumerate(insns):
        if insn.code == BPF_JMP_JA:
            out.append((insn.code, 0, 0, offset(at, insn.jt, 0xFFFFFFFF)))
        else:
            out.append((insn.code, offset(at, insn.jt, 255), offset(at, insn.jf, 255), insn.k))
    return out


def build_program(arch: str) -> list[tuple[int, int, int, int]]:
    """The filter for `arch` as (code, jt, jf, k) tuples; pure, for tests and `compile_filter`."""
    info = ARCHES.get(arch)
    if info is None:
        raise SeccompUnsupported(
            f"no seccomp syscall table for architecture {arch!r}; known: {sorted(ARCHES)}"
        )
    nr = info.syscalls
    prog: list[Insn | str] = [
        Insn(BPF_LD_W_ABS, OFF_ARCH),
        Insn(BPF_JMP_JEQ_K, info.audit_arch, jt=None, jf="kill"),
        Insn(BPF_LD_W_ABS, OFF_NR),
    ]
    if info.has_x32:
        # x32 numbers have bit 30 set; so do "negative" numbers, which are invalid anyway.
        prog.append(Insn(BPF_JMP_JGE_K, X32_SYSCALL_BIT, jt="enosys"))
    for name in DENIED:
        if name in nr:
            prog.append(Insn(BPF_JMP_JEQ_K, nr[name], jt="eperm"))
    prog += [
        Insn(BPF_JMP_JEQ_K, nr["clone3"], jt="enosys"),
        Insn(BPF_JMP_JEQ_K, nr["clone"], jt="clone"),
        Insn(BPF_JMP_JEQ_K, nr["ioctl"], jt="ioctl"),
        Insn(BPF_JMP_JEQ_K, nr["personality"], jt="personality"),
        "allow",
        Insn(BPF_RET_K, SECCOMP_RET_ALLOW),
        "clone",
        Insn(BPF_LD_W_ABS, _arg_low(0)),
        Insn(BPF_JMP_JSET_K, CLONE_NEW_MASK, jt="eperm", jf="allow2"),
        "ioctl",
        Insn(BPF_LD_W_ABS, _arg_low(1)),
        Insn(BPF_JMP_JEQ_K, TIOCSTI, jt="eperm"),
        Insn(BPF_JMP_JEQ_K, TIOCLINUX, jt="eperm", jf="allow2"),
        "personality",
        Insn(BPF_LD_W_ABS, _arg_low(0)),
    ]
    prog += [Insn(BPF_JMP_JEQ_K, value, jt="allow2") for value in ALLOWED_PERSONALITIES]
    prog += [
        "eperm",
        Insn(BPF_RET_K, SECCOMP_RET_ERRNO | errno.EPERM),
        "allow2",
        Insn(BPF_RET_K, SECCOMP_RET_ALLOW),
        "enosys",
        Insn(BPF_RET_K, SECCOMP_RET_ERRNO | errno.ENOSYS),
        "kill",
        Insn(BPF_RET_K, SECCOMP_RET_KILL_PROCESS),
    ]
    return _assemble(prog)


def host_arch() -> str:
    """This machine's architecture name as the tables know it (`uname -m`)."""
    machine = platform.machine()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(machine, machine)


@cache
def compile_filter(arch: str | None = None) -> bytes:
    """The filter as bwrap reads it: packed `struct sock_filter`s, native byte order. Cached."""
    program = build_program(arch or host_arch())
    return b"".join(struct.pack("=HBBI", *insn) for insn in program)


def filter_fd(arch: str | None = None) -> int:
    """A new readable fd (close-on-exec, offset 0) holding the compiled filter, for one spawn.

    Every spawn needs its own open file: bwrap reads the filter to EOF from the current offset,
    and a shared offset would race between concurrent spawns. The caller closes it after spawn.
    """
    data = compile_filter(arch)
    fd = os.memfd_create("aviato-seccomp", os.MFD_CLOEXEC)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.lseek(fd, 0, os.SEEK_SET)
    except BaseException:
        os.close(fd)
        raise
    return fd


def describe(arch: str | None = None) -> str:
    """One line for `aviato server status`."""
    name = arch or host_arch()
    info = ARCHES.get(name)
    if info is None:
        return f"unavailable: no syscall table for {name}"
    denied = sum(1 for call in DENIED if call in info.syscalls)
    return (
        f"{name} deny-list: {denied} calls EPERM, clone(CLONE_NEW*) EPERM, clone3 ENOSYS, "
        "TIOCSTI/TIOCLINUX EPERM, foreign arch killed"
    )
