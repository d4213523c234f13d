"""The original SDK's four network tests, as their behaviour reads through this API
(`NetworkOptions` with its field names, `service_address`, `exposed_ports`,
`applied_ingress_mode`/`applied_egress_mode`), against the real local service; and what the
original SDK's newest names (`EgressRule`, `deny_egress`) and `set_network` answer.

Egress traffic itself is proven in tests/network (a small internet in network namespaces)."""

from __future__ import annotations

import re
import time
import urllib.request
from collections.abc import Iterator

import pytest

from aviato import EgressRule, NetworkOptions, Sandbox
from aviato.exceptions import SandboxValidationError

from .conftest import TEST_TAG

ORIGINAL = NetworkOptions(ingress_mode="public", exposed_ports=[8080], egress_mode="internet")


@pytest.fixture(scope="module")
def served() -> Iterator[Sandbox]:
    with Sandbox.run(
        "python3", "-m", "http.server", "8080", "--directory", "/srv",
        tags=[TEST_TAG],
        mounted_files=[{"path": "/srv/index.html", "content": b"<h1>hello</h1>\n"}],
        network=ORIGINAL,
    ) as sb:  # fmt: skip
        sb.wait()
        yield sb


def test_sandbox_with_network_options(served: Sandbox) -> None:
    assert served.applied_ingress_mode == "local"  # 'public' is served as the local ingress
    assert served.applied_egress_mode == "internet"


def test_sandbox_public_service_address(served: Sandbox) -> None:
    assert served.service_address is not None
    assert re.fullmatch(r"127\.0\.0\.1:\d{1,5}", served.service_address)


def test_sandbox_public_exposed_ports(served: Sandbox) -> None:
    ports = served.exposed_ports
    assert isinstance(ports, tuple) and len(ports) == 1
    port, address = ports[0]
    assert port == 8080 and address == served.service_address


def test_sandbox_public_service_connectivity(served: Sandbox) -> None:
    deadline = time.monotonic() + 30
    while True:  # until python -m http.server listens
        try:
            with urllib.request.urlopen(f"http://{served.service_address}/", timeout=10) as r:
                assert r.status == 200 and r.read() == b"<h1>hello</h1>\n"
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def test_newest_names_and_set_network() -> None:
    rules = [EgressRule(dns_name="PyPI.org."), EgressRule(cidr="10.8.1.7/16")]
    with Sandbox.run(tags=[TEST_TAG], network=NetworkOptions(egress=rules)) as sb:
        sb.wait()
        assert sb.applied_egress_mode == "allowlist"
        # normalized by the service: lower case, no trailing dot, host bits cleared
        assert sb.egress_rules == (EgressRule(dns_name="pypi.org"), EgressRule(cidr="10.8.0.0/16"))
        env = sb.exec(["sh", "-c", "echo $HTTPS_PROXY"]).result().stdout.strip()
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+", env), env
        sb.set_network(deny_egress=True).result()
        assert sb.applied_egress_mode == "isolated" and sb.egress_rules == ()
        assert Sandbox.from_id(sb.sandbox_id or "").result().applied_egress_mode == "isolated"
        sb.set_network(egress_mode="internet").result()
        assert sb.applied_egress_mode == "internet"
        with pytest.raises(ValueError, match="egress only"):
            sb.set_network(exposed_ports=[80])
        with pytest.raises(SandboxValidationError, match="may hold only letters"):
            sb.set_network(egress=[EgressRule(dns_name="bad_name!")]).result()
    with pytest.raises(SandboxValidationError, match="holds only loopback"):
        Sandbox.run(tags=[TEST_TAG], network={"egress": [{"cidr": "127.0.0.0/8"}]}).wait()


def test_a_sandbox_without_egress_gets_no_proxy_until_opened() -> None:
    with Sandbox.run(tags=[TEST_TAG]) as sb:
        assert sb.exec(["sh", "-c", "echo ${HTTPS_PROXY:-none}"]).result().stdout == "none\n"
        assert sb.applied_egress_mode == "isolated"
        sb.set_network(egress=[EgressRule(dns_name="pypi.org")]).result()
        out = sb.exec(["sh", "-c", "echo ${HTTPS_PROXY:-none}"]).result().stdout
        assert out.startswith("http://127.0.0.1:"), out
