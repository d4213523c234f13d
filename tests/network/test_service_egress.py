"""Egress through the real service and real sandboxes, in the small internet.

The service runs in the small internet's "host" namespace (`--egress-dns` names the small
internet's DNS server), and the SDK drives it over its unix socket from this process. Each
check runs `sandbox_probe.py` inside a sandbox: the program uses the proxy its environment
names, as pip or curl would. The gateway's every trick is also tested alone in
test_gateway.py; here each point of the issue is shown end to end.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from _system_tools import require_tools
from server_helpers import ServerProcess, remove_cgroup_parent
from small_internet import SmallInternet

from aviato import EgressRule, NetworkOptions, Sandbox, server_info

PROBE = (Path(__file__).parent / "sandbox_probe.py").read_bytes()
FAST = 1.0  # seconds: a refusal must be at least this fast (it is a few ms)


class Service:
    """The service (tests/server's `ServerProcess`) in the small internet's host namespace."""

    def __init__(self, internet: SmallInternet) -> None:
        self.internet = internet
        self.state = Path(tempfile.mkdtemp(prefix="avnet", dir="/tmp"))
        self.url = f"unix://{self.state}/s/aviato.sock"
        self.process = ServerProcess(
            self.state / "s", "--egress-dns", internet.dns, prefix=internet.enter("host")
        )

    def start(self) -> None:
        self.process.start()

    def stop(self) -> None:
        if self.process.proc is not None and self.process.proc.poll() is None:
            self.process.stop()

    def sandbox(self, network: NetworkOptions | None = None) -> Sandbox:
        sb = Sandbox.run(
            base_url=self.url,
            network=network,
            mounted_files=[
                {"path": "/workspace/.aviato-test/probe.py", "content": PROBE},
                {
                    "path": "/workspace/.aviato-test/ca.pem",
                    "content": self.internet.ca_file.read_bytes(),
                },
            ],
        )
        sb.wait()
        return sb


@pytest.fixture(scope="module")
def service(small_internet: SmallInternet) -> Iterator[Service]:
    svc = Service(small_internet)
    svc.start()
    try:
        yield svc
    finally:
        for sb in Sandbox.list(base_url=svc.url).result():
            sb.stop(graceful_shutdown_seconds=0).result()
        svc.stop()
        log = svc.process.log_tail(10_000)
        remove_cgroup_parent(svc.process.cgroup_parent)
        shutil.rmtree(svc.state, ignore_errors=True)
    assert "Traceback" not in log, log


def probe(sb: Sandbox, *args: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    result = sb.exec(["python3", "/workspace/.aviato-test/probe.py", *args], env=env).result()
    assert result.returncode == 0, result.stderr
    report: dict[str, Any] = json.loads(result.stdout.splitlines()[-1])
    return report


def refused_fast(report: dict[str, Any]) -> bool:
    return report["ok"] is False and report["seconds"] < FAST


def test_the_default_reaches_nothing(service: Service) -> None:
    with service.sandbox() as sb:
        assert sb.applied_egress_mode == "isolated"
        report = probe(sb, "direct", "198.51.100.10", "80")
        assert refused_fast(report) and "Network is unreachable" in report["error"]
        report = probe(sb, "get", "https://pypi.test/")  # no proxy in its environment
        assert report["ok"] is False


def test_an_allow_list_admits_its_names_and_refuses_the_rest_at_once(service: Service) -> None:
    rules = [EgressRule(dns_name="pypi.test"), EgressRule(dns_name="*.files.test")]
    with service.sandbox(NetworkOptions(egress=rules)) as sb:
        answer = probe(sb, "get", "https://pypi.test/project/")
        assert answer["ok"] and answer["body"]["server"] == "pypi", answer
        assert answer["body"]["sni"] == "pypi.test" and answer["body"]["path"] == "/project/"
        plain = probe(sb, "get", "http://pypi.test/x")
        assert plain["ok"] and plain["body"]["host"] == "pypi.test", plain
        assert plain["body"]["proxy_headers"] == []  # nothing of the proxy reaches the server
        for url in ("https://evil.test/", "http://evil.test/", "https://files.pypi.test/"):
            report = probe(sb, "get", url)
            assert refused_fast(report), (url, report)
        # the program that ignores the proxy, and one that connects by address
        assert refused_fast(probe(sb, "direct", "198.51.100.10", "443"))
        assert refused_fast(probe(sb, "get", "https://198.51.100.10/"))
        # the direct connect never reached the proxy: four refusals, all by the proxy
        assert sb.get_status() and sb.network_usage.refused == 4
        assert sb.network_usage.connections >= 2 and sb.network_usage.bytes_received > 0


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("loopback.test", "loopback"),
        ("metadata.test", "169.254.169.254"),
        ("hostself.test", "host"),
        ("private.test", "10.8.0.5"),
        ("mixed.test", "127.0.0.1"),
    ],
)
def test_a_name_rule_holds_against_dns_answers_it_must_not_reach(
    service: Service, name: str, why: str
) -> None:
    with service.sandbox(NetworkOptions(egress=[EgressRule(dns_name=name)])) as sb:
        report = probe(sb, "get", f"http://{name}/")
        assert refused_fast(report) and report["status"] == 403, report
        assert why in report["error"], report


def test_a_cidr_rule_lists_a_private_network(service: Service) -> None:
    rules = [EgressRule(dns_name="private.test"), EgressRule(cidr="10.8.0.0/24")]
    with service.sandbox(NetworkOptions(egress=rules)) as sb:
        assert probe(sb, "get", "http://private.test/")["body"]["server"] == "private"
        assert probe(sb, "get", "http://10.8.0.5/")["body"]["server"] == "private"
        assert refused_fast(probe(sb, "get", "http://pypi.test/"))


def test_a_tls_name_other_than_the_tunnels_is_cut(service: Service) -> None:
    with service.sandbox(NetworkOptions(egress=[EgressRule(dns_name="pypi.test")])) as sb:
        assert probe(sb, "sni", "pypi.test", "443", "pypi.test")["ok"]
        fronted = probe(sb, "sni", "pypi.test", "443", "evil.test")
        assert fronted["ok"] is False, fronted


def test_internet_reaches_public_addresses_and_never_the_host(service: Service) -> None:
    with service.sandbox(NetworkOptions(egress_mode="internet")) as sb:
        assert probe(sb, "get", "https://plain.test/")["body"]["server"] == "plain"
        assert probe(sb, "get", "http://203.0.113.5/")["body"]["server"] == "plain"
        for url in (
            "http://127.0.0.1/",  # the host's loopback service (the proxy's own namespace)
            f"http://{service.internet.host_address}/",  # the host's own address
            "http://metadata.test/",
            "http://private.test/",
            "http://[::ffff:127.0.0.1]/",
        ):
            # (NO_PROXY emptied: by default 127.0.0.1 means the sandbox's own loopback)
            report = probe(sb, "get", url, env={"NO_PROXY": "", "no_proxy": ""})
            assert refused_fast(report) and report.get("status") == 403, (url, report)


def test_egress_changes_on_a_running_sandbox(service: Service) -> None:
    with service.sandbox() as sb:  # created isolated
        sb.set_network(egress=[EgressRule(dns_name="pypi.test")]).result()
        assert sb.applied_egress_mode == "allowlist"
        assert probe(sb, "get", "https://pypi.test/")["ok"]
        # a tunnel held open while the egress closes is cut at once
        holder = sb.exec(
            ["python3", "/workspace/.aviato-test/probe.py", "hold", "pypi.test", "443"]
        )
        assert json.loads(next(iter(holder.stdout.lines()))) == {"open": True}
        t0 = time.monotonic()
        sb.set_network(deny_egress=True).result()
        ended = json.loads(holder.result().stdout.splitlines()[-1])
        assert ended["ok"] and ended["closed"] and time.monotonic() - t0 < 5, ended
        assert refused_fast(probe(sb, "get", "https://pypi.test/"))
        sb.set_network(egress_mode="internet").result()
        assert probe(sb, "get", "https://evil.test/")["body"]["server"] == "evil"


def test_egress_survives_a_restart_of_the_service(service: Service) -> None:
    sb = service.sandbox(NetworkOptions(egress=[EgressRule(dns_name="pypi.test")]))
    try:
        assert probe(sb, "get", "https://pypi.test/")["ok"]
        before = Sandbox.from_id(sb.sandbox_id or "", base_url=service.url).result()
        service.stop()
        service.start()
        again = Sandbox.from_id(sb.sandbox_id or "", base_url=service.url).result()
        assert again.applied_egress_mode == "allowlist"
        assert probe(again, "get", "https://pypi.test/")["ok"]
        assert refused_fast(probe(again, "get", "https://evil.test/"))
        assert before.network_usage.connections >= 1
    finally:
        sb.stop(graceful_shutdown_seconds=0).result()
    ended = Sandbox.from_id(sb.sandbox_id or "", base_url=service.url).result()
    assert ended.network_usage.connections >= 2 and ended.network_usage.refused >= 1


def test_pip_installs_from_an_allowed_index_through_the_proxy(service: Service) -> None:
    """What evaluation set-ups do first: pip (the host image's, Debian's) finds the proxy in
    its environment and installs from the index of an allowed name; the same install from a
    name outside the allow-list fails at once, with the proxy's reason."""
    require_tools("pip3")  # the host image runs the host's pip
    pip = ["python3", "-m", "pip", "install", "--no-cache-dir", "--disable-pip-version-check",
           "--cert", "/workspace/.aviato-test/ca.pem", "--target", "/workspace/lib",
           "--retries", "0", "--timeout", "10"]  # fmt: skip
    with service.sandbox(NetworkOptions(egress=[EgressRule(dns_name="pypi.test")])) as sb:
        done = sb.exec([*pip, "--index-url", "https://pypi.test/simple/", "avtdemo"]).result()
        assert done.returncode == 0, done.stdout + done.stderr
        answer = sb.exec(
            ["python3", "-c", "import avtdemo; print(avtdemo.ANSWER)"],
            env={"PYTHONPATH": "/workspace/lib"},
        ).result()
        assert answer.stdout == "42\n", answer
        before = sb.network_usage.refused if sb.get_status() else 0
        refused = sb.exec([*pip, "--index-url", "https://evil.test/simple/", "avtdemo"]).result()
        assert refused.returncode != 0 and refused.usage.wall_seconds < 5, refused
        assert "No matching distribution" in refused.stderr, refused
        assert sb.get_status() and sb.network_usage.refused > before


def test_the_service_says_how_egress_goes(service: Service) -> None:
    assert server_info(service.url).egress.startswith("proxy")
