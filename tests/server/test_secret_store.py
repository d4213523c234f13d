"""The secret store (server/secret_store.py) over a real registry file: sealed at rest, owner
and name bound into each value, a key made once and never replaced, names never repeated in
errors (a value given where a name goes must not reach a log), bounds."""

from __future__ import annotations

from pathlib import Path

import pytest

from aviato.runtime.model import SandboxConfig
from aviato.server.errors import (
    AlreadyExists,
    CapacityExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
)
from aviato.server.records import kept_config
from aviato.server.registry import Registry
from aviato.server.secret_store import (
    MAX_SECRETS_PER_OWNER,
    MAX_VALUE_BYTES,
    SecretStore,
    validate_secret_names,
)

VALUE = "sk-live-0123456789abcdef"


@pytest.fixture
def store(tmp_path: Path) -> SecretStore:
    registry = Registry(tmp_path / "registry.db")
    return SecretStore(registry.connection, tmp_path / "secrets.key")


def _config(*names: str) -> SandboxConfig:
    return SandboxConfig(sandbox_id="sbx-1", image="host", command=(), env={}, working_dir="",
                         secrets=names)  # fmt: skip


def test_values_are_sealed_and_resolved_per_owner(store: SecretStore, tmp_path: Path) -> None:
    assert not (tmp_path / "secrets.key").exists()  # made at the first need only
    store.create("alice", "TOKEN", VALUE, replace_value=False)
    key = tmp_path / "secrets.key"
    assert key.stat().st_mode & 0o777 == 0o600 and key.stat().st_size == 32
    for path in tmp_path.iterdir():  # registry, WAL, key: the value is in none of them
        assert VALUE.encode() not in path.read_bytes(), path
    resolved = store.resolve("alice", _config("TOKEN"))
    assert resolved.secret_env == {"TOKEN": VALUE}
    assert VALUE not in repr(resolved)  # a config printed in a log shows no value
    assert kept_config(resolved).secret_env == {}  # what a record keeps
    assert [s.name for s in store.list("alice")] == ["TOKEN"] and store.list("bob") == []
    with pytest.raises(InvalidArgument, match="you have no secret named TOKEN"):
        store.resolve("bob", _config("TOKEN"))
    with pytest.raises(NotFound):
        store.delete("bob", "TOKEN")


def test_replace_delete_and_a_key_that_survives(store: SecretStore, tmp_path: Path) -> None:
    store.create("alice", "TOKEN", "one", replace_value=False)
    with pytest.raises(AlreadyExists):
        store.create("alice", "TOKEN", "two", replace_value=False)
    info = store.create("alice", "TOKEN", "two", replace_value=True)
    assert info.updated_ns >= info.created_ns
    # Another store on the same files (a restarted service) reads it with the same key.
    again = SecretStore(Registry(tmp_path / "registry.db").connection, tmp_path / "secrets.key")
    assert again.resolve("alice", _config("TOKEN")).secret_env == {"TOKEN": "two"}
    again.delete("alice", "TOKEN")
    assert again.list("alice") == []


def test_a_row_moved_to_another_owner_or_name_does_not_open(store: SecretStore) -> None:
    store.create("alice", "TOKEN", VALUE, replace_value=False)
    store.create("bob", "TOKEN", "bob's", replace_value=False)
    store.create("alice", "OTHER", "other", replace_value=False)
    db = store._db
    db.execute(
        "UPDATE secrets SET sealed=(SELECT sealed FROM secrets WHERE owner='alice' AND "
        "name='TOKEN') WHERE owner='bob' OR name='OTHER'"
    )
    for owner, name in (("bob", "TOKEN"), ("alice", "OTHER")):
        with pytest.raises(FailedPrecondition, match="cannot be read") as err:
            store.resolve(owner, _config(name))
        assert VALUE not in str(err.value)


def test_a_damaged_key_is_refused_never_replaced(store: SecretStore, tmp_path: Path) -> None:
    store.create("alice", "TOKEN", VALUE, replace_value=False)
    key = tmp_path / "secrets.key"
    key.write_bytes(b"short")
    fresh = SecretStore(store._db, key)
    with pytest.raises(FailedPrecondition, match="damaged"):
        fresh.resolve("alice", _config("TOKEN"))
    assert key.read_bytes() == b"short"


def test_a_key_file_planted_as_a_symlink_is_refused(tmp_path: Path) -> None:
    chosen = tmp_path / "chosen"
    chosen.write_bytes(b"k" * 32)  # someone else's key, of the right size
    (tmp_path / "secrets.key").symlink_to(chosen)
    store = SecretStore(Registry(tmp_path / "registry.db").connection, tmp_path / "secrets.key")
    with pytest.raises(FailedPrecondition, match="damaged"):
        store.create("alice", "TOKEN", VALUE, replace_value=False)
    assert store.list("alice") == []


def test_names_values_and_bounds(store: SecretStore) -> None:
    for bad in ("", "1X", "A-B", "A B", "x" * 129, VALUE):
        with pytest.raises(InvalidArgument) as err:
            store.create("alice", bad, "v", replace_value=False)
        assert not bad or bad not in str(err.value)  # never repeated
    with pytest.raises(InvalidArgument, match="at most"):
        store.create("alice", "BIG", "x" * (MAX_VALUE_BYTES + 1), replace_value=False)
    with pytest.raises(InvalidArgument, match="NUL"):
        store.create("alice", "NUL", "a\x00b", replace_value=False)
    with pytest.raises(InvalidArgument, match="both an environment variable and a secret"):
        validate_secret_names(["TOKEN"], {"TOKEN": "x"}, "spec.secrets")
    assert validate_secret_names(["A", "B", "A"], {}, "spec.secrets") == ("A", "B")
    for i in range(MAX_SECRETS_PER_OWNER):
        store.create("many", f"S{i}", "v", replace_value=False)
    with pytest.raises(CapacityExceeded):
        store.create("many", "ONE_MORE", "v", replace_value=False)
    store.create("many", "S0", "w", replace_value=True)  # replacing is not one more
