"""Build step that pyproject.toml cannot express: compiling the sandbox supervisor.

`src/aviato/runtime/native/*.c` (the supervisor's modules: see native/supervisor.h) are compiled
together, static if the C library allows it, into one program,
`src/aviato/runtime/_bin/aviato-supervisor`, which serves editable installs, and copied into the
build directory for wheels. The wheel is therefore platform-specific. Everything else about the
package lives in pyproject.toml.

With musl's compiler wrapper on the PATH (`musl-gcc`, Debian's `musl-tools`) the supervisor is
linked statically against musl, else against the system's C library (glibc). The program and
its behaviour are the same; what differs is its start: every sandbox starts one supervisor, and
static glibc's start-up probes the CPU's features and caches with dozens of `cpuid`
instructions, each a trap to the hypervisor in a virtual machine (0.65 ms before `main` on
the machine of docs/benchmarks.md, against 0.06 ms with musl). musl's headers leave out the
kernel's (`linux/*.h`), so they are taken from the system's (`linux-libc-dev`); without them
musl is not used.

Set `CC` to choose the compiler (then only it is tried) and `AVIATO_SUPERVISOR_CFLAGS` to add
flags.
"""

from __future__ import annotations

import atexit
import os
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path

from setuptools import Distribution, setup
from setuptools.command.build_py import build_py
from setuptools.errors import CompileError

ROOT = Path(__file__).resolve().parent
NATIVE = Path("src/aviato/runtime/native")
TARGET = Path("src/aviato/runtime/_bin/aviato-supervisor")
IN_PACKAGE = Path("aviato/runtime/_bin/aviato-supervisor")
CFLAGS = ["-std=c11", "-O2", "-Wall", "-Wextra", "-s"]


def find_compilers() -> list[list[str]]:
    """The compilers to try, best first, each a command (with the flags it needs)."""
    cc = os.environ.get("CC")
    if cc:
        return [shlex.split(cc)]
    found: list[list[str]] = []
    musl = shutil.which("musl-gcc")
    kernel_headers = musl and kernel_header_dir()
    if musl and kernel_headers:
        found.append([musl, "-isystem", kernel_headers])  # static only: see compile_supervisor
    found += [[name] for name in ("cc", "gcc", "clang") if shutil.which(name)]
    if not found:
        raise CompileError(
            "aviato needs a C compiler to build its sandbox supervisor "
            f"({NATIVE}/*.c), and none was found (tried $CC, musl-gcc, cc, gcc, clang). "
            "Install one (Debian/Ubuntu: `apt-get install gcc libc6-dev`, and `musl-tools` for "
            "a faster sandbox start; Fedora: `dnf install gcc glibc-static`) and install "
            "aviato again."
        )
    return found


def kernel_header_dir() -> str | None:
    """A directory of the system's kernel headers (`linux/`, `asm/`, `asm-generic/`) alone, for
    musl-gcc, whose include path leaves out /usr/include (glibc's headers) and with it the
    kernel's; None when they are not installed."""
    include = Path("/usr/include")
    multiarch = ""
    if shutil.which("gcc"):  # Debian keeps asm/ under the architecture's directory
        multiarch = subprocess.run(
            ["gcc", "-print-multiarch"], capture_output=True, text=True, check=False
        ).stdout.strip()
    asm_dirs = [include / multiarch / "asm"] if multiarch else []
    asm = next((d for d in [*asm_dirs, include / "asm"] if d.is_dir()), None)
    if asm is None:
        return None
    wanted = {"linux": include / "linux", "asm-generic": include / "asm-generic", "asm": asm}
    if not all((d / "types.h").is_file() for d in wanted.values()):
        return None
    shim = Path(tempfile.mkdtemp(prefix="aviato-kernel-headers-"))
    atexit.register(shutil.rmtree, shim, ignore_errors=True)
    for name, target in wanted.items():
        (shim / name).symlink_to(target)
    return str(shim)


def compile_supervisor(out: Path, compilers: list[list[str]] | None = None) -> str:
    """Compiles the supervisor to `out` with the first of `compilers` (default:
    `find_compilers()`) that builds it, static if possible, otherwise dynamic; returns what was
    built, in words."""
    sources = [str(p) for p in sorted((ROOT / NATIVE).glob("*.c"))]
    out.parent.mkdir(parents=True, exist_ok=True)
    extra = shlex.split(os.environ.get("AVIATO_SUPERVISOR_CFLAGS", ""))
    tmp = out.with_name(out.name + ".tmp")
    errors = []
    for cc in find_compilers() if compilers is None else compilers:
        # A dynamic supervisor needs its C library's loader in the sandbox; musl's is rarely in
        # an image, so musl is used static or not at all.
        links = [["-static"]] if "musl" in Path(cc[0]).name else [["-static"], []]
        for link in links:
            cmd = [*cc, *CFLAGS, *extra, *link, "-o", str(tmp), *sources]
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            except OSError as e:
                errors.append(f"cannot run the C compiler {cc[0]!r}: {e}")
                break
            if proc.returncode == 0:
                tmp.chmod(0o755)
                tmp.replace(out)
                kind = "static" if link else "dynamic (static link failed)"
                built = f"{kind} supervisor {out} with {Path(cc[0]).name}"
                print(f"aviato: built {built}")
                return built
            errors.append(f"$ {shlex.join(cmd)}\n{proc.stderr.strip()}")
    tmp.unlink(missing_ok=True)
    raise CompileError("compiling the aviato sandbox supervisor failed:\n" + "\n".join(errors))


class BuildPy(build_py):
    """build_py that also compiles the supervisor (in place for editable installs)."""

    def run(self) -> None:
        in_tree = ROOT / TARGET
        compile_supervisor(in_tree)
        super().run()
        if not self.editable_mode:
            built = Path(self.build_lib) / IN_PACKAGE
            built.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(in_tree, built)

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        outputs = list(super().get_outputs(include_bytecode))
        built = str(Path(self.build_lib) / IN_PACKAGE)
        if not self.editable_mode and built not in outputs:
            outputs.append(built)
        return outputs


class BinaryDistribution(Distribution):
    """The wheel holds a native executable: tag it for the platform, not py3-none-any."""

    def has_ext_modules(self) -> bool:
        return True


# setuptools runs this file as __main__; tests load it as a module for `compile_supervisor`.
if __name__ == "__main__":
    setup(cmdclass={"build_py": BuildPy}, distclass=BinaryDistribution)
