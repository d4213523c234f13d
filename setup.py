"""Build step that pyproject.toml cannot express: compiling the sandbox supervisor.

`src/aviato/runtime/native/*.c` (the supervisor's modules: see native/supervisor.h) are compiled
together, static if the C library allows it, into one program,
`src/aviato/runtime/_bin/aviato-supervisor`, which serves editable installs, and copied into the
build directory for wheels. The wheel is therefore platform-specific. Everything else about the
package lives in pyproject.toml.

Set `CC` to choose the compiler and `AVIATO_SUPERVISOR_CFLAGS` to add flags.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from pathlib import Path

from setuptools import Distribution, setup
from setuptools.command.build_py import build_py
from setuptools.errors import CompileError

ROOT = Path(__file__).resolve().parent
NATIVE = Path("src/aviato/runtime/native")
TARGET = Path("src/aviato/runtime/_bin/aviato-supervisor")
IN_PACKAGE = Path("aviato/runtime/_bin/aviato-supervisor")
CFLAGS = ["-std=c11", "-O2", "-Wall", "-Wextra", "-s"]


def find_compiler() -> list[str]:
    cc = os.environ.get("CC")
    if cc:
        return shlex.split(cc)
    for name in ("cc", "gcc", "clang"):
        if shutil.which(name):
            return [name]
    raise CompileError(
        "aviato needs a C compiler to build its sandbox supervisor "
        f"({NATIVE}/*.c), and none was found (tried $CC, cc, gcc, clang). "
        "Install one (Debian/Ubuntu: `apt-get install gcc libc6-dev`; "
        "Fedora: `dnf install gcc glibc-static`) and install aviato again."
    )


def compile_supervisor(out: Path) -> None:
    """Compiles the supervisor to `out`: static if possible, otherwise dynamic."""
    cc = find_compiler()
    sources = [str(p) for p in sorted((ROOT / NATIVE).glob("*.c"))]
    out.parent.mkdir(parents=True, exist_ok=True)
    extra = shlex.split(os.environ.get("AVIATO_SUPERVISOR_CFLAGS", ""))
    tmp = out.with_name(out.name + ".tmp")
    errors = []
    for link in (["-static"], []):
        cmd = [*cc, *CFLAGS, *extra, *link, "-o", str(tmp), *sources]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        except OSError as e:
            raise CompileError(f"cannot run the C compiler {cc[0]!r}: {e}") from e
        if proc.returncode == 0:
            tmp.chmod(0o755)
            tmp.replace(out)
            if link:
                print(f"aviato: built static supervisor {out}")
            else:
                print(f"aviato: static link failed, built dynamic supervisor {out}")
            return
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


setup(cmdclass={"build_py": BuildPy}, distclass=BinaryDistribution)
