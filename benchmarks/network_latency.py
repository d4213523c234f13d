"""The latency a request gains through a sandbox's egress proxy (see benchmarks/network.py).

Builds the tests' small internet (tests/network/small_internet.py: network namespaces with
documentation addresses, nothing leaves this machine), starts a service in its "host"
namespace, and runs one client program, N GETs each on a new connection, three ways:

- floor: directly from the host namespace, by address (the cheapest way to do the same work);
- proxy by address: from a sandbox with `egress_mode="internet"`, through its proxy;
- proxy by name: from a sandbox with a name rule, through its proxy, which resolves the name
  with the small internet's DNS server (answers cached for their TTL, 60 s there).

HTTP and HTTPS both; medians in ms, and each proxy path's ratio to the floor.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "network"))

CLIENT = r"""
import json, os, socket, ssl, sys, time, urllib.request
url, count, ca = sys.argv[1], int(sys.argv[2]), sys.argv[3]
context = ssl.create_default_context(cafile=ca)
opener = urllib.request.build_opener(urllib.request.HTTPSHandler(context=context))
times = []
for i in range(count + 10):
    t0 = time.perf_counter()
    with opener.open(url, timeout=10) as answer:
        answer.read()
    if i >= 10:
        times.append(time.perf_counter() - t0)
print(json.dumps(times))
"""


def _median_ms(times: list[float]) -> float:
    ordered = sorted(times)
    return round(ordered[len(ordered) // 2] * 1e3, 3)


def egress_latency(count: int) -> dict[str, Any]:
    """Medians (ms) and ratios; {"egress_latency": "skipped: ..."} when it cannot run."""
    from small_internet import SmallInternet, unsupported_reason

    reason = unsupported_reason()
    if reason:
        return {"egress_latency": f"skipped: {reason}"}
    internet = SmallInternet()
    internet.start()
    state = Path(tempfile.mkdtemp(prefix="avlat", dir="/tmp"))
    service: subprocess.Popen[bytes] | None = None
    try:
        env = dict(
            os.environ, PYTHONPATH=f"{ROOT / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
        )
        service = subprocess.Popen(
            [*internet.enter("host"), sys.executable, "-m", "aviato.server", "--state-dir",
             str(state), "--egress-dns", internet.dns],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        return _measure(internet, f"unix://{state}/aviato.sock", count)
    finally:
        if service is not None:
            service.send_signal(signal.SIGTERM)
            service.wait(30)
        internet.stop()
        shutil.rmtree(state, ignore_errors=True)


def _measure(internet: Any, url: str, count: int) -> dict[str, Any]:
    from aviato import EgressRule, NetworkOptions, Sandbox, server_info

    deadline = time.monotonic() + 30
    while True:
        try:
            server_info(url, timeout_seconds=2)
            break
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    ca = internet.ca_file.read_bytes()
    files = [{"path": "/workspace/client.py", "content": CLIENT.encode()},
             {"path": "/workspace/ca.pem", "content": ca}]  # fmt: skip
    by_address = NetworkOptions(egress_mode="internet")
    by_name = NetworkOptions(egress=[EgressRule(dns_name="pypi.test")])
    out: dict[str, Any] = {}
    open_box = Sandbox.run(base_url=url, network=by_address, mounted_files=files)
    named_box = Sandbox.run(base_url=url, network=by_name, mounted_files=files)
    with open_box, named_box:
        for scheme in ("http", "https"):
            floor = json.loads(subprocess.run(
                [*internet.enter("host"), sys.executable, "-c", CLIENT,
                 f"{scheme}://198.51.100.10/", str(count), str(internet.ca_file)],
                capture_output=True, text=True, check=True, timeout=300,
            ).stdout)  # fmt: skip
            paths = {
                "proxy_by_address": (open_box, f"{scheme}://198.51.100.10/"),
                "proxy_by_name": (named_box, f"{scheme}://pypi.test/"),
            }
            out[f"egress_{scheme}_floor_ms"] = _median_ms(floor)
            for name, (box, target) in paths.items():
                result = box.exec(
                    ["python3", "/workspace/client.py", target, str(count), "/workspace/ca.pem"]
                ).result()
                if result.returncode != 0:
                    raise RuntimeError(result.stderr)
                times = json.loads(result.stdout)
                out[f"egress_{scheme}_{name}_ms"] = _median_ms(times)
                out[f"egress_{scheme}_{name}_ratio"] = round(
                    _median_ms(times) / _median_ms(floor), 2
                )
    return out
