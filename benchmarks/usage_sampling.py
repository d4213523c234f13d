"""What the operator's view costs (issue 20; docs/benchmarks.md "The operator's view").

1. Usage sampling with N idle sandboxes (default 500): the service's CPU % and resident memory
   over a window, with sampling off, at its default interval (5 s), and at 0.1 s (the rings fill
   in 36 s, so the history reaches its bound), the same sandboxes re-attached by each restart.
   The time of one sampling round is read from /metrics (`aviato_usage_round_seconds`).
2. The gRPC path with the HTTP side busy: p50/p99 of a RunCommand of `/bin/true`, alone and
   while a client scrapes /metrics and renders the dashboard's list every 0.2 s.

    nice .venv/bin/python benchmarks/usage_sampling.py [--sandboxes 500] [--window 30]

Run it alone on the machine (it starts its own service in a temporary state directory).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import grpc

from aviato.v1 import sandbox_pb2 as pb
from aviato.v1 import sandbox_pb2_grpc as pbg

TICKS = os.sysconf("SC_CLK_TCK")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Service:
    def __init__(self, state: Path, http: int, interval: float) -> None:
        self.state, self.http, self.interval = state, http, interval
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = open(self.state.parent / "server.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "aviato.server", "--state-dir", str(self.state),
             "--cgroup-parent", "aviato-bench-usage", "--max-sandboxes", "2000",
             "--http", f"127.0.0.1:{self.http}", "--usage-interval", str(self.interval),
             "--log-level", "WARNING"],
            stdout=log, stderr=log, start_new_session=True,
        )  # fmt: skip
        sock = self.state / "aviato.sock"
        for _ in range(600):
            if sock.exists():
                try:
                    self.stub().GetServerInfo(pb.GetServerInfoRequest(), timeout=2)
                    return
                except grpc.RpcError:
                    pass
            time.sleep(0.1)
        raise RuntimeError("the service did not start")

    def stub(self) -> pbg.SandboxServiceStub:
        channel = grpc.insecure_channel(f"unix:{self.state / 'aviato.sock'}")
        return pbg.SandboxServiceStub(channel)  # type: ignore[no-untyped-call]

    def stop(self) -> None:
        assert self.proc is not None
        self.proc.terminate()
        self.proc.wait(60)

    def cpu_seconds(self) -> float:
        assert self.proc is not None
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / TICKS

    def rss_bytes(self) -> int:
        assert self.proc is not None
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0

    def metric(self, name: str) -> float:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http}/metrics", timeout=10) as r:
            for line in r.read().decode().splitlines():
                if line.startswith(name + " "):
                    return float(line.split()[1])
        return float("nan")


def _window(service: Service, seconds: float) -> dict[str, float]:
    c0, t0 = service.cpu_seconds(), time.monotonic()
    time.sleep(seconds)
    c1, t1 = service.cpu_seconds(), time.monotonic()
    return {
        "cpu_percent": round((c1 - c0) / (t1 - t0) * 100, 2),
        "rss_mib": round(service.rss_bytes() / 2**20, 1),
        "round_ms": round(service.metric("aviato_usage_round_seconds") * 1000, 2),
        "samples": service.metric("aviato_usage_samples"),
    }


def _exec_latency(stub: pbg.SandboxServiceStub, sandbox_id: str, n: int) -> dict[str, float]:
    times = []
    init = pb.ExecInit(sandbox_id=sandbox_id, argv=["/bin/true"])
    for _ in range(n):
        start = time.perf_counter()
        list(stub.RunCommand(init, timeout=30))
        times.append(time.perf_counter() - start)
    times.sort()
    return {
        "p50_ms": round(statistics.median(times) * 1000, 3),
        "p99_ms": round(times[int(len(times) * 0.99) - 1] * 1000, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sandboxes", type=int, default=500)
    parser.add_argument("--window", type=float, default=30.0)
    parser.add_argument("--execs", type=int, default=400)
    args = parser.parse_args()
    results: dict[str, object] = {"sandboxes": args.sandboxes, "window_s": args.window,
                                  "load_before": os.getloadavg()[0]}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="avt-bu-", dir="/tmp") as tmp:
        state = Path(tmp) / "state"
        http = _free_port()
        service = Service(state, http, 0)
        service.start()
        stub = service.stub()
        ids = []
        for _ in range(args.sandboxes):
            sb = stub.CreateSandbox(pb.CreateSandboxRequest(request_id=str(uuid.uuid4())),
                                    timeout=60)  # fmt: skip
            ids.append(sb.id)
        for sid in ids:
            stub.WaitSandbox(pb.WaitSandboxRequest(
                sandbox_id=sid, condition=pb.WaitSandboxRequest.CONDITION_STARTED,
                timeout_seconds=60), timeout=90)  # fmt: skip
        try:
            for label, interval in (("off", 0.0), ("every 5 s", 5.0), ("every 0.1 s", 0.1)):
                if interval:
                    service.stop()
                    service = Service(state, http, interval)
                    service.start()
                time.sleep(5 if interval != 0.1 else 40)  # settle; at 0.1 s, fill the rings
                results[label] = _window(service, args.window)
                print(label, results[label], flush=True)
            # The gRPC path, with and without the HTTP side busy (sampling at 5 s).
            service.stop()
            service = Service(state, http, 5.0)
            service.start()
            stub = service.stub()
            _exec_latency(stub, ids[0], 50)  # warm
            results["exec alone"] = _exec_latency(stub, ids[0], args.execs)
            stop = threading.Event()
            scrapes = [0]

            def scrape() -> None:
                while not stop.is_set():
                    for path in ("/metrics", "/"):
                        url = f"http://127.0.0.1:{http}{path}"
                        with urllib.request.urlopen(url, timeout=10) as r:
                            r.read()
                    scrapes[0] += 1
                    stop.wait(0.2)

            scraper = threading.Thread(target=scrape)
            scraper.start()
            results["exec while scraped"] = _exec_latency(stub, ids[0], args.execs)
            stop.set()
            scraper.join()
            results["scrapes"] = scrapes[0]
            start = time.perf_counter()
            with urllib.request.urlopen(f"http://127.0.0.1:{http}/metrics", timeout=10) as r:
                size = len(r.read())
            results["one scrape"] = {"ms": round((time.perf_counter() - start) * 1000, 2),
                                     "bytes": size}  # fmt: skip
            print(json.dumps(results, indent=1), flush=True)
        finally:
            for sid in ids:
                with contextlib.suppress(grpc.RpcError):
                    stub.DeleteSandbox(pb.DeleteSandboxRequest(sandbox_id=sid), timeout=60)
            service.stop()


if __name__ == "__main__":
    main()
