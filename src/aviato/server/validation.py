"""Validates request values and resolves every default, once; every refusal names the field.

The functions take plain values (the codec, `codec.py`, takes them out of the request messages
and assembles the model from the results), so this module knows nothing of the wire format.
Each raises `errors.InvalidArgument` whose message starts with the field's path, e.g.
"spec.resources.memory: '12Qi' is not a size such as 512Mi or 2G (...)". The problem is said
in words a user knows (the SDK replaces the path by the argument's name: `field_words`).

Defaults are resolved here and nowhere else: `SpecDefaults` holds the service's (image, memory,
pids, disk, lifetime), and `validate_resources` and `validate_lifetime` return what the sandbox
gets. The lifecycle's charge, the runtimes and the placements read resolved values.

What validation cannot promise: that the values *work*. An image that names no image, a working
directory that does not exist in it, a memory limit too small for the program: those are found
by the runtime when the sandbox is created, and end as a FAILED sandbox with the runtime's message.
"""

from __future__ import annotations

import math
import posixpath
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from aviato.egress import policy as egress_policy
from aviato.images.reference import InvalidReference, parse_reference
from aviato.runtime.model import (
    DEFAULT_DISK_BYTES,
    DEFAULT_MEMORY_BYTES,
    DEFAULT_PIDS,
    EgressPolicy,
    EgressRule,
    RegistryCredentials,
)
from aviato.server.errors import InvalidArgument
from aviato.v1 import quantities

__all__ = [
    "DEFAULT_MAX_LIFETIME_SECONDS",
    "MAX_LIFETIME_SECONDS",
    "Limits",
    "SpecDefaults",
    "validate_argv",
    "validate_choice",
    "validate_egress",
    "validate_env",
    "validate_exposed_ports",
    "validate_file_mode",
    "validate_finite",
    "validate_image",
    "validate_lifetime",
    "validate_mounted_files",
    "validate_network",
    "validate_node_selector",
    "validate_path",
    "validate_registry_auth",
    "validate_request_id",
    "validate_resources",
    "validate_tags",
    "validate_terminal_size",
]

MiB = 1 << 20
MAX_ARGV_BYTES = MiB
MAX_ARGV_ITEMS = 65536
MAX_ENV_BYTES = MiB
MAX_ENV_ENTRIES = 4096
MAX_TAGS = 64
MAX_TAG_CHARS = 128
MAX_PATH_BYTES = 4096
MAX_MOUNTED_FILES = 1024
MAX_EXPOSED_PORTS = 16  # each is a listener of the service while the sandbox runs
MAX_MOUNTED_BYTES = 16 * MiB
MAX_LIFETIME_SECONDS = 7 * 24 * 3600.0
DEFAULT_MAX_LIFETIME_SECONDS = 3600.0
MAX_EXEC_TIMEOUT_SECONDS = MAX_LIFETIME_SECONDS
MAX_CPU_MILLIS = 1024 * 1000
MIN_MEMORY_BYTES = 4 * MiB
MAX_BYTES = 1 << 50
MAX_PIDS = 4194304
MAX_REQUEST_ID_CHARS = 128
MAX_IMAGE_CHARS = 255

_TAG = re.compile(r"[A-Za-z0-9_.:/=@+\-]+")
MAX_NODE_SELECTOR = 64
MAX_LABEL_CHARS = 253
_LABEL = re.compile(r"[A-Za-z0-9_.:/@+\-]*")
_REQUEST_ID = re.compile(r"[A-Za-z0-9_.:\-]+")
_IMAGE = re.compile(
    r"[a-z0-9]+(?:[._-][a-z0-9]+)*(?::[0-9]+)?"
    r"(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*"
    r"(?::[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?"
    r"(?:@sha256:[a-f0-9]{64})?"
)


@dataclass(frozen=True)
class SpecDefaults:
    """The service's defaults for what a spec leaves out (server options; tests)."""

    image: str = "host"
    memory_bytes: int = DEFAULT_MEMORY_BYTES
    pids: int = DEFAULT_PIDS
    disk_bytes: int = DEFAULT_DISK_BYTES
    max_lifetime_seconds: float = DEFAULT_MAX_LIFETIME_SECONDS
    writable_layer: str = "memory"


@dataclass(frozen=True)
class Limits:
    """Resolved resource limits: `cpu_millis` None is no cpu limit; `asked` names the limits
    the request gave (the others are the defaults)."""

    cpu_millis: int | None
    memory_bytes: int
    pids: int
    disk_bytes: int
    asked: frozenset[str]


def validate_finite(value: float, field: str, low: float, high: float) -> float:
    """`value` if it is a finite number within [low, high]."""
    if not math.isfinite(value):
        raise InvalidArgument(field, f"{value!r} is not a finite number")
    if not low <= value <= high:
        raise InvalidArgument(field, f"{_plain(value)} is outside [{_plain(low)}, {_plain(high)}]")
    return value


def _plain(value: float) -> str:
    """A number as a person writes it: 604800, 0.5 (never 6.04800e+05)."""
    return str(int(value)) if value == int(value) else f"{value:.6f}".rstrip("0")


def _no_nul(text: str, field: str) -> None:
    if "\x00" in text:
        raise InvalidArgument(field, "contains a NUL character")


def validate_path(text: str, field: str, *, allow_empty: bool = False) -> str:
    """An absolute path without NUL or ".." components, normalized ("//a/./b/" → "/a/b")."""
    if not text:
        if allow_empty:
            return ""
        raise InvalidArgument(field, "is required")
    _no_nul(text, field)
    if len(text.encode()) > MAX_PATH_BYTES:
        raise InvalidArgument(field, f"longer than {MAX_PATH_BYTES} bytes")
    if not text.startswith("/"):
        raise InvalidArgument(field, f"{text!r} is not an absolute path")
    if ".." in text.split("/"):
        raise InvalidArgument(field, f"{text!r} contains '..'")
    normalized = posixpath.normpath(text)
    if normalized.startswith("//"):
        normalized = "/" + normalized.lstrip("/")
    return normalized


def validate_argv(argv: Iterable[str], field: str, *, allow_empty: bool) -> tuple[str, ...]:
    items = tuple(argv)
    if not items:
        if allow_empty:
            return ()
        raise InvalidArgument(field, "the command is empty")
    if len(items) > MAX_ARGV_ITEMS:
        raise InvalidArgument(field, f"more than {MAX_ARGV_ITEMS} items")
    if not items[0]:
        raise InvalidArgument(f"{field}[0]", "the command is empty (its program name is '')")
    total = 0
    for i, arg in enumerate(items):
        _no_nul(arg, f"{field}[{i}]")
        total += len(arg.encode()) + 1
        if total > MAX_ARGV_BYTES:
            raise InvalidArgument(field, f"larger than {MAX_ARGV_BYTES} bytes in total")
    return items


def validate_env(env: Mapping[str, str], field: str) -> dict[str, str]:
    if len(env) > MAX_ENV_ENTRIES:
        raise InvalidArgument(field, f"more than {MAX_ENV_ENTRIES} entries")
    total = 0
    result: dict[str, str] = {}
    for key in sorted(env):
        value = env[key]
        if not key:
            raise InvalidArgument(field, "a variable name is empty")
        if "=" in key or "\x00" in key:
            raise InvalidArgument(f"{field}[{key!r}]", "name contains '=' or NUL")
        _no_nul(value, f"{field}[{key!r}]")
        total += len(key.encode()) + len(value.encode()) + 2
        if total > MAX_ENV_BYTES:
            raise InvalidArgument(field, f"larger than {MAX_ENV_BYTES} bytes in total")
        result[key] = value
    return result


def validate_tags(tags: Iterable[str], field: str) -> tuple[str, ...]:
    """Tags in their given order without duplicates."""
    result: list[str] = []
    for i, tag in enumerate(tags):
        if not tag or len(tag) > MAX_TAG_CHARS:
            raise InvalidArgument(f"{field}[{i}]", f"must be 1 to {MAX_TAG_CHARS} characters")
        if not _TAG.fullmatch(tag):
            raise InvalidArgument(
                f"{field}[{i}]", f"{tag!r} has characters outside [A-Za-z0-9_.:/=@+-]"
            )
        if tag not in result:
            result.append(tag)
    if len(result) > MAX_TAGS:
        raise InvalidArgument(field, f"more than {MAX_TAGS} tags")
    return tuple(result)


def validate_node_selector(selector: Mapping[str, str], field: str) -> tuple[tuple[str, str], ...]:
    """Node label → value pairs, sorted: labels 1 to 253 characters of [A-Za-z0-9_.:/@+-],
    values 0 to 253 of the same (Ray's labels, node ids and hostnames all fit)."""
    if len(selector) > MAX_NODE_SELECTOR:
        raise InvalidArgument(field, f"more than {MAX_NODE_SELECTOR} labels")
    for key, value in selector.items():
        if not key or len(key) > MAX_LABEL_CHARS or not _LABEL.fullmatch(key):
            raise InvalidArgument(
                f"{field}[{key!r}]",
                f"a label must be 1 to {MAX_LABEL_CHARS} characters of [A-Za-z0-9_.:/@+-]",
            )
        if len(value) > MAX_LABEL_CHARS or not _LABEL.fullmatch(value):
            raise InvalidArgument(
                f"{field}[{key!r}]",
                f"{value!r} is not 0 to {MAX_LABEL_CHARS} characters of [A-Za-z0-9_.:/@+-]",
            )
    return tuple(sorted(selector.items()))


def validate_request_id(text: str, field: str = "request_id") -> str:
    if not text:
        raise InvalidArgument(field, "is required (a UUID chosen by the client)")
    if len(text) > MAX_REQUEST_ID_CHARS or not _REQUEST_ID.fullmatch(text):
        raise InvalidArgument(
            field, f"must be 1 to {MAX_REQUEST_ID_CHARS} characters of [A-Za-z0-9_.:-]"
        )
    return text


def validate_file_mode(mode: int, field: str) -> int:
    """Permission bits; 0 means 0644. setuid and setgid bits are refused."""
    if mode == 0:
        return 0o644
    if mode > 0o7777 or mode & 0o6000:
        raise InvalidArgument(field, f"{mode:#o} is not allowed (permission bits and sticky only)")
    return mode


def validate_image(text: str, default: str = "host") -> str:
    """`text` (or `default` when empty) if it is "host" or a valid image reference."""
    if not text:
        text = default or "host"
    if text == "host":
        return text
    if len(text) > MAX_IMAGE_CHARS or not _IMAGE.fullmatch(text):
        raise InvalidArgument("spec.image", f"{text!r} is not 'host' or an image reference")
    try:
        parse_reference(text)
    except InvalidReference as exc:
        raise InvalidArgument("spec.image", str(exc)) from None
    return text


MAX_CREDENTIAL_CHARS = 8192


class Credentials(Protocol):
    """What a login is made of (the `RegistryAuth` message has these fields)."""

    @property
    def username(self) -> str: ...
    @property
    def password(self) -> str: ...
    @property
    def token(self) -> str: ...


def validate_registry_auth(auth: Credentials, field: str) -> RegistryCredentials | None:
    """Credentials for a registry, or None when none are given."""
    username, password, token = auth.username, auth.password, auth.token
    if not (username or password or token):
        return None
    for name, value in (("username", username), ("password", password), ("token", token)):
        if len(value) > MAX_CREDENTIAL_CHARS:
            raise InvalidArgument(f"{field}.{name}", f"longer than {MAX_CREDENTIAL_CHARS}")
        if "\x00" in value or "\n" in value or "\r" in value:
            raise InvalidArgument(f"{field}.{name}", "contains NUL or a line break")
    if token and (username or password):
        raise InvalidArgument(field, "give either a token or a username and password, not both")
    if password and not username:
        raise InvalidArgument(f"{field}.username", "is required with a password")
    if ":" in username:
        raise InvalidArgument(f"{field}.username", "must not contain ':'")
    return RegistryCredentials(username=username, password=password, token=token)


def _bytes_quantity(text: str, field: str, low: int) -> int | None:
    if not text:
        return None
    try:
        value = quantities.parse_bytes(text)
    except quantities.QuantityError:
        raise InvalidArgument(field, f"{text!r} is not {quantities.SIZE_FORMS}") from None
    if not low <= value <= MAX_BYTES:
        raise InvalidArgument(field, f"{text!r} is outside [{low}, {MAX_BYTES}] bytes")
    return value


def validate_resources(
    cpu: str, memory: str, pids: int, disk: str, defaults: SpecDefaults, field: str
) -> Limits:
    """The limits of a sandbox: those given (quantities; pids a count, 0 none given), the
    service's defaults for the others. No cpu given is no cpu limit."""
    asked: set[str] = set()
    cpu_millis: int | None = None
    if cpu:
        try:
            cpu_millis = quantities.parse_cpu_millis(cpu)
        except quantities.QuantityError:
            raise InvalidArgument(
                f"{field}.cpu", f"{cpu!r} is not {quantities.CPU_FORMS}"
            ) from None
        if not 1 <= cpu_millis <= MAX_CPU_MILLIS:
            raise InvalidArgument(
                f"{field}.cpu", f"{cpu!r} is outside [1m, {MAX_CPU_MILLIS // 1000}]"
            )
        asked.add("cpu")
    memory_bytes = _bytes_quantity(memory, f"{field}.memory", MIN_MEMORY_BYTES)
    disk_bytes = _bytes_quantity(disk, f"{field}.disk", MiB)
    if pids and not 1 <= pids <= MAX_PIDS:
        raise InvalidArgument(f"{field}.pids", f"{pids} is outside [1, {MAX_PIDS}]")
    for name, value in (("memory", memory_bytes), ("disk", disk_bytes), ("pids", pids or None)):
        if value is not None:
            asked.add(name)
    return Limits(
        cpu_millis=cpu_millis,
        memory_bytes=defaults.memory_bytes if memory_bytes is None else memory_bytes,
        pids=pids or defaults.pids,
        disk_bytes=defaults.disk_bytes if disk_bytes is None else disk_bytes,
        asked=frozenset(asked),
    )


def validate_lifetime(seconds: float, defaults: SpecDefaults, field: str) -> float:
    """The sandbox's lifetime: `seconds`, or the service's default for 0."""
    value = validate_finite(seconds, field, 0.0, MAX_LIFETIME_SECONDS)
    return value or defaults.max_lifetime_seconds


def validate_choice(value: str, field: str, served: Sequence[str], default: str) -> str:
    """`value` if it is one of `served`, `default` when empty."""
    if not value:
        return default
    if value not in served:
        allowed = ", ".join(repr(v) for v in served)
        raise InvalidArgument(field, f"{value!r} is not served (only {allowed})")
    return value


SNAPSHOT_ID = re.compile(r"^snap-[a-z0-9]{8,64}$")


def validate_snapshot_id(value: str, field: str, *, allow_empty: bool = True) -> str:
    """A snapshot id as the service makes them ("snap-" and 8 to 64 lower-case letters or
    digits); "" when empty is allowed."""
    if not value and allow_empty:
        return ""
    if not SNAPSHOT_ID.match(value):
        raise InvalidArgument(field, f"{value[:80]!r} is not a snapshot id (snap-...)")
    return value


def validate_network(mode: str, field: str) -> str:
    return validate_choice(mode, field, ("none",), "none")


EGRESS_MODES = ("isolated", "none", "allowlist", "internet")


def validate_egress(
    mode: str, rules: Sequence[tuple[str, str]], mode_field: str, rules_field: str
) -> EgressPolicy:
    """An egress mode and its rules, each rule a (kind, value) pair with kind "dns_name",
    "cidr" or "" (neither set), as one `EgressPolicy` with normalized rules (the grammar is
    the egress gateway's own, `egress.policy.parse_rule`)."""
    if mode and mode not in EGRESS_MODES:
        served = ", ".join(repr(m) for m in EGRESS_MODES)
        raise InvalidArgument(mode_field, f"{mode!r} is not an egress mode ({served})")
    if len(rules) > egress_policy.MAX_RULES:
        raise InvalidArgument(rules_field, f"more than {egress_policy.MAX_RULES} rules")
    normalized: list[EgressRule] = []
    for i, (kind, value) in enumerate(rules):
        if kind not in ("dns_name", "cidr"):
            raise InvalidArgument(f"{rules_field}[{i}]", "a rule needs a dns_name or a cidr")
        if kind == "dns_name" and value.strip() in ("*", "*."):
            raise InvalidArgument(
                f"{rules_field}[{i}].dns_name",
                "'*' is every name: use egress mode 'internet' (every public address) instead",
            )
        try:
            rule = egress_policy.parse_rule(**{kind: value})
        except ValueError as e:
            raise InvalidArgument(f"{rules_field}[{i}].{kind}", str(e)) from None
        if rule not in normalized:
            normalized.append(rule)
    if mode in ("isolated", "none") and normalized:
        raise InvalidArgument(mode_field, f"{mode!r} allows no egress, but rules are given")
    if mode == "allowlist" and not normalized:
        raise InvalidArgument(rules_field, "egress mode 'allowlist' needs at least one rule")
    return EgressPolicy(internet=mode == "internet", rules=tuple(normalized))


def validate_exposed_ports(ports: Iterable[int], field: str) -> tuple[int, ...]:
    """TCP ports to expose: each 1-65535, distinct, at most MAX_EXPOSED_PORTS."""
    result: list[int] = []
    for i, port in enumerate(ports):
        if i >= MAX_EXPOSED_PORTS:
            raise InvalidArgument(field, f"more than {MAX_EXPOSED_PORTS} ports")
        if not 1 <= port <= 65535:
            raise InvalidArgument(f"{field}[{i}]", f"{port} is not a TCP port (1 to 65535)")
        if port in result:
            raise InvalidArgument(f"{field}[{i}]", f"port {port} is listed twice")
        result.append(port)
    return tuple(result)


def validate_mounted_files(
    files: Iterable[tuple[str, bytes]], field: str
) -> tuple[tuple[str, bytes], ...]:
    """(path, content) pairs: absolute, distinct paths; bounded in number and bytes."""
    result: list[tuple[str, bytes]] = []
    seen: set[str] = set()
    total = 0
    for i, (item_path, content) in enumerate(files):
        item = f"{field}[{i}]"
        if i >= MAX_MOUNTED_FILES:
            raise InvalidArgument(field, f"more than {MAX_MOUNTED_FILES} files")
        path = validate_path(item_path, f"{item}.path")
        if path == "/":
            raise InvalidArgument(f"{item}.path", "must name a file, not '/'")
        if path in seen:
            raise InvalidArgument(f"{item}.path", f"{path!r} is mounted twice")
        seen.add(path)
        total += len(content)
        if total > MAX_MOUNTED_BYTES:
            raise InvalidArgument(field, f"larger than {MAX_MOUNTED_BYTES} bytes")
        result.append((path, content))
    return tuple(result)


def validate_terminal_dim(value: int, field: str) -> int:
    """A terminal's rows or columns; 0 means the default."""
    if value > 0xFFFF:
        raise InvalidArgument(field, f"{value} is larger than 65535")
    return value


def validate_terminal_size(rows: int, cols: int, field: str) -> tuple[int, int]:
    """(rows, cols); 0 keeps the default 24 rows or 80 columns."""
    rows = validate_terminal_dim(rows, f"{field}.rows") or 24
    cols = validate_terminal_dim(cols, f"{field}.cols") or 80
    return rows, cols


def validate_image_command(image_command: bool, image: str, command: tuple[str, ...]) -> bool:
    if image_command and image == "host" and not command:
        raise InvalidArgument("spec.image_command", "the 'host' image has no Entrypoint or Cmd")
    return image_command


def validate_protected(protected: bool, tty: bool) -> bool:
    if protected and tty:
        # Any process of the sandbox's user could open the terminal and type or print into it.
        raise InvalidArgument(
            "init.tty", "a protected command cannot have a terminal (other processes could open it)"
        )
    return protected
