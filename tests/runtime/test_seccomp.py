"""The seccomp generator, checked by running its BPF on synthetic syscalls (pure) and in bwrap."""

from __future__ import annotations

import errno
import os
import re
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from _system_tools import require_tools

from aviato.runtime import seccomp
from aviato.runtime.seccomp import (
    AUDIT_ARCH_AARCH64,
    AUDIT_ARCH_X86_64,
    SECCOMP_RET_ALLOW,
    SECCOMP_RET_ERRNO,
    SECCOMP_RET_KILL_PROCESS,
)

EPERM = SECCOMP_RET_ERRNO | errno.EPERM
ENOSYS = SECCOMP_RET_ERRNO | errno.ENOSYS
AUDIT_ARCH_I386 = 0x40000003


def run_bpf(program: list[tuple[int, int, int, int]], data: bytes) -> int:
    """A classic-BPF interpreter for the instructions the generator emits."""
    pc = 0
    acc = 0
    while True:
        code, jt, jf, k = program[pc]
        if code == 0x20:  # LD W ABS
            acc = struct.unpack_from("<I", data, k)[0]
            pc += 1
        elif code == 0x15:  # JEQ
            pc += 1 + (jt if acc == k else jf)
        elif code == 0x35:  # JGE
            pc += 1 + (jt if acc >= k else jf)
        elif code == 0x45:  # JSET
            pc += 1 + (jt if acc & k else jf)
        elif code == 0x05:  # JA
            pc += 1 + k
        elif code == 0x06:  # RET
            return k
        else:
            raise AssertionError(f"unexpected opcode {code:#x}")


def seccomp_data(nr: int, arch: int, *args: int) -> bytes:
    padded = [*args, *([0] * (6 - len(args)))]
    return struct.pack("<iIQ6Q", nr, arch, 0, *padded)


@pytest.mark.parametrize(
    ("arch", "audit"), [("x86_64", AUDIT_ARCH_X86_64), ("aarch64", AUDIT_ARCH_AARCH64)]
)
def test_policy_decisions(arch: str, audit: int) -> None:
    prog = seccomp.build_program(arch)
    table = seccomp.ARCHES[arch].syscalls

    def verdict(name: str | int, *args: int, arch_value: int = audit) -> int:
        nr = table[name] if isinstance(name, str) else name
        return run_bpf(prog, seccomp_data(nr, arch_value, *args))

    for name in seccomp.DENIED:
        if name in table:
            assert verdict(name) == EPERM, name
    for harmless in (0, 1, 2, 3, 60, 63, 64, 93, 200, 231, 300, 334, 400, 439, 448):
        if harmless not in table.values():
            assert verdict(harmless) == SECCOMP_RET_ALLOW, harmless
    assert verdict("clone3") == ENOSYS
    assert verdict("clone", 17) == SECCOMP_RET_ALLOW  # fork(): SIGCHLD
    assert verdict("clone", 0x003D0F00) == SECCOMP_RET_ALLOW  # pthread_create flags
    for flag in (0x10000000, 0x20000, 0x20000000, 0x40000000, 0x8000000, 0x4000000, 0x2000000):
        assert verdict("clone", flag | 17) == EPERM, hex(flag)
    assert verdict("ioctl", 0, 0x5412) == EPERM
    assert verdict("ioctl", 0, 0x1_0000_5412) == EPERM  # high bits set: the kernel ignores them
    assert verdict("ioctl", 0, 0x541C) == EPERM
    assert verdict("ioctl", 0, 0x5401) == SECCOMP_RET_ALLOW  # TCGETS
    for value in (0, 8, 0x20000, 0x20008, 0xFFFFFFFF):
        assert verdict("personality", value) == SECCOMP_RET_ALLOW
    assert verdict("personality", 0x0400000) == EPERM  # READ_IMPLIES_EXEC
    # Another architecture's numbering (i386 via int 0x80, arm32 compat) is killed outright.
    assert verdict(20, arch_value=AUDIT_ARCH_I386) == SECCOMP_RET_KILL_PROCESS
    assert verdict(20, arch_value=0x40000028) == SECCOMP_RET_KILL_PROCESS
    if arch == "x86_64":
        assert verdict(0x40000000 | 39) == ENOSYS  # x32 getpid


def test_program_shape_and_bytes() -> None:
    for arch in seccomp.ARCHES:
        prog = seccomp.build_program(arch)
        assert len(prog) < 4096
        assert all(0 <= jt <= 255 and 0 <= jf <= 255 for _, jt, jf, _ in prog)
        assert prog[-1] == (0x06, 0, 0, SECCOMP_RET_KILL_PROCESS)
    blob = seccomp.compile_filter("x86_64")
    assert len(blob) == 8 * len(seccomp.build_program("x86_64"))
    assert seccomp.compile_filter("x86_64") is blob  # cached


def test_unknown_arch() -> None:
    with pytest.raises(seccomp.SeccompUnsupported):
        seccomp.build_program("mips")


def test_assembler_rejects_long_jumps() -> None:
    far = [seccomp.Insn(0x15, 1, jt="end")] + [seccomp.Insn(0x06, 0)] * 300 + ["end"]
    with pytest.raises(ValueError, match="out of range"):
        seccomp._assemble([*far, seccomp.Insn(0x06, 0)])


def _header_numbers(path: str, pattern: str) -> dict[str, int]:
    text = Path(path).read_text()
    return {m.group(1): int(m.group(2)) for m in re.finditer(pattern, text)}


def test_x86_64_table_matches_kernel_headers() -> None:
    require_tools("linux-headers")
    if not os.path.exists("/usr/include/x86_64-linux-gnu/asm/unistd_64.h"):
        pytest.skip("no x86_64 kernel headers (not an x86_64 machine)")
    nums = _header_numbers(
        "/usr/include/x86_64-linux-gnu/asm/unistd_64.h", r"#define __NR_(\w+) (\d+)"
    )
    for name, nr in seccomp.SYSCALLS_X86_64.items():
        if name in nums:
            assert nums[name] == nr, name


def test_aarch64_table_matches_generic_headers() -> None:
    require_tools("linux-headers")
    nums = _header_numbers("/usr/include/asm-generic/unistd.h", r"#define __NR_(\w+) (\d+)")
    for name, nr in seccomp.SYSCALLS_AARCH64.items():
        if name in nums:
            assert nums[name] == nr, name


PROBE = r"""
import ctypes, errno, mmap, os, sys
libc = ctypes.CDLL(None, use_errno=True)
def call(nr, *args):
    r = libc.syscall(ctypes.c_long(nr), *[ctypes.c_ulong(a) for a in args])
    return errno.errorcode.get(ctypes.get_errno(), "0") if r == -1 else "ok"
print("unshare", call(272, 0x10000000))
print("clone_newuser", call(56, 0x10000000 | 17, 0, 0, 0, 0))
print("clone3", call(435, 0, 0))
print("mount", call(165, 0, 0, 0, 0, 0))
print("tiocsti", call(16, 0, 0x1_0000_5412, 0))
print("x32", call(0x40000000 | 39))
pid = os.fork()
if pid == 0:
    os._exit(7)
print("fork", os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
sys.stdout.flush()
# i386 getpid through int 0x80 from a 64-bit process: the filter must kill us.
buf = mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
buf.write(bytes([0xB8, 20, 0, 0, 0, 0xCD, 0x80, 0xC3]))
addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
ctypes.CFUNCTYPE(ctypes.c_int)(addr)()
print("int80 survived")
"""


@pytest.mark.skipif(seccomp.host_arch() != "x86_64", reason="the probe uses x86_64 numbers")
def test_filter_in_bwrap() -> None:
    from aviato.runtime.bubblewrap.command import find_bwrap

    fd = seccomp.filter_fd()
    try:
        os.set_inheritable(fd, True)
        out = subprocess.run(
            [find_bwrap().path, "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc",
             "--unshare-pid", "--cap-drop", "ALL", "--seccomp", str(fd), "--",
             "/usr/bin/python3", "-c", PROBE],
            pass_fds=[fd], capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
    finally:
        os.close(fd)
    lines = dict(line.split(" ", 1) for line in out.stdout.splitlines() if " " in line)
    assert lines == {
        "unshare": "EPERM",
        "clone_newuser": "EPERM",
        "clone3": "ENOSYS",
        "mount": "EPERM",
        "tiocsti": "EPERM",
        "x32": "ENOSYS",
        "fork": "7",
    }, out.stdout + out.stderr
    assert out.returncode in (-31, 128 + 31, 159), (out.returncode, out.stderr)  # SIGSYS


def test_filter_fd_is_fresh_each_time() -> None:
    a, b = seccomp.filter_fd(), seccomp.filter_fd()
    try:
        assert os.read(a, 1 << 16) == seccomp.compile_filter()
        assert os.read(b, 1 << 16) == seccomp.compile_filter()
    finally:
        os.close(a)
        os.close(b)
    assert sys.byteorder == "little"  # the offsets of args' low words assume it
