"""A sandbox's environment, its secrets included, reaches bwrap on a descriptor (`--args
FD_ENVIRONMENT`), never on its command line, which every host user can read in
/proc/PID/cmdline while the sandbox runs (and users put tokens in plain variables too)."""

from __future__ import annotations

import pytest

from aviato.runtime.base import SandboxConfig
from aviato.runtime.bubblewrap.command import (
    FD_ENVIRONMENT,
    SpecRefused,
    build_argv,
    environment_args,
)
from aviato.runtime.image_roots import resolve_image


def _config(**kw: object) -> SandboxConfig:
    return SandboxConfig(sandbox_id="x", image="host", command=(), env={"A": "tok3n"},
                         working_dir="", **kw)  # type: ignore[arg-type]  # fmt: skip


def _pairs(given: bytes) -> list[tuple[str, str]]:
    parts = given.split(b"\0")
    assert parts[-1] == b""
    parts = parts[:-1]
    assert parts[0::3] == [b"--setenv"] * (len(parts) // 3)
    return [(parts[i + 1].decode(), parts[i + 2].decode()) for i in range(0, len(parts), 3)]


def test_the_environment_goes_to_the_descriptor_secrets_last() -> None:
    root = resolve_image("host", 1 << 20)
    config = _config(secrets=("TOKEN",), secret_env={"TOKEN": "s3cr3t value"})
    argv = build_argv("/bw", config, root, supervisor="/sup", seccomp_fd=6, rootless=False)
    assert not any("s3cr3t" in arg or "tok3n" in arg for arg in argv)
    assert "TOKEN" not in argv and "--setenv" not in argv
    at = argv.index("--args")
    assert argv[at - 1] == "--clearenv" and argv[at + 1] == str(FD_ENVIRONMENT)
    pairs = _pairs(environment_args(config, root))
    assert ("A", "tok3n") in pairs and ("TOKEN", "s3cr3t value") in pairs
    assert pairs[-1] == ("TOKEN", "s3cr3t value")  # after the image's and the spec's: it wins
    assert any(key == "PATH" for key, _ in pairs)
    # without secrets the spec's variables still travel on the descriptor
    plain = _pairs(environment_args(_config(), root))
    assert ("A", "tok3n") in plain and all(key != "TOKEN" for key, _ in plain)


@pytest.mark.parametrize("env", [{"A=B": "v"}, {"": "v"}, {"A": "x\0y"}])
def test_a_secret_that_cannot_be_a_variable_is_refused(env: dict[str, str]) -> None:
    root = resolve_image("host", 1 << 20)
    with pytest.raises(SpecRefused) as err:
        environment_args(_config(secret_env=env), root)
    assert "x\0y" not in str(err.value)
