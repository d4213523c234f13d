"""Per-owner quotas (pure logic beside the real-service tests in tests/security/test_quotas.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from aviato.server.quotas import Charge, OwnerQuotas, Quota, QuotaExceeded, format_cpu
from aviato.server.registry import OwnerQuotaRecord, Registry

MiB, GiB = 1 << 20, 1 << 30


def small(cpu: int = 100, memory: int = 64 * MiB, disk: int = 64 * MiB) -> Charge:
    return Charge(cpu_millis=cpu, memory_bytes=memory, disk_bytes=disk)


def test_no_quota_refuses_nothing() -> None:
    quotas = OwnerQuotas(Quota())
    for _ in range(1000):
        quotas.check("a", small())
        quotas.charge("a", small())
    assert quotas.usage_of("a")[0] == 1000


def test_each_bound_names_only_the_owners_usage() -> None:
    quotas = OwnerQuotas(Quota(sandboxes=2, cpu_millis=1000, memory_bytes=GiB, disk_bytes=GiB))
    for _ in range(2):
        quotas.charge("a", small())
        quotas.charge("b", small())
    for _ in range(50):
        quotas.charge("c", small())  # another owner far over: changes nothing for "a"
    with pytest.raises(QuotaExceeded) as err:
        quotas.check("a", small())
    assert str(err.value) == (
        "quota reached: you have 2 live sandboxes and your limit is 2; stop or delete some of "
        "yours first"
    )
    quotas.release("a", small())
    with pytest.raises(QuotaExceeded, match=r"needs memory 1Gi, and your live sandboxes already "
                       r"hold 64Mi of your memory quota of 1Gi"):  # fmt: skip
        quotas.check("a", small(memory=GiB))
    with pytest.raises(QuotaExceeded, match=r"needs cpu 2 \(no cpu limit lets it use all"):
        quotas.check("a", Charge(2000, MiB, MiB, cpu_default=True))
    with pytest.raises(QuotaExceeded, match=r"needs disk 2Gi \(the default, as it asks for "
                       r"none\), more than your whole disk quota of 1Gi"):  # fmt: skip
        quotas.check("a", Charge(1, MiB, 2 * GiB, disk_default=True))
    quotas.check("a", small())  # within every bound
    quotas.release("a", small())
    assert quotas.usage_of("a") == (0, 0, 0, 0)
    quotas.release("a", small())  # nothing held: no negative usage
    assert quotas.usage_of("a") == (0, 0, 0, 0)


def test_an_owners_row_replaces_the_default_field_by_field(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "r.db")
    quotas = OwnerQuotas(Quota(sandboxes=1, memory_bytes=GiB), reg)
    reg.set_owner_quota(OwnerQuotaRecord("a", sandboxes=0, cpu_millis=500))
    assert quotas.quota_of("a") == Quota(sandboxes=0, cpu_millis=500, memory_bytes=GiB)
    assert quotas.quota_of("b") == Quota(sandboxes=1, memory_bytes=GiB)
    quotas.charge("a", small())
    quotas.check("a", small())  # no bound on the count for "a"
    assert quotas.describe("a") == (
        "sandboxes 1 (no bound), cpu 0.1 of 0.5, memory 64Mi of 1Gi, disk 64Mi (no bound)"
    )
    reg.set_owner_quota(OwnerQuotaRecord("a"))  # all None: back to the defaults
    assert reg.get_owner_quota("a") is None
    with pytest.raises(QuotaExceeded):
        quotas.check("a", small())
    reg.close()


def test_format_cpu() -> None:
    assert [format_cpu(m) for m in (1, 250, 1000, 1500, 64000)] == [
        "0.001", "0.25", "1", "1.5", "64"
    ]  # fmt: skip
