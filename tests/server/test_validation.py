"""Request validation (pure): every refusal names its field."""

from __future__ import annotations

import math
from typing import Any

import pytest

from aviato.runtime.model import DEFAULT_DISK_BYTES, DEFAULT_MEMORY_BYTES, DEFAULT_PIDS
from aviato.server.codec import decode_exec_init as validate_exec_init
from aviato.server.codec import decode_spec, encode_sandbox
from aviato.server.errors import InvalidArgument
from aviato.server.records import SandboxRecord, SandboxStatus, ValidSpec
from aviato.server.validation import (
    SpecDefaults,
    validate_file_mode,
    validate_path,
    validate_request_id,
)
from aviato.v1 import sandbox_pb2 as pb


def validate_spec(message: pb.SandboxSpec) -> ValidSpec:
    return decode_spec(message, SpecDefaults())


def answered_spec(valid: ValidSpec) -> pb.SandboxSpec:
    """The spec a Get answers for a sandbox created from `valid`."""
    rec = SandboxRecord(id="sbx-1", owner="o", request_id="r", status=SandboxStatus.PENDING,
                        config=valid.config, created_ns=1, tags=valid.tags,
                        max_lifetime_seconds=valid.max_lifetime_seconds)  # fmt: skip
    return encode_sandbox(rec).spec


MiB = 1 << 20


def spec(**kw: Any) -> pb.SandboxSpec:
    resources = kw.pop("resources", None)
    s = pb.SandboxSpec(**kw)
    if resources:
        s.resources.CopyFrom(pb.Resources(**resources))
    return s


INVALID_SPECS: list[tuple[str, pb.SandboxSpec, str]] = [
    (
        "memory-quantity",
        spec(resources={"memory": "12Qi"}),
        "spec.resources.memory: '12Qi' is not a size such as 512Mi or 2G",
    ),
    ("memory-too-small", spec(resources={"memory": "1Ki"}), "spec.resources.memory"),
    ("cpu-quantity", spec(resources={"cpu": "fast"}), "spec.resources.cpu"),
    ("cpu-zero", spec(resources={"cpu": "0"}), "spec.resources.cpu"),
    ("cpu-negative", spec(resources={"cpu": "-1"}), "spec.resources.cpu"),
    ("disk", spec(resources={"disk": "1Zi"}), "spec.resources.disk"),
    ("pids-negative", spec(resources={"pids": -1}), "spec.resources.pids"),
    ("argv0-empty", spec(command=[""]), "spec.command[0]"),
    ("argv-nul", spec(command=["sh", "a\x00b"]), "spec.command[1]"),
    ("argv-huge", spec(command=["x" * MiB, "y"]), "spec.command"),
    ("env-nul", spec(env={"A": "x\x00"}), "spec.env"),
    ("env-eq", spec(env={"A=B": "x"}), "spec.env"),
    ("env-many", spec(env={f"K{i}": "v" for i in range(4097)}), "spec.env"),
    ("env-huge", spec(env={"A": "x" * MiB}), "spec.env"),
    ("workdir-relative", spec(working_dir="work"), "spec.working_dir"),
    ("workdir-dotdot", spec(working_dir="/a/../b"), "spec.working_dir"),
    ("workdir-nul", spec(working_dir="/a\x00"), "spec.working_dir"),
    ("tag-charset", spec(tags=["has space"]), "spec.tags[0]"),
    ("tag-long", spec(tags=["x" * 129]), "spec.tags[0]"),
    ("tag-empty", spec(tags=["ok", ""]), "spec.tags[1]"),
    ("tags-many", spec(tags=[f"t{i}" for i in range(65)]), "spec.tags"),
    ("image", spec(image="Not An Image!"), "spec.image"),
    ("network", spec(network="host"), "spec.network"),
    ("lifetime-negative", spec(max_lifetime_seconds=-1), "spec.max_lifetime_seconds"),
    ("lifetime-nan", spec(max_lifetime_seconds=math.nan), "spec.max_lifetime_seconds"),
    ("lifetime-inf", spec(max_lifetime_seconds=math.inf), "spec.max_lifetime_seconds"),
    ("lifetime-long", spec(max_lifetime_seconds=8 * 86400), "spec.max_lifetime_seconds"),
    (
        "mount-relative",
        spec(mounted_files=[pb.MountedFile(path="a", content=b"")]),
        "spec.mounted_files[0].path",
    ),
    (
        "mount-twice",
        spec(mounted_files=[pb.MountedFile(path="/a"), pb.MountedFile(path="//a")]),
        "spec.mounted_files[1].path",
    ),
    (
        "mount-huge",
        spec(
            mounted_files=[
                pb.MountedFile(path=f"/f{i}", content=b"x" * (6 * MiB)) for i in range(3)
            ]
        ),
        "spec.mounted_files",
    ),
]


@pytest.mark.parametrize(
    ("name", "message", "field"), INVALID_SPECS, ids=[c[0] for c in INVALID_SPECS]
)
def test_invalid_specs_name_the_field(name: str, message: pb.SandboxSpec, field: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        validate_spec(message)
    assert str(info.value).startswith(field), str(info.value)


def test_valid_spec_maps_to_config() -> None:
    s = spec(
        command=["python3", "-c", "print(1)"],
        env={"B": "2", "A": "1"},
        working_dir="//workspace/./x/",
        tags=["a", "b", "a"],
        resources={"cpu": "500m", "memory": "256Mi", "pids": 64, "disk": "1Gi"},
        max_lifetime_seconds=60,
        mounted_files=[pb.MountedFile(path="/etc/app.conf", content=b"k=v")],
    )
    valid = validate_spec(s)
    c = valid.config
    assert c.image == "host"
    assert c.command == ("python3", "-c", "print(1)")
    assert c.env == {"A": "1", "B": "2"}
    assert c.working_dir == "/workspace/x"
    assert (c.cpu_millis, c.memory_bytes, c.pids, c.disk_bytes) == (500, 256 * MiB, 64, 1 << 30)
    assert c.mounted_files == (("/etc/app.conf", b"k=v"),)
    assert c.egress.isolated
    assert valid.tags == ("a", "b")
    assert valid.max_lifetime_seconds == 60
    assert c.asked_limits == {"cpu", "memory", "pids", "disk"}
    assert list(answered_spec(valid).tags) == ["a", "b"]
    assert answered_spec(valid).image == "host"


def test_defaults() -> None:
    valid = validate_spec(pb.SandboxSpec())
    assert valid.config.command == ()
    # Resolved here, once: the sandbox gets the service's defaults (SpecDefaults()'s here).
    c = valid.config
    assert (c.cpu_millis, c.memory_bytes, c.pids, c.disk_bytes) == (
        None, DEFAULT_MEMORY_BYTES, DEFAULT_PIDS, DEFAULT_DISK_BYTES
    )  # fmt: skip
    assert c.asked_limits == frozenset()
    assert valid.max_lifetime_seconds == SpecDefaults().max_lifetime_seconds
    assert validate_spec(spec(image="python:3.11")).config.image == "python:3.11"
    assert validate_spec(spec(image="127.0.0.1:5000/lib/busybox:1.36")).config.image


INVALID_INITS: list[tuple[str, pb.ExecInit, str]] = [
    ("argv-empty", pb.ExecInit(sandbox_id="x"), "init.argv"),
    ("argv0-empty", pb.ExecInit(argv=["", "a"]), "init.argv[0]"),
    ("cwd", pb.ExecInit(argv=["ls"], cwd="tmp"), "init.cwd"),
    ("env", pb.ExecInit(argv=["ls"], env={"": "x"}), "init.env"),
    ("timeout-nan", pb.ExecInit(argv=["ls"], timeout_seconds=math.nan), "init.timeout_seconds"),
    ("timeout-negative", pb.ExecInit(argv=["ls"], timeout_seconds=-1), "init.timeout_seconds"),
    (
        "tty-rows",
        pb.ExecInit(argv=["ls"], tty_size=pb.TerminalSize(rows=70000)),
        "init.tty_size.rows",
    ),
]


@pytest.mark.parametrize(
    ("name", "init", "field"), INVALID_INITS, ids=[c[0] for c in INVALID_INITS]
)
def test_invalid_exec_inits(name: str, init: pb.ExecInit, field: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        validate_exec_init(init)
    assert str(info.value).startswith(field), str(info.value)


def test_exec_init_maps_to_spec() -> None:
    init = pb.ExecInit(argv=["cat"], cwd="/tmp/", env={"X": "1"}, timeout_seconds=2.5, stdin=True,
                       tty=True, tty_size=pb.TerminalSize(rows=50, cols=0))  # fmt: skip
    e = validate_exec_init(init)
    assert (e.argv, e.cwd, e.env, e.timeout_seconds, e.stdin, e.tty) == (
        ("cat",),
        "/tmp",
        {"X": "1"},
        2.5,
        True,
        True,
    )
    assert (e.rows, e.cols) == (50, 80)


@pytest.mark.slow
def test_small_validators() -> None:
    assert validate_path("/a//b/", "path") == "/a/b"
    for bad in ("", "rel", "/a/../../etc", "/x\x00"):
        with pytest.raises(InvalidArgument, match=r"^path"):
            validate_path(bad, "path")
    assert validate_file_mode(0, "mode") == 0o644
    assert validate_file_mode(0o755, "mode") == 0o755
    with pytest.raises(InvalidArgument, match=r"^mode"):
        validate_file_mode(0o4755, "mode")
    with pytest.raises(InvalidArgument, match=r"^request_id"):
        validate_request_id("")
    with pytest.raises(InvalidArgument, match=r"^request_id"):
        validate_request_id("a b")
    assert validate_request_id("0b8e6c2e-1f7a-4d3c-9e58-3f9d7a1c2b4e")
