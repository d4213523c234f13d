"""Turns request messages into validated runtime values; every refusal names the field.

`validate_spec` maps a `SandboxSpec` to a `runtime.base.SandboxConfig` (with an empty sandbox id,
filled in by `lifecycle`), `validate_exec_init` an `ExecInit` to an `ExecSpec`, and the small
functions validate the other request fields. Each raises `errors.InvalidArgument` whose message
starts with the field's path, e.g. "spec.resources.memory: '12Qi' is not a Kubernetes quantity".

What validation cannot promise: that the values *work*. An image that names no image, a working
directory that does not exist in it, a memory limit too small for the program: those are found
by the runtime when the sandbox is created, and end as a FAILED sandbox with the runtime's message.
"""

from __future__ import annotations

import math
import posixpath
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from aviato.images.reference import InvalidReference, parse_reference
from aviato.runtime.base import ExecSpec, RegistryCredentials, SandboxConfig
from aviato.server import quantities
from aviato.server.errors import InvalidArgument
from aviato.v1 import sandbox_pb2 as pb

__all__ = [
    "MAX_LIFETIME_SECONDS",
    "ValidSpec",
    "validate_exec_init",
    "validate_file_mode",
    "validate_finite",
    "validate_path",
    "validate_registry_auth",
    "validate_request_id",
    "validate_spec",
    "validate_tags",
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
MAX_MOUNTED_BYTES = 16 * MiB
MAX_LIFETIME_SECONDS = 7 * 24 * 3600.0
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
class ValidSpec:
    """A validated spec: the runtime config (sandbox_id still ""), plus what the service keeps.

    `spec` is the normalized message stored in the registry and returned to clients;
    `max_lifetime_seconds` is 0 when the service default applies.
    """

    config: SandboxConfig
    spec: pb.SandboxSpec
    tags: tuple[str, ...]
    max_lifetime_seconds: float


def validate_finite(value: float, field: str, low: float, high: float) -> float:
    """`value` if it is a finite number within [low, high]."""
    if not math.isfinite(value):
        raise InvalidArgument(field, f"{value!r} is not a finite number")
    if not low <= value <= high:
        raise InvalidArgument(field, f"{value:g} is outside [{low:g}, {high:g}]")
    return value


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
        raise InvalidArgument(field, "must not be empty")
    if len(items) > MAX_ARGV_ITEMS:
        raise InvalidArgument(field, f"more than {MAX_ARGV_ITEMS} items")
    if not items[0]:
        raise InvalidArgument(f"{field}[0]", "must not be empty")
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


def _image(text: str, default: str = "host") -> str:
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


def validate_registry_auth(auth: pb.RegistryAuth, field: str) -> RegistryCredentials | None:
    """Credentials for a registry, or None when none are given."""
    if not (auth.username or auth.password or auth.token):
        return None
    for name in ("username", "password", "token"):
        value = getattr(auth, name)
        if len(value) > MAX_CREDENTIAL_CHARS:
            raise InvalidArgument(f"{field}.{name}", f"longer than {MAX_CREDENTIAL_CHARS}")
        if "\x00" in value or "\n" in value or "\r" in value:
            raise InvalidArgument(f"{field}.{name}", "contains NUL or a line break")
    if auth.token and (auth.username or auth.password):
        raise InvalidArgument(field, "give either a token or a username and password, not both")
    if auth.password and not auth.username:
        raise InvalidArgument(f"{field}.username", "is required with a password")
    if ":" in auth.username:
        raise InvalidArgument(f"{field}.username", "must not contain ':'")
    return RegistryCredentials(username=auth.username, password=auth.password, token=auth.token)


def _bytes_quantity(text: str, field: str, low: int) -> int | None:
    if not text:
        return None
    try:
        value = quantities.parse_bytes(text)
    except quantities.QuantityError:
        raise InvalidArgument(field, f"{text!r} is not a Kubernetes quantity") from None
    if not low <= value <= MAX_BYTES:
        raise InvalidArgument(field, f"{text!r} is outside [{low}, {MAX_BYTES}] bytes")
    return value


def _resources(res: pb.Resources) -> tuple[int | None, int | None, int | None, int | None]:
    cpu: int | None = None
    if res.cpu:
        try:
            cpu = quantities.parse_cpu_millis(res.cpu)
        except quantities.QuantityError:
            raise InvalidArgument(
                "spec.resources.cpu", f"{res.cpu!r} is not a Kubernetes quantity"
            ) from None
        if not 1 <= cpu <= MAX_CPU_MILLIS:
            raise InvalidArgument(
                "spec.resources.cpu", f"{res.cpu!r} is outside [1m, {MAX_CPU_MILLIS // 1000}]"
            )
    memory = _bytes_quantity(res.memory, "spec.resources.memory", MIN_MEMORY_BYTES)
    disk = _bytes_quantity(res.disk, "spec.resources.disk", MiB)
    pids: int | None = None
    if res.pids:
        if not 1 <= res.pids <= MAX_PIDS:
            raise InvalidArgument("spec.resources.pids", f"{res.pids} is outside [1, {MAX_PIDS}]")
        pids = res.pids
    return cpu, memory, pids, disk


def _mounted_files(files: Iterable[pb.MountedFile]) -> tuple[tuple[str, bytes], ...]:
    result: list[tuple[str, bytes]] = []
    seen: set[str] = set()
    total = 0
    for i, item in enumerate(files):
        field = f"spec.mounted_files[{i}]"
        if i >= MAX_MOUNTED_FILES:
            raise InvalidArgument("spec.mounted_files", f"more than {MAX_MOUNTED_FILES} files")
        path = validate_path(item.path, f"{field}.path")
        if path == "/":
            raise InvalidArgument(f"{field}.path", "must name a file, not '/'")
        if path in seen:
            raise InvalidArgument(f"{field}.path", f"{path!r} is mounted twice")
        seen.add(path)
        total += len(item.content)
        if total > MAX_MOUNTED_BYTES:
            raise InvalidArgument("spec.mounted_files", f"larger than {MAX_MOUNTED_BYTES} bytes")
        result.append((path, item.content))
    return tuple(result)


def validate_spec(spec: pb.SandboxSpec, *, default_image: str = "host") -> ValidSpec:
    """Validates every field of `spec`; the first invalid one raises InvalidArgument.

    An empty `spec.image` becomes `default_image` (the service's --default-image).
    """
    image = _image(spec.image, default_image)
    command = validate_argv(spec.command, "spec.command", allow_empty=True)
    registry_auth = validate_registry_auth(spec.registry_auth, "spec.registry_auth")
    if spec.image_command and image == "host" and not command:
        raise InvalidArgument("spec.image_command", "the 'host' image has no Entrypoint or Cmd")
    env = validate_env(spec.env, "spec.env")
    working_dir = validate_path(spec.working_dir, "spec.working_dir", allow_empty=True)
    tags = validate_tags(spec.tags, "spec.tags")
    node_selector = validate_node_selector(spec.node_selector, "spec.node_selector")
    cpu, memory, pids, disk = _resources(spec.resources)
    lifetime = validate_finite(
        spec.max_lifetime_seconds, "spec.max_lifetime_seconds", 0.0, MAX_LIFETIME_SECONDS
    )
    mounted = _mounted_files(spec.mounted_files)
    if spec.network not in ("", "none"):
        raise InvalidArgument("spec.network", f"{spec.network!r} is not served (only 'none')")
    config = SandboxConfig(
        sandbox_id="",
        image=image,
        command=command,
        env=env,
        working_dir=working_dir,
        cpu_millis=cpu,
        memory_bytes=memory,
        pids=pids,
        disk_bytes=disk,
        mounted_files=mounted,
        network="none",
        node_selector=node_selector,
        registry_credentials=registry_auth,
        image_command=spec.image_command,
    )
    normalized = pb.SandboxSpec()
    normalized.CopyFrom(spec)
    normalized.image = image
    normalized.working_dir = working_dir
    normalized.network = "none"
    del normalized.tags[:]
    normalized.tags.extend(tags)
    for i, (path, _) in enumerate(mounted):
        normalized.mounted_files[i].path = path
    return ValidSpec(config=config, spec=normalized, tags=tags, max_lifetime_seconds=lifetime)


def validate_exec_init(init: pb.ExecInit) -> ExecSpec:
    """The ExecSpec for an ExecInit (the sandbox id is checked by the caller)."""
    argv = validate_argv(init.argv, "init.argv", allow_empty=False)
    cwd = validate_path(init.cwd, "init.cwd", allow_empty=True)
    env = validate_env(init.env, "init.env")
    timeout = validate_finite(
        init.timeout_seconds, "init.timeout_seconds", 0.0, MAX_EXEC_TIMEOUT_SECONDS
    )
    if init.protected and init.tty:
        # Any process of the sandbox's user could open the terminal and type or print into it.
        raise InvalidArgument(
            "init.tty", "a protected command cannot have a terminal (other processes could open it)"
        )
    rows, cols = 24, 80
    if init.HasField("tty_size"):
        rows = _terminal_dim(init.tty_size.rows, "init.tty_size.rows") or rows
        cols = _terminal_dim(init.tty_size.cols, "init.tty_size.cols") or cols
    return ExecSpec(
        argv=argv,
        cwd=cwd,
        env=env,
        timeout_seconds=timeout,
        stdin=init.stdin,
        tty=init.tty,
        rows=rows,
        cols=cols,
        protected=init.protected,
    )


def _terminal_dim(value: int, field: str) -> int:
    if value > 0xFFFF:
        raise InvalidArgument(field, f"{value} is larger than 65535")
    return value


def validate_terminal_size(size: pb.TerminalSize, field: str) -> tuple[int, int]:
    """(rows, cols) of a resize frame; 0 keeps the default 24 rows or 80 columns."""
    rows = _terminal_dim(size.rows, f"{field}.rows") or 24
    cols = _terminal_dim(size.cols, f"{field}.cols") or 80
    return rows, cols
