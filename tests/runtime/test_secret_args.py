"""A sandbox's secrets reach bwrap on a descriptor (`--args FD_SECRETS`), never on its command
line, which every host user can read in /proc/PID/cmdline while the sandbox runs."""

from __future__ import annotations

import pytest

from aviato.runtime.base import SandboxConfig
from aviato.runtime.bubblewrap.command import (
    FD_SECRETS,
    SpecRefused,
    build_argv,
    secret_args,
)
from aviato.runtime.image_roots import resolve_image


def _config(**kw: object) -> SandboxConfig:
    return SandboxConfig(sandbox_id="x", image="host", command=(), env={"A": "1"},
                         working_dir="", **kw)  # type: ignore[arg-type]  # fmt: skip


def test_secrets_go_to_the_descriptor_after_the_other_variables() -> None:
    root = resolve_image("host", 1 << 20)
    config = _config(secrets=("TOKEN",), secret_env={"TOKEN": "s3cr3t value"})
    argv = build_argv("/bw", config, root, supervisor="/sup", seccomp_fd=6, rootless=False)
    assert not any("s3cr3t" in arg for arg in argv)
    assert "TOKEN" not in argv
    at = argv.index("--args")
    assert argv[at + 1] == str(FD_SECRETS)
    setenvs = [i for i, arg in enumerate(argv) if arg == "--setenv"]
    assert argv.index("--clearenv") < max(setenvs) < at  # after the image's and the spec's
    assert secret_args(config) == b"--setenv\0TOKEN\0s3cr3t value\0"
    # without secrets: no --args, nothing to hand over
    plain = build_argv("/bw", _config(), root, supervisor="/sup", seccomp_fd=6, rootless=False)
    assert "--args" not in plain and secret_args(_config()) == b""


@pytest.mark.parametrize("env", [{"A=B": "v"}, {"": "v"}, {"A": "x\0y"}])
def test_a_secret_that_cannot_be_a_variable_is_refused(env: dict[str, str]) -> None:
    with pytest.raises(SpecRefused) as err:
        secret_args(_config(secret_env=env))
    assert "x\0y" not in str(err.value)
