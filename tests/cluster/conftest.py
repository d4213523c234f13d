"""Fixtures of the cluster tests: one real Ray cluster for all of them (see raycluster.py).

`ray_cluster` builds a head and two workers in network namespaces and starts the control plane
(`python -m aviato.server --placement ray`) in the head's namespace; `AVIATO_BASE_URL` points
the SDK at it while the tests of this directory run. It is package-scoped rather than
session-scoped: built once, and torn down (every process, namespace, link and file removed) as
soon as these tests are done, so that the rest of a full `pytest` run neither shares two cores
with three raylets nor sees `AVIATO_BASE_URL`. The tests skip only when this machine cannot
build the cluster (not root, no network namespaces, no Ray); CI runs as root, so there they run.
"""

from __future__ import annotations

import os
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

sys.path.insert(0, str(Path(__file__).parent))

from _system_tools import require_tools
from raycluster import RayCluster, netns_supported

from aviato import Sandbox, SandboxDefaults, Session
from aviato.v1 import sandbox_pb2_grpc

# Short enough that the "fails after the deadline" test is quick, long enough for the waits.
PLACEMENT_TIMEOUT = 6.0


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests that break the cluster for good (a node killed, a node cut off) run after all the
    others of this package, whatever module they are in; the rest keep their order."""
    here = Path(__file__).parent
    ours = [i for i in items if here in Path(str(i.path)).parents]
    if not ours:
        return
    last = [i for i in ours if i.get_closest_marker("breaks_cluster") is not None]
    if not last:
        return
    first_index = items.index(ours[0])
    rest = [i for i in ours if i not in last]
    others = [i for i in items if i not in ours]
    items[:] = others[:first_index] + rest + last + others[first_index:]


@pytest.fixture(scope="package")
def ray_cluster() -> Iterator[RayCluster]:
    if os.geteuid() == 0:
        require_tools("ip", "nsenter")
    reason = netns_supported()
    if reason:
        pytest.skip(f"cluster tests: {reason}")
    cluster = RayCluster(placement_timeout=PLACEMENT_TIMEOUT, node_lease=5.0)
    cluster.start()
    saved = os.environ.get("AVIATO_BASE_URL")
    os.environ["AVIATO_BASE_URL"] = cluster.base_url
    try:
        yield cluster
    finally:
        if saved is None:
            os.environ.pop("AVIATO_BASE_URL", None)
        else:
            os.environ["AVIATO_BASE_URL"] = saved
        cluster.stop()
        leaked = cluster.leaked_processes()
        assert not leaked, f"sandbox processes outlived the cluster: {leaked}"


@pytest.fixture(scope="package")
def stub(ray_cluster: RayCluster) -> Iterator[sandbox_pb2_grpc.SandboxServiceStub]:
    """The raw API (for fields the SDK does not expose, such as node_selector)."""
    channel = grpc.insecure_channel(ray_cluster.base_url)
    try:
        yield sandbox_pb2_grpc.SandboxServiceStub(channel)  # type: ignore[no-untyped-call]
    finally:
        channel.close()


# Cluster-backed equivalents of the fixtures that the SDK tests imported into
# test_sdk_subset.py expect (tests/sdk/conftest.py `sandbox`, tests/sdk/test_function.py
# `session`), under the same names and scopes.


@pytest.fixture(scope="module")
def sandbox(ray_cluster: RayCluster) -> Iterator[Sandbox]:
    """A running sandbox on the cluster shared by the tests of a module, stopped afterwards."""
    from sdk.conftest import TEST_TAG

    with Sandbox.run(tags=[TEST_TAG]) as sb:
        sb.wait(timeout=60)
        yield sb


@pytest.fixture
def session(ray_cluster: RayCluster) -> Iterator[Session]:
    """A session on the cluster for the remote-function tests, closed afterwards.

    Per test rather than per module (as in tests/sdk): a session keeps its function sandboxes
    until it closes, and the test cluster holds only eight sandboxes at the default 1 GiB
    reservation (two workers of 4 GiB), which the other tests of the module need too."""
    from sdk.conftest import TEST_TAG

    with Session(SandboxDefaults(tags=(TEST_TAG, f"f-{uuid.uuid4().hex[:8]}"))) as s:
        yield s
