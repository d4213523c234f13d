"""Egress of a sandbox on another node (issue 16, under `--placement ray`).

The sandbox's proxy runs in the node host of its node (cluster/node_egress.py), driven by the
control plane through node.proto's egress block (cluster/remote_egress.py). On the Ray cluster
of network namespaces (conftest.py): a sandbox on w1 reaches an HTTP server in w2's namespace
through its proxy by a CIDR rule (the cluster's addresses are private: only a CIDR admits them);
w1's own address (admitted by a rule, but "the host's own" for w1's proxy), the head's
(outside the rules) and an address nowhere are refused at once with 403; the proxy is served
again by a node host that Ray restarted; `set_network(deny_egress=True)` refuses from then on;
the figures count, live and final; and the proxy goes on serving while the control plane
restarts, and is driven by the restarted one.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from _wait import wait_until
from raycluster import RayCluster

import aviato
from aviato import EgressRule, NetworkOptions, Sandbox

TAG = f"cluster-egress-{uuid.uuid4().hex[:8]}"
FAST = 1.0  # seconds: a refusal is a few ms

# Runs in the sandbox: one GET through the proxy its environment names (as pip or curl would).
GET = """
import json, sys, time, urllib.error, urllib.request
t0 = time.monotonic()
try:
    with urllib.request.urlopen(sys.argv[1], timeout=15) as answer:
        report = {"status": answer.status, "body": answer.read().decode()}
except urllib.error.HTTPError as e:
    report = {"status": e.code, "body": e.read().decode(errors="replace")}
except OSError as e:
    report = {"status": None, "body": str(e)}
report["seconds"] = time.monotonic() - t0
print(json.dumps(report))
"""


@contextlib.contextmanager
def _http_server(cluster: RayCluster, role: str) -> Iterator[str]:
    """An HTTP server in a node's namespace on its cluster address; yields "ip:port"."""
    ip = cluster.ips[role]
    port = 18000 + os.getpid() % 1000
    with tempfile.TemporaryDirectory() as directory:
        (Path(directory) / "who.txt").write_text(f"on {role}\n")
        server = subprocess.Popen(
            [*cluster.enter(role), sys.executable, "-m", "http.server", str(port),
             "--bind", ip, "--directory", directory],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            probe = f"import socket; socket.create_connection(('{ip}', {port}), timeout=1)"
            wait_until(
                lambda: (
                    subprocess.run(
                        [*cluster.enter("head"), sys.executable, "-c", probe], capture_output=True
                    ).returncode
                    == 0
                ),
                f"the HTTP server on {role}",
            )
            yield f"{ip}:{port}"
        finally:
            server.terminate()
            server.wait(10)


def _get(sb: Sandbox, url: str) -> dict[str, Any]:
    result = sb.exec(["python3", "-c", GET, url]).result(timeout=60)
    assert result.returncode == 0, result.stderr
    report: dict[str, Any] = json.loads(result.stdout.splitlines()[-1])
    return report


def _refused_fast(report: dict[str, Any]) -> bool:
    return bool(report["status"] == 403 and report["seconds"] < FAST)


@pytest.mark.slow
def test_egress_of_a_sandbox_on_a_worker_node(ray_cluster: RayCluster) -> None:
    ips = ray_cluster.ips
    with (
        _http_server(ray_cluster, "w2") as on_w2,
        _http_server(ray_cluster, "head") as on_head,
        Sandbox.run(
            "sleep",
            "infinity",
            tags=[TAG],
            node_selector={"aviato-test": "w1"},
            # w2 is admitted; w1's own address is not, rule or not (the host's own for w1).
            network=NetworkOptions(
                egress=[EgressRule(cidr=f"{ips['w2']}/32"), EgressRule(cidr=f"{ips['w1']}/32")]
            ),
        ) as sb,
    ):
        sb.wait(timeout=60)
        assert sb.status == aviato.SandboxStatus.RUNNING and sb.node != "local"
        assert sb.applied_egress_mode == "allowlist"

        answer = _get(sb, f"http://{on_w2}/who.txt")
        assert answer["status"] == 200 and answer["body"] == "on w2\n", answer
        t0 = time.perf_counter()
        for _ in range(20):
            sb.get_status()  # one actor call to w1's node host each for the figures
        print(
            f"GetSandbox of a sandbox served on w1: {(time.perf_counter() - t0) / 20 * 1e3:.2f} ms"
        )
        own = on_w2.replace(ips["w2"], ips["w1"])
        for url in (f"http://{own}/who.txt", f"http://{on_head}/who.txt", "http://198.51.100.7/"):
            report = _get(sb, url)
            assert _refused_fast(report), (url, report)
        sb.get_status()
        usage = sb.network_usage
        assert usage.connections == 1 and usage.refused == 3, usage
        assert usage.bytes_received > len("on w2\n") and usage.bytes_sent > 0, usage
        listed = [s for s in Sandbox.list(tags=[TAG]).result() if s.sandbox_id == sb.sandbox_id]
        assert listed and listed[0].network_usage.connections == 1

        # A node host that Ray restarts serves the sandbox's proxy again (egress.json).
        pids = re.findall(rf"node host ready on {sb.node} .*?pid (\d+)",
                          ray_cluster.server_log.read_text())  # fmt: skip
        assert pids
        os.kill(int(pids[-1]), signal.SIGKILL)
        t0 = time.monotonic()
        while True:  # the first calls may fail while Ray restarts the actor
            try:
                answer = _get(sb, f"http://{on_w2}/who.txt")
                break
            except aviato.AviatoError:
                assert time.monotonic() - t0 < 60
                time.sleep(0.5)
        assert answer["status"] == 200 and answer["body"] == "on w2\n", answer
        print(f"egress served again {time.monotonic() - t0:.2f} s after the node host was killed")

        # Closing it while it runs: refused at once from then on.
        sb.set_network(deny_egress=True).result(timeout=30)
        assert sb.applied_egress_mode == "isolated"
        report = _get(sb, f"http://{on_w2}/who.txt")
        assert _refused_fast(report), report
        # Opening another address: the head's server, outside the rule before.
        sb.set_network(egress=[EgressRule(cidr=f"{ips['head']}/32")]).result(timeout=30)
        answer = _get(sb, f"http://{on_head}/who.txt")
        assert answer["status"] == 200 and answer["body"] == "on head\n", answer
        sb.get_status()
        live = sb.network_usage
        assert live.connections >= 2 and live.refused >= 1, live
        sb.stop(graceful_shutdown_seconds=0).result(timeout=30)

    assert sb.sandbox_id is not None
    ended = Sandbox.from_id(sb.sandbox_id).result(timeout=30)
    wait_until(
        lambda: (
            ended.get_status() is not None and ended.network_usage.connections >= live.connections
        ),
        "the final figures of the ended sandbox",
    )
    assert ended.network_usage.refused >= live.refused


# The sandbox's main process: a GET through its proxy every 0.2 s, each answer's time and status
# appended to a file (the proxy variables are in its environment: it was created with egress).
FETCH_FOREVER = """
import sys, time, urllib.error, urllib.request
while True:
    try:
        with urllib.request.urlopen(sys.argv[1], timeout=5) as answer:
            status = answer.status
    except urllib.error.HTTPError as e:
        status = e.code
    except OSError:
        status = 0
    with open("/tmp/fetches", "a") as out:
        out.write(f"{time.time()} {status}\\n")
    time.sleep(0.2)
"""


def _fetches(sb: Sandbox) -> list[tuple[float, int]]:
    try:
        lines = sb.read_file("/tmp/fetches").result(timeout=30).decode().splitlines()
    except aviato.SandboxFileError:  # none yet
        return []
    return [(float(t), int(s)) for t, s in (line.split() for line in lines if " " in line)]


@pytest.mark.slow
def test_egress_goes_on_while_the_control_plane_restarts(ray_cluster: RayCluster) -> None:
    ips = ray_cluster.ips
    with _http_server(ray_cluster, "w2") as on_w2:
        sb = Sandbox.run(
            "python3", "-c", FETCH_FOREVER, f"http://{on_w2}/who.txt",
            tags=[TAG],
            node_selector={"aviato-test": "w1"},
            network=NetworkOptions(egress=[EgressRule(cidr=f"{ips['w2']}/32")]),
        )  # fmt: skip
        assert sb.sandbox_id is not None
        try:
            sb.wait(timeout=60)
            wait_until(lambda: any(s == 200 for _, s in _fetches(sb)), "a first fetch")
            ray_cluster.stop_server()
            down = time.time()
            time.sleep(2)
            up = time.time()
            ray_cluster.start_server()
            sb = Sandbox.from_id(sb.sandbox_id).result(timeout=30)
            fetches = _fetches(sb)
            while_down = [s for t, s in fetches if down < t < up]
            assert while_down and set(while_down) == {200}, fetches[-30:]
            # The restarted control plane drives the node's proxy again (found by `open`).
            sb.get_status()
            assert sb.network_usage.connections >= len(while_down)
            sb.set_network(deny_egress=True).result(timeout=30)
            denied = time.time()
            wait_until(
                lambda: any(t > denied and s == 403 for t, s in _fetches(sb)), "a refused fetch"
            )
            assert {s for t, s in _fetches(sb) if t > denied + 1} <= {403}
        finally:
            sb.stop(graceful_shutdown_seconds=0).result(timeout=30)
