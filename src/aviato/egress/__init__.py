"""Egress: the HTTP(S) forward proxy through which a sandbox reaches the network, by policy.

Layer rules (docs/internals/architecture.md): imports only the standard library, its own
libraries (dnspython, h11, idna) and `aviato.runtime.model`; the service and the cluster may
import it, it imports neither. `gateway.EgressGateway` is the proxy; `policy` holds the pure
rules the service's validation also uses; `host.EgressHost` is where a sandbox's proxy runs
(`sandboxes.InProcessEgressHost`: in this process, around the gateway).
"""
