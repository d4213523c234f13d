"""Egress rules and decisions: which names and addresses a sandbox's policy admits (pure).

Three kinds of address, decided before any rule is read:

- NEVER reachable, whatever the rules: loopback (127.0.0.0/8, ::1), the unspecified address
  (0.0.0.0, ::; Linux connects them to loopback), multicast (224.0.0.0/4, ff00::/8), the
  broadcast 255.255.255.255, and the host's own addresses (asked of `is_host_address`, see
  host_addresses.py). An IPv4 address carried inside IPv6 (IPv4-mapped ::ffff:a.b.c.d,
  IPv4-compatible ::a.b.c.d, NAT64 64:ff9b::/96 and 64:ff9b:1::/48, 6to4 2002::/16, Teredo's
  client address) is unwrapped and judged too: ::ffff:127.0.0.1 is loopback.
- SPECIAL: reachable only inside a CIDR rule (never by `internet`, never through a name):
  private networks (10/8, 172.16/12, 192.168/16, fc00::/7), shared address space for CGNAT
  (100.64/10), link-local (169.254/16 with the cloud metadata address 169.254.169.254,
  fe80::/10), "this network" 0.0.0.0/8, reserved 240.0.0.0/4, and the other ranges of
  `SPECIAL_NETWORKS` below.
- PUBLIC: everything else. Reachable under `internet`, through a name that a name rule allows,
  or inside a CIDR rule.

Why not `ipaddress`'s `is_private`/`is_global`: they count the documentation ranges
192.0.2.0/24, 198.51.100.0/24, 203.0.113.0/24 (and 2001:db8::/32) as private. Those ranges are
never routed on the internet, so treating them as public opens nothing real, and they are the
"public" addresses of the test internet (tests/network) that proves these rules. The lists
here are written out so that a reader sees exactly what is refused.

What this cannot do: know what lies behind a public address. A name rule trusts the name's DNS
answer for public addresses; the checks here only keep that answer from pointing inward.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import idna

from aviato.runtime.model import EgressPolicy, EgressRule

__all__ = [
    "MAX_NAME_LENGTH",
    "MAX_RULES",
    "NEVER_NETWORKS",
    "SPECIAL_NETWORKS",
    "IPAddress",
    "Verdict",
    "address_text",
    "address_verdict",
    "allows_name",
    "check_rules",
    "embedded_ipv4",
    "normalize_host",
    "parse_address",
    "parse_rule",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

MAX_NAME_LENGTH = 253
MAX_LABEL_LENGTH = 63
MAX_RULES = 256
_NAME_CHARACTERS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-")


def _networks(*texts: str) -> tuple[IPNetwork, ...]:
    return tuple(ipaddress.ip_network(text) for text in texts)


NEVER_NETWORKS = _networks(
    "127.0.0.0/8",  # loopback
    "0.0.0.0/32",  # unspecified: Linux connects it to loopback
    "224.0.0.0/4",  # multicast
    "255.255.255.255/32",  # limited broadcast
    "::1/128",  # loopback
    "::/128",  # unspecified
    "ff00::/8",  # multicast
)

SPECIAL_NETWORKS = _networks(
    "0.0.0.0/8",  # "this network" (RFC 791)
    "10.0.0.0/8",  # private (RFC 1918)
    "100.64.0.0/10",  # shared address space, carrier-grade NAT (RFC 6598)
    "169.254.0.0/16",  # link-local, and the cloud metadata service 169.254.169.254
    "172.16.0.0/12",  # private (RFC 1918)
    "192.0.0.0/24",  # IETF protocol assignments (RFC 6890)
    "192.88.99.0/24",  # 6to4 relay anycast (deprecated, RFC 7526)
    "192.168.0.0/16",  # private (RFC 1918)
    "198.18.0.0/15",  # network benchmarking (RFC 2544)
    "240.0.0.0/4",  # reserved (RFC 1112)
    "::/96",  # IPv4-compatible (deprecated); the embedded address is judged as well
    "100::/64",  # discard-only (RFC 6666)
    "2001:2::/48",  # benchmarking (RFC 5180)
    "2001:10::/28",  # ORCHID (RFC 4843)
    "2001:20::/28",  # ORCHIDv2 (RFC 7343)
    "fc00::/7",  # unique local (RFC 4193)
    "fe80::/10",  # link-local
    "fec0::/10",  # site-local (deprecated, RFC 3879)
)

_NAT64 = _networks("64:ff9b::/96", "64:ff9b:1::/48")
_SIX_TO_FOUR = ipaddress.ip_network("2002::/16")
_TEREDO = ipaddress.ip_network("2001::/32")
_IPV4_COMPATIBLE = ipaddress.ip_network("::/96")


@dataclass(frozen=True)
class Verdict:
    """Whether an address may be connected to, and why (a phrase in words)."""

    allowed: bool
    reason: str


def parse_rule(dns_name: str | None = None, cidr: str | None = None) -> EgressRule:
    """One rule from a user's words, validated and normalized; exactly one of the two.

    A name: letters, digits, '-' and '.', at most 253 characters and 63 per label, optionally
    '*.' in front (every name under the suffix, not the suffix itself); an internationalized
    name is converted to its A-labels ("bücher.example" -> "xn--bcher-kva.example"); lower
    case; a trailing dot is dropped. A CIDR: an IPv4 or IPv6 network ("10.8.0.0/16"; host bits
    are cleared, a bare address is a /32 or /128), in its canonical text. Raises ValueError
    saying what is wrong."""
    if bool(dns_name) == bool(cidr):
        raise ValueError("an egress rule needs exactly one of dns_name and cidr")
    if dns_name:
        return EgressRule(dns_name=_parse_rule_name(dns_name))
    assert cidr is not None
    return EgressRule(cidr=_parse_cidr(cidr))


def check_rules(rules: Iterable[EgressRule]) -> tuple[EgressRule, ...]:
    """`rules` validated and normalized (see parse_rule), duplicates dropped, order kept.
    Raises ValueError naming the rule at fault, or when there are more than MAX_RULES."""
    found: dict[EgressRule, None] = {}
    for index, rule in enumerate(rules):
        if index >= MAX_RULES:
            raise ValueError(f"at most {MAX_RULES} egress rules are allowed")
        try:
            found[parse_rule(rule.dns_name or None, rule.cidr or None)] = None
        except ValueError as e:
            raise ValueError(f"egress rule {index + 1}: {e}") from None
    return tuple(found)


def normalize_host(host: str) -> str:
    """A connection target's host name as the rules spell names (A-labels, lower case, no
    trailing dot). Raises ValueError when it is not a valid name. IP literals are not names:
    try `parse_address` first."""
    return _normalize_name(host, "host name")


def parse_address(host: str) -> IPAddress | None:
    """The address when `host` is an IP literal ("192.0.2.1", "::1" or "[::1]"), else None.
    Only the standard forms count: "127.1" or "0x7f.0.0.1" are not addresses here (and are
    refused as names, their last label being numeric), so no client library's lenient parsing
    can turn a name into an address behind the policy's back."""
    bracketed = host.startswith("[") and host.endswith("]")
    text = host[1:-1] if bracketed else host
    if "%" in text:  # an IPv6 zone ("fe80::1%eth0") names an interface of the host
        return None
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    return None if bracketed and address.version == 4 else address


def allows_name(policy: EgressPolicy, host: str) -> bool:
    """Whether `policy` lets a connection by the name `host` (normalized) resolve and proceed:
    under `internet` every name, else a name rule equal to it or a "*.suffix" rule with `host`
    strictly under the suffix. The addresses it resolves to are judged by address_verdict."""
    if policy.internet:
        return True
    for rule in policy.rules:
        name = rule.dns_name
        if not name:
            continue
        if name.startswith("*."):
            if host.endswith(name[1:]) and len(host) > len(name) - 1:
                return True
        elif host == name:
            return True
    return False


def address_verdict(
    policy: EgressPolicy,
    ip: IPAddress,
    by_name: bool,
    is_host_address: Callable[[IPAddress], bool],
) -> Verdict:
    """Whether a connection to `ip` is allowed. `by_name`: the address came from resolving a
    name that allows_name admitted (a name rule never admits an IP literal). `is_host_address`
    tells whether an address is one of the host's own (host_addresses.HostAddresses)."""
    candidates = [ip, *embedded_ipv4(ip)]
    text = address_text(ip)
    never = next(filter(None, (_never_kind(c) for c in candidates)), "")
    if not never and any(is_host_address(c) for c in candidates):
        never = "an address of the service's own host"
    if never:
        return Verdict(False, f"{text} is {never}, which a sandbox may never reach")
    for candidate in candidates:
        if _special(candidate) and not _in_cidr_rule(policy, candidate):
            return Verdict(
                False,
                f"{text} is a private or special-purpose address, reachable only through a "
                "cidr rule that contains it",
            )
    if any(_in_cidr_rule(policy, candidate) for candidate in candidates):
        return Verdict(True, f"{text} is inside a cidr rule")
    if policy.internet:
        return Verdict(True, f"{text} is a public address and the internet is allowed")
    if by_name:
        return Verdict(True, f"{text} is a public address of an allowed name")
    return Verdict(
        False, f"{text} is not inside a cidr rule (a name rule admits connections by name only)"
    )


def address_text(ip: IPAddress) -> str:
    """An address as people write it: IPv4-mapped IPv6 as "::ffff:127.0.0.1"."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return f"::ffff:{ip.ipv4_mapped}"
    return str(ip)


def embedded_ipv4(ip: IPAddress) -> list[ipaddress.IPv4Address]:
    """The IPv4 addresses an IPv6 address carries (mapped, compatible, NAT64, 6to4, Teredo)."""
    if not isinstance(ip, ipaddress.IPv6Address):
        return []
    found: list[ipaddress.IPv4Address] = []
    if ip.ipv4_mapped is not None:
        found.append(ip.ipv4_mapped)
    if ip in _IPV4_COMPATIBLE and ip not in ipaddress.ip_network("::/127"):
        found.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    if any(ip in network for network in _NAT64):
        found.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    if ip in _SIX_TO_FOUR and ip.sixtofour is not None:
        found.append(ip.sixtofour)
    if ip in _TEREDO and ip.teredo is not None:
        found.extend(ip.teredo)
    return found


def _never_kind(ip: IPAddress) -> str:
    if ip.is_loopback:
        return "a loopback address"
    if ip.is_unspecified:
        return "the unspecified address"
    if ip.is_multicast:
        return "a multicast address"
    if any(ip in network for network in NEVER_NETWORKS if network.version == ip.version):
        return "a broadcast address"
    return ""


def _special(ip: IPAddress) -> bool:
    return any(ip in network for network in SPECIAL_NETWORKS if network.version == ip.version)


def _in_cidr_rule(policy: EgressPolicy, ip: IPAddress) -> bool:
    for rule in policy.rules:
        if rule.cidr:
            network = ipaddress.ip_network(rule.cidr, strict=False)
            if network.version == ip.version and ip in network:
                return True
    return False


def _parse_rule_name(text: str) -> str:
    wildcard = text.startswith("*.")
    name = _normalize_name(text[2:] if wildcard else text, "dns_name")
    if parse_address(name) is not None:
        raise ValueError(f"dns_name {text!r} is an IP address: use cidr={text!r}")
    return f"*.{name}" if wildcard else name


def _normalize_name(text: str, what: str) -> str:
    if not isinstance(text, str) or not text:
        raise ValueError(f"{what} is empty")
    if len(text) > 4 * MAX_NAME_LENGTH:
        raise ValueError(f"{what} is longer than {MAX_NAME_LENGTH} characters")
    name = text[:-1] if text.endswith(".") else text
    if not name.isascii():
        try:
            name = idna.encode(name, uts46=True).decode("ascii")
        except idna.IDNAError as e:
            raise ValueError(
                f"{what} {text!r} is not a valid internationalized name: {e}"
            ) from None
    name = name.lower()
    if len(name) > MAX_NAME_LENGTH:
        raise ValueError(f"{what} {text!r} is longer than {MAX_NAME_LENGTH} characters")
    labels = name.split(".")
    for label in labels:
        if not label:
            raise ValueError(f"{what} {text!r} has an empty label (two dots in a row?)")
        if len(label) > MAX_LABEL_LENGTH:
            raise ValueError(f"{what} {text!r} has a label longer than {MAX_LABEL_LENGTH}")
        if not set(label) <= _NAME_CHARACTERS:
            raise ValueError(
                f"{what} {text!r} may hold only letters, digits, '-' and '.' "
                "(with '*.' in front for every name under a suffix)"
            )
        if label.startswith("-") or label.endswith("-"):
            raise ValueError(f"{what} {text!r} has a label that starts or ends with '-'")
    if labels[-1].isdigit() and parse_address(name) is None:
        raise ValueError(f"{what} {text!r} is neither a name nor an IP address")
    return name


def _parse_cidr(text: str) -> str:
    try:
        network = ipaddress.ip_network(text.strip(), strict=False)
    except ValueError:
        raise ValueError(
            f"cidr {text!r} is not an IPv4 or IPv6 network such as '10.8.0.0/16'"
        ) from None
    if isinstance(network, ipaddress.IPv6Network) and network.prefixlen >= 96:
        mapped = [network.network_address, network.broadcast_address]
        inner = [m.ipv4_mapped for m in mapped]
        if inner[0] is not None and inner[1] is not None:
            raise ValueError(
                f"cidr {text!r} is IPv4-mapped IPv6: write the IPv4 network "
                f"({inner[0]}/{network.prefixlen - 96}) instead"
            )
    if any(
        network.version == never.version and network.subnet_of(never)  # type: ignore[arg-type]
        for never in NEVER_NETWORKS
    ):
        raise ValueError(
            f"cidr {text!r} holds only loopback, unspecified, multicast or broadcast "
            "addresses, which a sandbox may never reach"
        )
    return str(network)
