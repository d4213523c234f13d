"""The egress policy's rules and decisions (pure: no network)."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from aviato.egress.policy import (
    NEVER_NETWORKS,
    SPECIAL_NETWORKS,
    address_verdict,
    allows_name,
    check_rules,
    embedded_ipv4,
    normalize_host,
    parse_address,
    parse_rule,
)
from aviato.runtime.model import EgressPolicy, EgressRule

HOST_OWN = ipaddress.ip_address("192.0.2.2")


def is_host(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    return ip == HOST_OWN


def verdict(policy: EgressPolicy, text: str, by_name: bool = False) -> bool:
    return address_verdict(policy, ipaddress.ip_address(text), by_name, is_host).allowed


def names(*rules: str) -> EgressPolicy:
    return EgressPolicy(rules=tuple(parse_rule(dns_name=r) for r in rules))


def cidrs(*rules: str, internet: bool = False) -> EgressPolicy:
    return EgressPolicy(internet=internet, rules=tuple(parse_rule(cidr=r) for r in rules))


INTERNET = EgressPolicy(internet=True)


# --- rules -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given_name", "expected"),
    [
        ("PyPI.org", "pypi.org"),
        ("pypi.org.", "pypi.org"),
        ("*.PyPI.org", "*.pypi.org"),
        ("bücher.example", "xn--bcher-kva.example"),
        ("*.bücher.example", "*.xn--bcher-kva.example"),
        ("a-b.c0", "a-b.c0"),
        ("localhost", "localhost"),
    ],
)
def test_names_are_normalized(given_name: str, expected: str) -> None:
    assert parse_rule(dns_name=given_name) == EgressRule(dns_name=expected)


@pytest.mark.parametrize(
    ("given_name", "words"),
    [
        ("", "exactly one"),
        ("a..b", "empty label"),
        ("a_b.test", "letters, digits"),
        ("a b.test", "letters, digits"),
        ("*", "letters, digits"),
        ("*.", "empty"),
        ("a.*.test", "letters, digits"),
        ("-a.test", "starts or ends with '-'"),
        ("x" * 64 + ".test", "longer than 63"),
        (".".join(["a" * 60] * 5), "longer than 253"),
        ("10.0.0.1", "is an IP address: use cidr"),
        ("127.1", "neither a name nor an IP address"),
        ("0x7f.1", "neither a name nor an IP address"),
        ("http://pypi.org", "letters, digits"),
    ],
)
def test_bad_names_are_refused_in_words(given_name: str, words: str) -> None:
    with pytest.raises(ValueError, match=words.replace("*", r"\*")):
        parse_rule(dns_name=given_name)


@pytest.mark.parametrize(
    ("given_cidr", "expected"),
    [
        ("10.8.0.0/16", "10.8.0.0/16"),
        ("10.8.1.2/16", "10.8.0.0/16"),
        ("203.0.113.7", "203.0.113.7/32"),
        ("2001:DB8::/32", "2001:db8::/32"),
        ("0.0.0.0/0", "0.0.0.0/0"),
        ("126.0.0.0/7", "126.0.0.0/7"),  # contains loopback, but not only
    ],
)
def test_cidrs_are_canonical(given_cidr: str, expected: str) -> None:
    assert parse_rule(cidr=given_cidr) == EgressRule(cidr=expected)


@pytest.mark.parametrize(
    ("given_cidr", "words"),
    [
        ("127.0.0.0/8", "never reach"),
        ("127.0.0.1", "never reach"),
        ("::1/128", "never reach"),
        ("224.0.0.0/8", "never reach"),
        ("ff02::/16", "never reach"),
        ("255.255.255.255/32", "never reach"),
        ("::ffff:10.0.0.0/104", "write the IPv4 network"),
        ("10.0.0.0/33", "not an IPv4 or IPv6 network"),
        ("pypi.org", "not an IPv4 or IPv6 network"),
    ],
)
def test_bad_cidrs_are_refused_in_words(given_cidr: str, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        parse_rule(cidr=given_cidr)


def test_a_rule_needs_exactly_one_kind() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        parse_rule(dns_name="a.test", cidr="10.0.0.0/8")
    with pytest.raises(ValueError, match="exactly one"):
        parse_rule()


def test_check_rules_normalizes_dedupes_and_names_the_rule_at_fault() -> None:
    rules = [
        EgressRule(dns_name="A.test"),
        EgressRule(dns_name="a.test."),
        EgressRule(cidr="10.0.0.1/8"),
    ]
    assert check_rules(rules) == (EgressRule(dns_name="a.test"), EgressRule(cidr="10.0.0.0/8"))
    with pytest.raises(ValueError, match="egress rule 2: "):
        check_rules([EgressRule(dns_name="a.test"), EgressRule(cidr="127.0.0.0/8")])
    with pytest.raises(ValueError, match="at most 256"):
        check_rules([EgressRule(dns_name=f"n{i}.test") for i in range(300)])


@given(
    st.from_regex(
        r"(\*\.)?[a-zA-Z]([a-zA-Z0-9-]{0,10}[a-zA-Z0-9])?(\.[a-zA-Z]{1,5}){1,3}", fullmatch=True
    )
)
def test_normalizing_twice_changes_nothing(name: str) -> None:
    once = parse_rule(dns_name=name).dns_name
    assert parse_rule(dns_name=once).dns_name == once
    assert once == once.lower()


# --- names -------------------------------------------------------------------------------


def test_name_rules_match_exact_names_and_strictly_under_a_wildcard() -> None:
    policy = names("pypi.test", "*.files.test")
    assert allows_name(policy, "pypi.test")
    assert not allows_name(policy, "x.pypi.test")
    assert not allows_name(policy, "evilpypi.test")
    assert allows_name(policy, "a.files.test")
    assert allows_name(policy, "a.b.files.test")
    assert not allows_name(policy, "files.test")
    assert not allows_name(policy, "xfiles.test")
    assert not allows_name(EgressPolicy(), "pypi.test")
    assert allows_name(INTERNET, "anything.test")
    assert not allows_name(cidrs("0.0.0.0/0"), "pypi.test")


def test_host_names_normalize_like_rules() -> None:
    assert normalize_host("PyPI.Test.") == "pypi.test"
    with pytest.raises(ValueError):
        normalize_host("127.1")
    with pytest.raises(ValueError):
        normalize_host("a b")


def test_only_standard_address_literals_are_addresses() -> None:
    assert parse_address("192.0.2.1") == ipaddress.ip_address("192.0.2.1")
    assert parse_address("[::1]") == ipaddress.ip_address("::1")
    for text in ("127.1", "0x7f000001", "2130706433", "017700000001", "fe80::1%eth0", "a.test"):
        assert parse_address(text) is None, text


# --- addresses ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "127.9.9.9",
        "0.0.0.0",
        "::1",
        "::",
        "224.0.0.1",
        "239.255.255.250",
        "255.255.255.255",
        "ff02::1",
        "192.0.2.2",  # the host's own
        "::ffff:127.0.0.1",
        "::ffff:192.0.2.2",
        "64:ff9b::7f00:1",  # NAT64 of 127.0.0.1
        "2002:7f00:1::",  # 6to4 of 127.0.0.1
        "::127.0.0.1",  # IPv4-compatible
    ],
)
def test_never_reachable_whatever_the_rules(address: str) -> None:
    everything = cidrs("0.0.0.0/0", "::/0", internet=True)
    assert not verdict(everything, address)
    assert not verdict(everything, address, by_name=True)
    reason = address_verdict(everything, ipaddress.ip_address(address), True, is_host).reason
    assert "may never reach" in reason


@pytest.mark.parametrize(
    "address",
    [
        "10.8.0.5",
        "172.16.0.1",
        "192.168.1.1",
        "100.64.0.1",
        "169.254.169.254",
        "169.254.1.1",
        "0.1.2.3",
        "240.0.0.1",
        "198.18.0.1",
        "192.0.0.8",
        "fc00::1",
        "fd12::1",
        "fe80::1",
        "::ffff:10.8.0.5",
        "::ffff:169.254.169.254",
        "64:ff9b::a08:5",  # NAT64 of 10.8.0.5
    ],
)
def test_special_addresses_only_inside_a_cidr_rule(address: str) -> None:
    assert not verdict(INTERNET, address)
    assert not verdict(INTERNET, address, by_name=True)
    assert not verdict(names("x.test"), address, by_name=True)
    ip = ipaddress.ip_address(address)
    inside = embedded_ipv4(ip) or [ip]  # a rule names the IPv4 network of a wrapped address
    assert verdict(cidrs(*(f"{a}/{a.max_prefixlen}" for a in inside)), address)


@pytest.mark.parametrize(
    "address",
    ["192.0.2.10", "198.51.100.10", "203.0.113.5", "8.8.8.8", "2001:db8::1", "2606:4700::1"],
)
def test_public_addresses(address: str) -> None:
    """The documentation ranges count as public: they are the test internet's addresses (the
    reason not to use ipaddress.is_private, which calls them private)."""
    assert verdict(INTERNET, address)
    assert verdict(names("pypi.test"), address, by_name=True)
    assert not verdict(names("pypi.test"), address)  # an IP literal under a name rule
    assert verdict(cidrs(f"{address}/{32 if '.' in address else 128}"), address)
    assert not verdict(cidrs("10.0.0.0/8"), address)


def test_documentation_ranges_are_private_to_ipaddress_but_public_here() -> None:
    assert ipaddress.ip_address("198.51.100.10").is_private
    assert verdict(INTERNET, "198.51.100.10")


@given(st.ip_addresses())
def test_lists_never_and_special_decide_every_address(
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address,
) -> None:
    everything = cidrs("0.0.0.0/0", "::/0", internet=True)
    never = any(ip in n for n in NEVER_NETWORKS if n.version == ip.version) or any(
        any(e in n for n in NEVER_NETWORKS if n.version == 4) for e in embedded_ipv4(ip)
    )
    assert address_verdict(everything, ip, False, is_host).allowed is (not never and ip != HOST_OWN)
    special = any(ip in n for n in SPECIAL_NETWORKS if n.version == ip.version)
    if special:
        assert not address_verdict(INTERNET, ip, True, is_host).allowed
