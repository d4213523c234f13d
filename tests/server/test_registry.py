"""The SQLite registry, pagination and API keys (pure: a temporary file, no server)."""

from __future__ import annotations

import dataclasses
import sqlite3
from pathlib import Path

import pytest

from aviato.runtime.model import SandboxConfig
from aviato.server import auth
from aviato.server.errors import InvalidArgument, Unauthenticated
from aviato.server.records import SandboxStatus
from aviato.server.registry import (
    ALL_STATUSES,
    COMPLETED,
    PENDING,
    RUNNING,
    LeaseRecord,
    Registry,
    SandboxRecord,
    decode_page_token,
    encode_page_token,
)


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    return Registry(tmp_path / "registry.db")


CONFIG = SandboxConfig(sandbox_id="", image="host", command=("sleep", "1"), env={"A": "1"},
                       working_dir="/w", cpu_millis=500, memory_bytes=64 << 20,
                       asked_limits=frozenset({"cpu", "memory"}),
                       mounted_files=(("/etc/x", b""),),
                       node_selector=(("pool", "a"),))  # fmt: skip


def rec(
    i: int,
    owner: str = "local",
    tags: tuple[str, ...] = (),
    status: SandboxStatus = RUNNING,
) -> SandboxRecord:
    return SandboxRecord(
        id=f"sbx-{i:04d}", owner=owner, request_id=f"req-{i}", status=status,
        config=CONFIG, created_ns=1_000 + i, tags=tags, max_lifetime_seconds=60.0,
    )  # fmt: skip


def test_wal_and_migrations(tmp_path: Path) -> None:
    r = Registry(tmp_path / "r.db")
    assert r.schema_version == 10
    r.close()
    r = Registry(tmp_path / "r.db")  # re-opening applies nothing twice
    assert r.schema_version == 10
    mode = sqlite3.connect(tmp_path / "r.db").execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"


def test_insert_get_update_delete(registry: Registry) -> None:
    r = rec(1, tags=("a", "b"))
    registry.insert_sandbox(r)
    got = registry.get_sandbox(r.id)
    assert got is not None and got.request_id == "req-1"
    # The resolved model comes back whole (with the sandbox's id), tags and lifetime too.
    assert got.config == dataclasses.replace(CONFIG, sandbox_id=r.id)
    assert (got.tags, got.max_lifetime_seconds) == (("a", "b"), 60.0)
    assert registry.get_by_request("local", "req-1") == got
    assert registry.get_by_request("other", "req-1") is None
    r.status, r.reason, r.exit_code, r.ended_ns = COMPLETED, "", 0, 5
    registry.update_sandbox(r)
    got = registry.get_sandbox(r.id)
    assert got is not None and (got.status, got.exit_code, got.ended_ns) == (COMPLETED, 0, 5)
    assert got.terminal
    with pytest.raises(sqlite3.IntegrityError):
        registry.insert_sandbox(SandboxRecord(**{**_fields(rec(1)), "id": "sbx-x"}))
    assert registry.delete_sandbox(r.id)
    assert not registry.delete_sandbox(r.id)
    assert registry.get_sandbox(r.id) is None


def _fields(r: SandboxRecord) -> dict[str, object]:
    return {k: getattr(r, k) for k in r.__slots__}  # type: ignore[attr-defined]


def test_same_request_id_for_two_owners(registry: Registry) -> None:
    registry.insert_sandbox(rec(1, owner="alice"))
    registry.insert_sandbox(SandboxRecord(**{**_fields(rec(1, owner="bob")), "id": "sbx-bob"}))
    assert registry.get_by_request("bob", "req-1").id == "sbx-bob"  # type: ignore[union-attr]


def test_pagination_walks_everything_once(registry: Registry) -> None:
    for i in range(25):
        registry.insert_sandbox(rec(i))
    registry.insert_sandbox(rec(99, owner="other"))
    seen: list[str] = []
    token = ""
    pages = 0
    while True:
        page, token = registry.list_sandboxes(
            "local", statuses=ALL_STATUSES, limit=10, page_token=token
        )
        seen.extend(r.id for r in page)
        pages += 1
        if not token:
            break
    assert pages == 3
    assert seen == [f"sbx-{i:04d}" for i in range(25)]


def test_exact_page_has_no_token(registry: Registry) -> None:
    for i in range(10):
        registry.insert_sandbox(rec(i))
    page, token = registry.list_sandboxes("local", statuses=ALL_STATUSES, limit=10)
    assert len(page) == 10 and token == ""


def test_tag_filter_is_all_of_and_status_filter(registry: Registry) -> None:
    registry.insert_sandbox(rec(1, tags=("a",)))
    registry.insert_sandbox(rec(2, tags=("a", "b")))
    registry.insert_sandbox(rec(3, tags=("a", "b", "c"), status=COMPLETED))
    registry.insert_sandbox(rec(4, tags=("b",), status=PENDING))

    def ids(tags: tuple[str, ...], statuses: frozenset[SandboxStatus] = ALL_STATUSES) -> list[str]:
        page, _ = registry.list_sandboxes("local", statuses=statuses, tags=tags)
        return [r.id[-1] for r in page]

    assert ids(("a",)) == ["1", "2", "3"]
    assert ids(("a", "b")) == ["2", "3"]
    assert ids(("b", "a", "b")) == ["2", "3"]
    assert ids(("a", "b"), frozenset({RUNNING})) == ["2"]
    assert ids((), frozenset({PENDING, COMPLETED})) == ["3", "4"]
    assert ids(("zzz",)) == []


def test_page_tokens() -> None:
    assert decode_page_token(encode_page_token(123, "sbx-1")) == (123, "sbx-1")
    for bad in ("!!!", "bm90YXRva2Vu", encode_page_token(1, "")[:-1] + "@"):
        with pytest.raises(InvalidArgument, match=r"^page_token"):
            decode_page_token(bad)


def test_leases(registry: Registry) -> None:
    registry.upsert_lease(LeaseRecord("local", "L", 30.0, 10))
    registry.upsert_lease(LeaseRecord("local", "L", 5.0, 20))
    registry.upsert_lease(LeaseRecord("bob", "L", 1.0, 30))
    assert sorted(registry.all_leases(), key=lambda x: x.owner) == [
        LeaseRecord("bob", "L", 1.0, 30), LeaseRecord("local", "L", 5.0, 20)
    ]  # fmt: skip
    registry.delete_lease("local", "L")
    assert [x.owner for x in registry.all_leases()] == ["bob"]


def test_api_keys(registry: Registry) -> None:
    info, key = auth.create_key(registry, "alice", "laptop")
    assert key.startswith("avt_") and len(key) > 40
    stored = registry.list_keys()
    assert len(stored) == 1 and stored[0].hash == auth.hash_key(key) and key not in stored[0].hash
    a = auth.Authenticator(registry)
    assert a.owner_of("ipv4:127.0.0.1:5", [("authorization", f"Bearer {key}")]) == "alice"
    assert a.owner_of("unix:", []) == "local"
    assert a.owner_of("unix:", [("authorization", f"Bearer {key}")]) == "alice"
    for peer, md in [
        ("ipv4:127.0.0.1:5", []),
        ("ipv4:127.0.0.1:5", [("authorization", "Bearer avt_wrong")]),
        ("ipv4:127.0.0.1:5", [("authorization", key)]),
        ("unix:", [("authorization", "Bearer nope")]),
    ]:
        with pytest.raises(Unauthenticated):
            a.owner_of(peer, md)
    assert [k.name for k in auth.list_keys(registry, "alice")] == ["laptop"]
    assert auth.list_keys(registry, "bob") == []
    assert auth.revoke_key(registry, info.id)
    assert not auth.revoke_key(registry, info.id)
    with pytest.raises(Unauthenticated, match="revoked"):
        a.owner_of("ipv4:127.0.0.1:5", [("authorization", f"Bearer {key}")])


def test_a_model_field_added_later_reads_as_its_default(registry: Registry) -> None:
    """A row written before a field joined the model reads with the field's default."""
    registry.insert_sandbox(rec(7))
    db = sqlite3.connect(registry.path)
    db.execute(
        "UPDATE sandboxes SET model = json_remove(model, '$.image_command', '$.node_selector')"
    )
    db.commit()
    got = registry.get_sandbox("sbx-0007")
    assert got is not None
    assert got.config == dataclasses.replace(CONFIG, sandbox_id="sbx-0007", node_selector=())
