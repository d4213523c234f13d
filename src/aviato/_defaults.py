"""Configuration: `NetworkOptions`, `Serialization`, the SDK's default values, the environment
variables, and the conversions of option values to the wire. (`SandboxDefaults` lives with the
options it holds defaults for, in `aviato._options`.)

Environment variables read by the SDK (each read when it is needed, never at import):

- `AVIATO_BASE_URL`: the service, ``unix:///abs/path.sock``, ``http://host:port`` or
  ``https://host:port``; unset means the local service, started on first use.
- `AVIATO_API_KEY`: sent as ``authorization: Bearer <key>`` on every call.
- `AVIATO_TLS_CA`: a CA bundle file for ``https://`` URLs (default: the system roots).
- `AVIATO_IMAGE`: the image when neither the call nor the defaults name one (default: the
  service's default image, "host" unless the service is started with --default-image).
- `AVIATO_LEASE_TTL`: a Session's lease time-to-live in seconds (default 30).
- `AVIATO_STATE_DIR`: the local service's state directory (see `aviato._local_service`).
- `AVIATO_TRANSPORT`: ``grpc`` makes a ``unix://`` address use gRPC even where the service
  offers its lean local socket (see `aviato._transport.local_choice`).
"""

from __future__ import annotations

import enum
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from aviato.exceptions import SandboxValidationError
from aviato.v1 import quantities
from aviato.v1 import sandbox_pb2 as pb

__all__ = [
    "DEFAULT_IMAGE",
    "DEFAULT_LEASE_TTL_SECONDS",
    "DEFAULT_MAX_OUTPUT_BYTES",
    "DEFAULT_MAX_READ_FILE_BYTES",
    "DEFAULT_REQUEST_TIMEOUT_SECONDS",
    "EgressRule",
    "NetworkOptions",
    "Serialization",
]

DEFAULT_IMAGE = "host"
DEFAULT_REQUEST_TIMEOUT_SECONDS = 300.0
DEFAULT_GRACEFUL_SHUTDOWN_SECONDS = 10.0
DEFAULT_LEASE_TTL_SECONDS = 30.0
DEFAULT_MAX_OUTPUT_BYTES = 64 * 1024 * 1024
DEFAULT_MAX_READ_FILE_BYTES = 64 * 1024 * 1024

ENV_BASE_URL = "AVIATO_BASE_URL"
ENV_API_KEY = "AVIATO_API_KEY"
ENV_TLS_CA = "AVIATO_TLS_CA"
ENV_IMAGE = "AVIATO_IMAGE"
ENV_LEASE_TTL = "AVIATO_LEASE_TTL"
ENV_TRANSPORT = "AVIATO_TRANSPORT"


class Serialization(enum.StrEnum):
    """How `@session.function()` moves arguments and results. Only JSON is supported.

    `PICKLE` exists so that aviato-era code still imports; choosing it raises
    `FunctionSerializationError`, because unpickling a result produced by untrusted code would
    let that code run in your process.
    """

    JSON = "json"
    PICKLE = "pickle"


# The ingress modes this service serves (`NetworkOptions.ingress_mode`); None means "local" when
# ports are exposed, "none" otherwise.
INGRESS_MODES = ("local", "none", "public", "internal")
# The egress modes (`NetworkOptions.egress_mode`); None, "none" and "isolated" are the same.
EGRESS_MODES = ("isolated", "none", "allowlist", "internet")
MAX_EXPOSED_PORTS = 16


@dataclass(frozen=True, kw_only=True)
class EgressRule:
    """One entry of an egress allow-list: exactly one of

    dns_name: a host name (``"pypi.org"``), or ``"*.example.com"`` for every name under
        example.com (not example.com itself). A name admits connections made by that name
        (through the sandbox's proxy: `docs/networking.md`), never by address, and only to
        addresses that are public or inside a `cidr` rule.
    cidr: a network (``"10.8.0.0/16"``, ``"2001:db8::/32"``) or one address.

    The service checks the value itself (a bad name or network raises
    `SandboxValidationError` when the sandbox is created).
    """

    dns_name: str | None = None
    cidr: str | None = None

    def __post_init__(self) -> None:
        given = [(name, v) for name, v in (("dns_name", self.dns_name), ("cidr", self.cidr))
                 if v is not None]  # fmt: skip
        if len(given) != 1:
            raise ValueError(
                "EgressRule takes exactly one of dns_name and cidr, e.g. "
                "EgressRule(dns_name='pypi.org') or EgressRule(cidr='10.8.0.0/16')"
            )
        name, value = given[0]
        if not isinstance(value, str):
            raise TypeError(f"EgressRule.{name} must be a string, not {value!r}")

    def to_proto(self) -> pb.EgressRule:
        if self.dns_name is not None:
            return pb.EgressRule(dns_name=self.dns_name)
        return pb.EgressRule(cidr=self.cidr or "")


@dataclass(frozen=True)
class NetworkOptions:
    """Network settings of a sandbox (docs/networking.md), in the original SDK's names.

    egress_mode: None, ``"none"`` or ``"isolated"`` (the default): loopback only, unless
        `egress` lists rules; ``"internet"``: every public address, plus what `egress` lists
        (never the service's host nor its loopback services). ``"allowlist"`` says explicitly
        what a non-empty `egress` implies.
    egress: `EgressRule`s (or dicts of their fields): the names and networks the sandbox may
        reach; everything else is refused, at once.
    deny_egress: True is ``egress_mode="isolated"`` with no rules (the newer SDK's name).
    exposed_ports: TCP ports (1-65535, distinct, at most 16) of servers the sandbox runs on
        its loopback (127.0.0.1 or ::1). While it runs, the local service relays each one from
        an address on 127.0.0.1 of its own host: see `Sandbox.exposed_ports` and
        `Sandbox.service_address`. Any user of that host can reach those addresses.
    ingress_mode: ``"local"`` (the default when ports are exposed: the addresses are on the
        service host's 127.0.0.1) or ``"none"`` (no exposed ports). The original SDK's
        ``"public"`` and ``"internal"`` are served as ``"local"``: this service exposes ports
        on its host's 127.0.0.1 and, for remote clients, through itself with their API key
        (`applied_ingress_mode` says ``"local"``).
    deny_ingress: True is ``ingress_mode="none"``.

    Egress is through an HTTP(S) proxy of the service that the sandbox's processes find in
    HTTP_PROXY and HTTPS_PROXY (pip, npm, curl, git, requests use it); a program that connects
    by itself gets "Network is unreachable". Invalid values raise `SandboxValidationError` (a
    ValueError) or TypeError when the sandbox is constructed.
    """

    ingress_mode: str | None = None
    exposed_ports: tuple[int, ...] | None = None
    egress_mode: str | None = None
    egress: Sequence[EgressRule] | None = None
    deny_egress: bool | None = None
    deny_ingress: bool | None = None

    def __post_init__(self) -> None:
        ports = self.exposed_ports
        if ports is not None:
            if isinstance(ports, int | str | bytes):
                raise TypeError(
                    f"network.exposed_ports must be a list of port numbers, not {ports!r}"
                )
            ports_t = tuple(ports)
            for port in ports_t:
                if isinstance(port, bool) or not isinstance(port, int):
                    raise TypeError(
                        f"network.exposed_ports must contain port numbers, got {port!r}"
                    )
            object.__setattr__(self, "exposed_ports", ports_t or None)
        if self.egress is not None:
            object.__setattr__(self, "egress", _coerce_rules(self.egress) or None)
        for name in ("egress_mode", "ingress_mode"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise TypeError(f"network.{name} must be a string, not {value!r}")
        for name in ("deny_egress", "deny_ingress"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, bool):
                raise TypeError(f"network.{name} must be True or False, not {value!r}")

    def to_spec_egress(self) -> tuple[str, list[pb.EgressRule]]:
        """The `SandboxSpec.egress_mode` and `.egress`; raises SandboxValidationError for a
        mode that is not served or options that contradict each other."""
        mode = self.egress_mode or None
        rules = [rule.to_proto() for rule in self.egress or ()]
        if mode not in (None, *EGRESS_MODES):
            served = ", ".join(repr(m) for m in EGRESS_MODES)
            raise SandboxValidationError(
                f"network: egress_mode={mode!r} is not served; use one of {served}"
            )
        if self.deny_egress:
            if rules or mode in ("internet", "allowlist"):
                raise SandboxValidationError(
                    "network: deny_egress=True cannot be combined with egress rules or "
                    f"egress_mode={mode!r}"
                )
            return "isolated", []
        if mode in ("isolated", "none") and rules:
            raise SandboxValidationError(
                f"network: egress_mode={mode!r} means no egress, but egress rules are given; "
                "leave egress_mode out (or use 'allowlist') to allow what they list"
            )
        if mode == "allowlist" and not rules:
            raise SandboxValidationError(
                "network: egress_mode='allowlist' needs egress rules, e.g. "
                "egress=[EgressRule(dns_name='pypi.org')]"
            )
        return ("isolated" if mode == "none" else mode or ""), rules

    def to_spec_ports(self) -> list[int]:
        """The `SandboxSpec.exposed_ports`; raises SandboxValidationError naming the option."""
        ports = list(self.exposed_ports or ())
        mode = self.ingress_mode or None
        if self.deny_ingress:
            if ports:
                raise SandboxValidationError(
                    f"network: deny_ingress=True cannot expose ports (exposed_ports={ports!r})"
                )
            mode = "none"
        if mode not in (None, *INGRESS_MODES):
            served = ", ".join(repr(m) for m in INGRESS_MODES)
            raise SandboxValidationError(
                f"network: ingress_mode={mode!r} is not served; use one of {served}"
            )
        if mode == "none" and ports:
            raise SandboxValidationError(
                "network: ingress_mode='none' cannot expose ports; use ingress_mode='local' "
                f"or leave it out (exposed_ports={ports!r})"
            )
        if len(ports) > MAX_EXPOSED_PORTS:
            raise SandboxValidationError(
                f"network.exposed_ports: at most {MAX_EXPOSED_PORTS} ports, got {len(ports)}"
            )
        for port in ports:
            if not 1 <= port <= 65535:
                raise SandboxValidationError(
                    f"network.exposed_ports: {port} is not a TCP port (1 to 65535)"
                )
        duplicates = sorted({port for port in ports if ports.count(port) > 1})
        if duplicates:
            raise SandboxValidationError(
                f"network.exposed_ports: port {duplicates[0]} is listed twice"
            )
        return ports


def _coerce_rules(value: object) -> tuple[EgressRule, ...]:
    """Egress rules given as `EgressRule`s or dicts of their fields, in a list or tuple."""
    if isinstance(value, EgressRule | Mapping | str | bytes) or not isinstance(value, Iterable):
        raise TypeError(
            "network.egress must be a list of EgressRule, such as "
            f"[EgressRule(dns_name='pypi.org')], not {value!r}"
        )
    rules: list[EgressRule] = []
    for item in value:
        if isinstance(item, Mapping):
            item = EgressRule(**dict(item))
        if not isinstance(item, EgressRule):
            raise TypeError(f"network.egress must contain EgressRule, got {item!r}")
        rules.append(item)
    return tuple(rules)


def as_str_tuple(name: str, value: Iterable[str] | None) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str | bytes):
        raise TypeError(f"{name} must be a list of strings, not a bare string: {value!r}")
    out = tuple(value)
    for item in out:
        if not isinstance(item, str):
            raise TypeError(f"{name} must contain strings, got {item!r}")
    return out


def byte_count(name: str, value: object) -> int:
    """`value` if it is a whole number of bytes >= 0; TypeError or ValueError naming `name`."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be a whole number of bytes, not {value!r}")
    if value < 0:
        raise ValueError(f"{name} must not be negative, got {value}")
    return value


def coerce_node_selector(value: Mapping[str, str] | None) -> dict[str, str]:
    """A node selector as a new dict of label → value (None is empty); wrong types raise."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise TypeError(
            "node_selector must be a mapping of node label to value, such as "
            f"{{'pool': 'gpu'}}, not {type(value).__name__}"
        )
    out: dict[str, str] = {}
    for key, label_value in value.items():
        if not isinstance(key, str) or not isinstance(label_value, str):
            raise TypeError(
                f"node_selector: labels and values must be strings, got {key!r}: {label_value!r}"
            )
        if not key:
            raise SandboxValidationError("node_selector: a label name is empty")
        out[key] = label_value
    return out


def coerce_network(value: NetworkOptions | Mapping[str, Any] | None) -> NetworkOptions | None:
    """Accepts a NetworkOptions, a dict of its fields, or None; anything else is a TypeError."""
    if value is None or isinstance(value, NetworkOptions):
        return value
    if isinstance(value, Mapping):
        return NetworkOptions(**dict(value))
    raise TypeError(f"network must be NetworkOptions, a dict or None, not {type(value).__name__}")


# --- environment ------------------------------------------------------------------------------


def resolve_base_url(explicit: str | None, default: str | None = None) -> str | None:
    """explicit > `AVIATO_BASE_URL` > `default` (`SandboxDefaults.base_url`); None means the
    local service."""
    for candidate in (explicit, os.environ.get(ENV_BASE_URL), default):
        if candidate:
            return candidate.rstrip("/")
    return None


def resolve_image(explicit: str | None, default: str | None) -> str:
    """explicit > `default` (`SandboxDefaults.container_image`) > `AVIATO_IMAGE` > "" (the
    service's default)."""
    return explicit or default or os.environ.get(ENV_IMAGE) or ""


def api_key() -> str | None:
    return os.environ.get(ENV_API_KEY) or None


def lease_ttl_seconds(configured: float | None = None) -> float:
    """`configured` (`SandboxDefaults.lease_ttl_seconds`) > `AVIATO_LEASE_TTL` > 30 s (clamped
    to 1..3600)."""
    value = configured
    if value is None:
        raw = os.environ.get(ENV_LEASE_TTL)
        if raw:
            try:
                value = float(raw)
            except ValueError:
                raise ValueError(f"{ENV_LEASE_TTL}={raw!r} is not a number of seconds") from None
    if value is None or not math.isfinite(value):
        value = DEFAULT_LEASE_TTL_SECONDS
    return min(max(value, 1.0), 3600.0)


# --- conversions to the wire ------------------------------------------------------------------

_RESOURCE_KEYS = ("cpu", "memory", "pids", "disk")


def _quantity(key: str, value: object) -> str:
    """A cpu, memory or disk value as the spec's quantity text; refused in the user's words."""
    forms = quantities.CPU_FORMS if key == "cpu" else quantities.SIZE_FORMS
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise SandboxValidationError(f'resources["{key}"]: {value!r} is not {forms}')
    if isinstance(value, str):
        text = value.strip()
    elif key == "cpu":
        text = repr(float(value)) if isinstance(value, float) else str(value)
    else:
        text = str(int(value))
    try:
        (quantities.parse_cpu_millis if key == "cpu" else quantities.parse_bytes)(text)
    except quantities.QuantityError:
        raise SandboxValidationError(f'resources["{key}"]: {value!r} is not {forms}') from None
    return text


def resources_to_proto(resources: Mapping[str, object] | None) -> pb.Resources | None:
    """``{"cpu","memory","pids","disk"}`` (strings or numbers) to `aviato.v1.Resources`."""
    if not resources:
        return None
    unknown = sorted(set(resources) - set(_RESOURCE_KEYS))
    if unknown:
        raise SandboxValidationError(
            f"resources: unsupported keys {unknown}; supported: {', '.join(_RESOURCE_KEYS)}"
        )
    msg = pb.Resources()
    for key in ("cpu", "memory", "disk"):
        if resources.get(key) is not None:
            setattr(msg, key, _quantity(key, resources[key]))
    pids = resources.get("pids")
    if pids is not None:
        try:
            msg.pids = int(pids)  # type: ignore[call-overload]
        except (TypeError, ValueError):
            raise SandboxValidationError(
                f'resources["pids"]: {pids!r} is not a number of processes such as 256'
            ) from None
    return msg


def mounted_files_to_proto(files: Sequence[Mapping[str, Any]] | None) -> list[pb.MountedFile]:
    """Accepts ``[{"path", "content"}]`` and the aviato proto spelling ``[{"mount_path",
    "file_content"}]``; content may be str (UTF-8) or bytes."""
    out: list[pb.MountedFile] = []
    for i, item in enumerate(files or ()):
        if not isinstance(item, Mapping):
            raise TypeError(f"mounted_files[{i}] must be a dict, got {type(item).__name__}")
        path = item.get("path", item.get("mount_path"))
        content = item.get("content", item.get("file_content", b""))
        if not isinstance(path, str) or not path.startswith("/"):
            raise SandboxValidationError(
                f"mounted_files[{i}].path must be an absolute path: {path!r}"
            )
        if isinstance(content, str):
            content = content.encode()
        if not isinstance(content, bytes | bytearray | memoryview):
            raise TypeError(f"mounted_files[{i}].content must be str or bytes")
        out.append(pb.MountedFile(path=path, content=bytes(content)))
    return out
