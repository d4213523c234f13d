"""Creating sandboxes beyond the configured capacity is refused, and nobody else degrades.

`--max-sandboxes` bounds live sandboxes, `--max-memory` the sum of their memory limits. A burst
of creates far beyond the bound yields exactly the bound's worth of sandboxes and
RESOURCE_EXHAUSTED with a message naming the bound for every other one; the sandboxes already
running keep answering; stopping one frees its share. The SDK raises
`SandboxResourceExhaustedError`. (The basic count and memory refusals are also pinned by
tests/server/test_limits.py::test_capacity_count_and_memory.)
"""

from __future__ import annotations

import json
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from aviato.v1 import sandbox_pb2 as pb

from .harness import RUNNING, Service, code_of, details_of, read_until, spawn_sdk_script

LIMIT = 5


@pytest.mark.slow
def test_burst_beyond_count_and_memory_capacity(make_service: Callable[..., Service]) -> None:
    svc = make_service("--max-sandboxes", str(LIMIT), "--max-memory", "2Gi")
    c = svc.client()
    if svc.stub().GetServerInfo(pb.GetServerInfoRequest(), timeout=10).cgroups == "none":
        pytest.skip("memory limits need cgroups (a rootless service without a delegated subtree)")

    def attempt(i: int) -> object:
        try:
            return c.create(resources={"memory": "256Mi"}, tags=[f"burst-{i}"])
        except grpc.RpcError as e:
            return e

    with ThreadPoolExecutor(20) as pool:
        outcomes = list(pool.map(attempt, range(4 * LIMIT)))
    made = [o for o in outcomes if not isinstance(o, grpc.RpcError)]
    refused = [o for o in outcomes if isinstance(o, grpc.RpcError)]
    assert len(made) == LIMIT, outcomes
    for err in refused:
        assert code_of(err) == grpc.StatusCode.RESOURCE_EXHAUSTED, err
        assert f"{LIMIT} of {LIMIT} sandboxes are live" in details_of(err)
        assert "--max-sandboxes" in details_of(err)
    # The admitted sandboxes all run and answer, untouched by the refusals.
    for sb in made:
        assert c.wait(sb.id).status == RUNNING  # type: ignore[attr-defined]
        assert c.exec(sb.id, ["/bin/echo", "fine"]).stdout == b"fine\n"  # type: ignore[attr-defined]

    # Memory: stop two (3 x 256Mi = 768Mi reserved of 2Gi), then ask for more than is left.
    for sb in made[:2]:
        c.stop(sb.id)  # type: ignore[attr-defined]
    try:
        c.create(resources={"memory": "1.5Gi"})
    except grpc.RpcError as e:
        assert code_of(e) == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "memory capacity exhausted: requested 1.5Gi, 768Mi of 2Gi" in details_of(e), e
    else:
        raise AssertionError("a create beyond --max-memory was admitted")
    # A sandbox without a memory limit counts as the default (1 GiB): 1.75Gi of 2Gi fits.
    fits = c.running()
    assert c.exec(fits.id, ["/bin/true"]).exit_code == 0

    # Through the SDK: a typed exception with the service's message.
    proc = spawn_sdk_script(
        svc,
        """
import json
from aviato import Sandbox
try:
    Sandbox.run(resources={"memory": "512Mi"}).wait()  # 1.75Gi + 512Mi > 2Gi
    print("outcome " + json.dumps({"kind": "created"}), flush=True)
except Exception as e:
    print("outcome " + json.dumps({"kind": type(e).__name__, "msg": str(e)}), flush=True)
""",
    )
    outcome = json.loads(read_until(proc, "outcome")[-1].split(" ", 1)[1])
    proc.wait(30)
    assert outcome["kind"] == "SandboxResourceExhaustedError", outcome
    assert "capacity exhausted" in outcome["msg"], outcome
    info = svc.stub().GetServerInfo(pb.GetServerInfoRequest(), timeout=10)
    assert info.max_sandboxes == LIMIT and info.sandboxes_running == 4


def test_a_host_low_on_memory_refuses_creates(make_service: Callable[..., Service]) -> None:
    """Below `--min-free-memory` of MemAvailable, creates are refused whatever the limits say."""
    svc = make_service("--min-free-memory", "100Ti")  # more than any host has available
    with pytest.raises(grpc.RpcError) as caught:
        svc.client().create()
    assert code_of(caught.value) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "host memory low" in details_of(caught.value)
    assert "--min-free-memory" in details_of(caught.value)
    listed = svc.stub().ListSandboxes(pb.ListSandboxesRequest(include_terminated=True), timeout=10)
    assert list(listed.sandboxes) == []  # refused, not recorded


def test_a_host_low_on_disk_refuses_creates(make_service: Callable[..., Service]) -> None:
    """Below `--min-free-disk` on the state directory's filesystem, creates are refused."""
    svc = make_service("--min-free-disk", "100Pi")
    with pytest.raises(grpc.RpcError) as caught:
        svc.client().create()
    assert code_of(caught.value) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "host disk low" in details_of(caught.value)
    assert "--min-free-disk" in details_of(caught.value)
