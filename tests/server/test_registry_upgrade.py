"""A service upgraded over a registry of schema 2 (specs stored as wire bytes) keeps working.

The old file is made as the service up to schema 2 made it: migrations 1 and 2, and rows whose
`spec` column holds a serialized `aviato.v1.SandboxSpec` (mounted file contents and registry
credentials cleared). Opening it converts every row once into the resolved model.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

from aviato.runtime.model import DEFAULT_DISK_BYTES, DEFAULT_PIDS
from aviato.server import registry as registry_module
from aviato.server.records import ALL_STATUSES, SandboxStatus
from aviato.server.registry import Registry
from aviato.v1 import sandbox_pb2 as pb

MiB = 1 << 20


def old_registry(path: Path) -> None:
    db = sqlite3.connect(path)
    db.execute(
        "CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, applied_ns INTEGER NOT NULL)"
    )
    for version, script in enumerate(registry_module._MIGRATIONS[:2], start=1):
        assert isinstance(script, str)
        db.executescript(script)
        db.execute("INSERT INTO schema_migrations VALUES (?, ?)", (version, time.time_ns()))
    asked = pb.SandboxSpec(
        image="host", command=["sleep", "30"], env={"B": "2", "A": "1"}, working_dir="/w",
        tags=["t1", "t2"], resources=pb.Resources(cpu="500m", memory="256Mi", pids=64),
        max_lifetime_seconds=90, mounted_files=[pb.MountedFile(path="/etc/app.conf")],
        network="none", node_selector={"pool": "a"},
    )  # fmt: skip
    bare = pb.SandboxSpec(image="python:3.11", network="none")  # left everything to defaults
    rows = [
        ("sbx-asked", "req-1", 3, asked, 1_000, 1_000 + 90 * 10**9),
        ("sbx-bare", "req-2", 4, bare, 2_000, 2_000 + 3600 * 10**9),
        ("sbx-broken", "req-3", 5, None, 3_000, None),
    ]
    for sid, request_id, status, spec, created, expires in rows:
        blob = b"\xff\xff not a message" if spec is None else spec.SerializeToString()
        db.execute(
            "INSERT INTO sandboxes (id, owner, request_id, status, spec, created_ns, expires_ns) "
            "VALUES (?, 'local', ?, ?, ?, ?, ?)",
            (sid, request_id, status, blob, created, expires),
        )
        tags = list(spec.tags) if spec is not None else []
        db.executemany("INSERT INTO sandbox_tags VALUES (?, ?)", [(sid, t) for t in tags])
    db.commit()
    db.close()


def test_old_registry_is_converted_once_and_keeps_working(tmp_path: Path) -> None:
    path = tmp_path / "registry.db"
    old_registry(path)
    reg = Registry(path)
    assert reg.schema_version == 10
    columns = [r[1] for r in sqlite3.connect(path).execute("PRAGMA table_info(sandboxes)")]
    assert "spec" not in columns and "model" in columns

    asked = reg.get_sandbox("sbx-asked")
    assert asked is not None and asked.status is SandboxStatus.RUNNING
    c = asked.config
    assert (c.sandbox_id, c.image, c.command, c.env, c.working_dir) == (
        "sbx-asked", "host", ("sleep", "30"), {"A": "1", "B": "2"}, "/w"
    )  # fmt: skip
    assert (c.cpu_millis, c.memory_bytes, c.pids, c.disk_bytes) == (
        500, 256 * MiB, 64, DEFAULT_DISK_BYTES
    )  # fmt: skip
    assert c.asked_limits == {"cpu", "memory", "pids"}
    assert c.mounted_files == (("/etc/app.conf", b""),) and c.node_selector == (("pool", "a"),)
    assert asked.tags == ("t1", "t2") and asked.max_lifetime_seconds == 90

    bare = reg.get_sandbox("sbx-bare")
    assert bare is not None and bare.status is SandboxStatus.COMPLETED
    assert (bare.config.cpu_millis, bare.config.pids, bare.config.asked_limits) == (
        None, DEFAULT_PIDS, frozenset()
    )  # fmt: skip
    assert bare.max_lifetime_seconds == 3600  # read off the recorded deadline

    broken = reg.get_sandbox("sbx-broken")  # an unreadable old spec still gives a record
    assert broken is not None and broken.config.image == "host"

    page, _ = reg.list_sandboxes("local", statuses=ALL_STATUSES, tags=("t2",))
    assert [r.id for r in page] == ["sbx-asked"]  # the tag index survived the conversion
    asked.status = SandboxStatus.TERMINATED
    reg.update_sandbox(asked)
    reg.close()

    again = Registry(path)  # converted once: reopening applies nothing
    assert again.schema_version == 10
    got = again.get_sandbox("sbx-asked")
    assert got is not None and got.status is SandboxStatus.TERMINATED and got.config == c
