"""`aviato network`: show or change a running sandbox's egress; and the egress options of
`aviato run` (`--internet`, `--allow`), which build the same `NetworkOptions`.

An `--allow` value is a host name (`pypi.org`, `*.githubusercontent.com`) or a network
(`10.8.0.0/16`, one address); the service checks it and says what is wrong in words.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

import click

from aviato import EgressRule, NetworkOptions, Sandbox
from aviato.cli._output import print_fields, print_json
from aviato.cli._reach import preflight


def egress_rules(values: Sequence[str]) -> list[EgressRule]:
    """`--allow` values as rules: an address or network is a cidr rule, anything else a name."""
    rules: list[EgressRule] = []
    for value in values:
        try:
            ipaddress.ip_network(value, strict=False)
        except ValueError:
            rules.append(EgressRule(dns_name=value))
        else:
            rules.append(EgressRule(cidr=value))
    return rules


def egress_options(internet: bool, allow: Sequence[str]) -> NetworkOptions | None:
    """The egress of `--internet` and `--allow` (None when neither is given)."""
    if not internet and not allow:
        return None
    return NetworkOptions(
        egress_mode="internet" if internet else None, egress=egress_rules(allow) or None
    )


def egress_text(sb: Sandbox) -> str:
    """``internet``, ``allowlist: pypi.org, 10.8.0.0/16`` or ``isolated``."""
    mode = sb.applied_egress_mode
    rules = [rule.dns_name or rule.cidr or "" for rule in sb.egress_rules]
    if not rules:
        return mode
    return f"{mode}: {', '.join(rules)}" if mode == "allowlist" else f"{mode} + {', '.join(rules)}"


def usage_text(sb: Sandbox) -> str:
    u = sb.network_usage
    return (
        f"{u.bytes_sent} bytes out, {u.bytes_received} bytes in, {u.connections} connections, "
        f"{u.refused} refused"
    )


ALLOW_HELP = (
    "Let it reach this host name (*.example.com for every name under it) or network "
    "(10.8.0.0/16) through its egress proxy (repeatable)."
)
INTERNET_HELP = "Let it reach every public address (never this host nor its loopback)."


@click.command()
@click.argument("sandbox_id", metavar="ID")
@click.option("--internet", is_flag=True, help=INTERNET_HELP)
@click.option("--allow", multiple=True, metavar="NAME|CIDR", help=ALLOW_HELP)
@click.option("--deny", is_flag=True, help="Close its egress: loopback only.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def network(
    sandbox_id: str, internet: bool, allow: tuple[str, ...], deny: bool, as_json: bool
) -> None:
    """Show a sandbox's egress and what went through it; or change it while it runs.

    Programs in the sandbox reach the network through its egress proxy (they find it in
    HTTP_PROXY and HTTPS_PROXY; docs/networking.md). A change applies at once: connections the
    new egress does not allow are closed.

    \b
    Examples:
      aviato network sbx-1a2b3c4d5e6f
      aviato network sbx-1a2b3c4d5e6f --allow pypi.org --allow files.pythonhosted.org
      aviato network sbx-1a2b3c4d5e6f --internet
      aviato network sbx-1a2b3c4d5e6f --deny
    """
    if deny and (internet or allow):
        raise click.UsageError("--deny cannot be combined with --internet or --allow")
    preflight()
    sb = Sandbox.from_id(sandbox_id).result()
    if deny:
        sb.set_network(deny_egress=True).result()
    elif internet or allow:
        options = egress_options(internet, allow)
        assert options is not None
        sb.set_network(options).result()
    if as_json:
        u = sb.network_usage
        print_json(
            {
                "id": sb.sandbox_id,
                "egress_mode": sb.applied_egress_mode,
                "egress": [r.dns_name or r.cidr for r in sb.egress_rules],
                "bytes_sent": u.bytes_sent,
                "bytes_received": u.bytes_received,
                "connections": u.connections,
                "refused": u.refused,
            }
        )
        return
    print_fields([("egress", egress_text(sb)), ("traffic", usage_text(sb))])


__all__ = ["egress_options", "egress_text", "network", "usage_text"]
