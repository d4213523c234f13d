"""`aviato.server_info` and `aviato.Admin` against the real local service of the tests' state
directory."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

import aviato
from aviato import Admin, OwnerQuota, server_info


def test_server_info_describes_the_local_service(aviato_service: Path) -> None:
    info = server_info()
    assert info.url == f"unix://{aviato_service / 'aviato.sock'}"
    assert info.version and info.runtime and info.cgroups in ("v1", "v2", "none")
    assert Path(info.state_dir) == aviato_service


def test_server_info_fails_at_once_where_nothing_answers(tmp_path: Path) -> None:
    started = time.monotonic()
    with pytest.raises(aviato.AviatoConnectionError, match="not running"):
        server_info(start_local=False, state_dir=tmp_path)
    with pytest.raises(aviato.AviatoConnectionError):
        server_info("http://127.0.0.1:9", timeout_seconds=2)
    assert time.monotonic() - started < 5  # one attempt each, no retrying for 20 s
    assert not (tmp_path / "aviato.sock").exists()  # never started


def test_admin_keys_and_quotas(aviato_service: Path) -> None:
    admin = Admin()
    created = admin.create_key("sdk-admin-test", "laptop")
    assert created.secret.startswith("avt_") and created.key.owner == "sdk-admin-test"
    listed = admin.list_keys("sdk-admin-test")
    assert [(k.id, k.name, k.revoked) for k in listed] == [(created.key.id, "laptop", False)]
    assert created.secret not in repr(listed)  # the registry keeps only a hash
    admin.revoke_key(created.key.id)
    assert admin.list_keys("sdk-admin-test")[0].revoked
    with pytest.raises(aviato.AviatoError) as missing:
        admin.revoke_key(created.key.id)
    assert missing.value.code == "NOT_FOUND"
    with pytest.raises(aviato.SandboxValidationError, match="owner"):
        admin.create_key("")

    assert admin.owner_quotas("sdk-admin-test") == [OwnerQuota("sdk-admin-test")]
    stored = admin.set_owner_quota(OwnerQuota("sdk-admin-test", max_sandboxes=3, max_disk_bytes=0))
    assert (stored.max_sandboxes, stored.max_disk_bytes, stored.max_memory_bytes) == (3, 0, None)
    assert OwnerQuota("sdk-admin-test", max_sandboxes=3, max_disk_bytes=0) in admin.owner_quotas()
    admin.set_owner_quota(OwnerQuota("sdk-admin-test"))  # back to the service's defaults
    assert admin.owner_quotas("sdk-admin-test") == [OwnerQuota("sdk-admin-test")]
