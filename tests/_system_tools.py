"""The system tools that tests run, and what a test does when one is missing.

aviato itself needs only what pip brings. Some tests need more from the machine: a real OCI
registry to pull from, a static busybox to build images with, network namespaces for a Ray
cluster, a certificate for TLS. Every such tool is listed once here, with the Debian package that
brings it, and a test asks for it with `require_tools("docker-registry", "busybox")`.

A missing tool skips the test with the reason and the install command, so that the README's test
command passes on a fresh machine. `AVIATO_REQUIRE_ALL_TOOLS=1` (set by `.ci/run`, which installs
them all) turns that skip into a failure: CI cannot go green by skipping.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass

import pytest

REQUIRE_ALL_ENV = "AVIATO_REQUIRE_ALL_TOOLS"


@dataclass(frozen=True)
class SystemTool:
    """A command (found on PATH) or a file that tests need, and the package that brings it."""

    name: str
    package: str
    path: str | None = None  # a file to look for instead of a command on PATH

    def location(self) -> str | None:
        if self.path is not None:
            return self.path if os.path.exists(self.path) else None
        return shutil.which(self.name)


TOOLS: dict[str, SystemTool] = {
    t.name: t
    for t in (
        SystemTool("docker-registry", "docker-registry"),  # tests/images: a registry on 127.0.0.1
        # the image tests copy it into their images, so it must be the static build
        SystemTool("busybox", "busybox-static"),
        SystemTool("ip", "iproute2"),  # tests/cluster (a netns per Ray node), tests/network
        SystemTool("nsenter", "util-linux"),
        SystemTool("openssl", "openssl"),  # a self-signed certificate for the TLS tests
        SystemTool("curl", "curl"),  # tests/runtime: a real client honours HTTP(S)_PROXY
        SystemTool("pip3", "python3-pip"),  # tests/network: pip installs through the proxy
        SystemTool("setpriv", "util-linux"),  # tests/cli: aviato as an ordinary user
        SystemTool("pgrep", "procps"),
        SystemTool("cc", "gcc"),  # test programs compiled for the supervisor's tests
        SystemTool("musl-gcc", "musl-tools"),  # the supervisor built against musl (setup.py)
        SystemTool("nm", "binutils"),  # the supervisor's modules: who calls whom
        SystemTool("tmux", "tmux"),  # tests/cli: `aviato top` on a real terminal
        SystemTool("chromium", "chromium"),  # tests/server: the dashboard in a real browser
        SystemTool("chromedriver", "chromium-driver"),
        SystemTool(
            "linux-headers", "linux-libc-dev", path="/usr/include/asm-generic/unistd.h"
        ),  # the seccomp table is checked against the kernel's syscall numbers
    )
}


def require_all() -> bool:
    return os.environ.get(REQUIRE_ALL_ENV, "") not in ("", "0")


def missing_tools(*names: str) -> list[SystemTool]:
    return [TOOLS[n] for n in names if TOOLS[n].location() is None]


def describe(missing: list[SystemTool]) -> str:
    """`X and Y: apt-get install P Q`."""
    packages = " ".join(dict.fromkeys(t.package for t in missing))
    return f"{' and '.join(t.name for t in missing)}: apt-get install {packages}"


def missing_reason(*names: str) -> str | None:
    """`needs X and Y: apt-get install P Q`, or None when every tool is here."""
    missing = missing_tools(*names)
    return f"needs {describe(missing)}" if missing else None


def require_tools(*names: str) -> None:
    """Skips the calling test when a tool is missing (fails under AVIATO_REQUIRE_ALL_TOOLS=1)."""
    reason = missing_reason(*names)
    if reason is None:
        return
    if require_all():
        pytest.fail(f"{reason} ({REQUIRE_ALL_ENV} is set: missing tools fail)", pytrace=False)
    pytest.skip(reason)
