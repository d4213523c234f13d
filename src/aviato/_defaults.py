"""Configuration: `SandboxDefaults`, `NetworkOptions`, `Serialization` and environment variables.

Environment variables read by the SDK (each read when it is needed, never at import):

- `AVIATO_BASE_URL`: the service, ``unix:///abs/path.sock``, ``http://host:port`` or
  ``https://host:port``; unset means the local service, started on first use.
- `AVIATO_API_KEY`: sent as ``authorization: Bearer <key>`` on every call.
- `AVIATO_TLS_CA`: a CA bundle file for ``https://`` URLs (default: the system roots).
- `AVIATO_IMAGE`: the image when neither the call nor the defaults name one (default: the
  service's default image, "host" unless the service is started with --default-image).
- `AVIATO_LEASE_TTL`: a Session's lease time-to-live in seconds (default 30).
- `AVIATO_STATE_DIR`: the local service's state directory (see `aviato._local`).
"""

from __future__ import annotations

import dataclasses
import enum
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from aviato._credentials import ImagePullCredentials, coerce_pull_credentials
from aviato.exceptions import SandboxValidationError
from aviato.v1 import sandbox_pb2 as pb

__all__ = [
    "DEFAULT_IMAGE",
    "DEFAULT_LEASE_TTL_SECONDS",
    "DEFAULT_MAX_OUTPUT_BYTES",
    "DEFAULT_MAX_READ_FILE_BYTES",
    "DEFAULT_REQUEST_TIMEOUT_SECONDS",
    "NetworkOptions",
    "SandboxDefaults",
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


class Serialization(enum.StrEnum):
    """How `@session.function()` moves arguments and results. Only JSON is supported.

    `PICKLE` exists so that aviato-era code still imports; choosing it raises
    `FunctionSerializationError`, because unpickling a result produced by untrusted code would
    let that code run in your process.
    """

    JSON = "json"
    PICKLE = "pickle"


@dataclass(frozen=True)
class NetworkOptions:
    """Network settings of a sandbox (kept for compatibility with aviato-era code).

    This service runs every sandbox with loopback only. `NetworkOptions()` and
    `NetworkOptions(egress_mode="isolated")` (or `"none"`) are accepted; anything that asks for
    ingress, exposed ports or egress raises `SandboxValidationError` (a ValueError) when the
    sandbox is constructed.
    """

    ingress_mode: str | None = None
    exposed_ports: tuple[int, ...] | None = None
    egress_mode: str | None = None

    def __post_init__(self) -> None:
        ports = self.exposed_ports
        if ports is not None:
            ports_t = tuple(int(p) for p in ports)
            object.__setattr__(self, "exposed_ports", ports_t or None)

    def to_spec_network(self) -> str:
        """The `SandboxSpec.network` value; raises SandboxValidationError for unsupported modes."""
        isolated = (None, "", "none", "isolated")
        if (
            self.ingress_mode in isolated
            and self.egress_mode in isolated
            and not self.exposed_ports
        ):
            return "none"
        raise SandboxValidationError(
            f"network: {self!r} is not supported; this service runs sandboxes without network "
            "access (loopback only). Use NetworkOptions() or egress_mode='isolated'."
        )


def _as_str_tuple(name: str, value: Iterable[str] | None) -> tuple[str, ...]:
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


@dataclass(frozen=True, kw_only=True)
class SandboxDefaults:
    """Defaults applied to every sandbox made with them (by `Sandbox(defaults=...)` or a Session).

    Merge rules when a sandbox is made: an explicit argument wins over the default; `tags` are
    concatenated (defaults first); `environment_variables` and `node_selector` are merged,
    explicit keys winning.

    Fields:
        container_image: The image: ``"host"`` (the host's system, read-only, secrets hidden) or
            an OCI reference such as ``"python:3.11"``, pulled on first use (docs/images.md).
            None means `AVIATO_IMAGE`, else the service's default (``"host"`` unless configured).
        command, args: The main process. None means the service's keep-alive (a process that
            waits and exits 0 on SIGTERM), so the sandbox runs until stopped.
        image_command: True: the main process is the image's own ``Entrypoint + Cmd`` (an OCI
            image's program) instead of the keep-alive. Not together with `command`.
        image_pull_credentials: `ImagePullCredentials` (or a dict of them) for the registry of
            `container_image`; None means the service's Docker config, else anonymous.
        base_url: The service address. `AVIATO_BASE_URL` wins over this field when it is set
            (as in the aviato SDK); None means the embedded local service.
        request_timeout_seconds: Deadline of each request to the service (default 300 s), and the
            default timeout of `Sandbox.wait()` / `wait_until_complete()`.
        max_lifetime_seconds: Server-side lifetime; None means the service default (1 hour).
        temp_dir: Directory in the sandbox for `@session.function` payloads (default ``/tmp``).
        tags: Tags given to every sandbox (and the filter of `Session.list`).
        resources: ``{"cpu": "500m", "memory": "256Mi", "pids": 256, "disk": "1Gi"}``; strings in
            Kubernetes quantity form or numbers (cpu in cores, memory and disk in bytes).
        network: `NetworkOptions` (isolated only).
        environment_variables: Environment of the main process and of every command.
        working_dir: Working directory inside the sandbox; None means the image's (``/workspace``).
        lease_ttl_seconds: A Session's lease time-to-live; None means `AVIATO_LEASE_TTL`, else 30.
        node_selector: Node labels the sandbox's node must carry (``{"pool": "gpu"}``), for a
            service placed on a cluster (docs/cluster.md); the key ``aviato.node`` matches a node
            id or hostname. Ignored by the local placement.
        max_output_bytes: How much of each output stream (stdout, stderr) of a command its
            `ProcessResult` keeps: the first 64 MiB by default (then ``stdout_truncated`` /
            ``stderr_truncated`` say so). Streaming ``process.stdout`` is not limited by it.
            Overridden per call by ``exec(max_output_bytes=...)``.
        max_read_file_bytes: The largest file `read_file` reads into memory (64 MiB by
            default); a larger one raises `SandboxFileError`: use `read_file_streaming` or
            `download_file`. Overridden per call by ``read_file(max_bytes=...)``.
    """

    container_image: str | None = None
    command: str | None = None
    args: tuple[str, ...] = ()
    base_url: str | None = None
    request_timeout_seconds: float = DEFAULT_REQUEST_TIMEOUT_SECONDS
    max_lifetime_seconds: float | None = None
    temp_dir: str = "/tmp"
    tags: tuple[str, ...] = ()
    resources: Mapping[str, str | int | float] | None = None
    network: NetworkOptions | None = None
    environment_variables: Mapping[str, str] = field(default_factory=dict)
    working_dir: str | None = None
    lease_ttl_seconds: float | None = None
    image_command: bool = False
    image_pull_credentials: ImagePullCredentials | None = None
    node_selector: Mapping[str, str] = field(default_factory=dict)
    max_output_bytes: int = DEFAULT_MAX_OUTPUT_BYTES
    max_read_file_bytes: int = DEFAULT_MAX_READ_FILE_BYTES

    def __post_init__(self) -> None:
        object.__setattr__(self, "tags", _as_str_tuple("tags", self.tags))
        object.__setattr__(self, "args", _as_str_tuple("args", self.args))
        object.__setattr__(self, "network", coerce_network(self.network))
        object.__setattr__(
            self, "image_pull_credentials", coerce_pull_credentials(self.image_pull_credentials)
        )
        if not isinstance(self.image_command, bool):
            raise TypeError(f"image_command must be True or False, not {self.image_command!r}")
        if self.image_command and self.command:
            raise SandboxValidationError(
                "image_command=True runs the image's Entrypoint + Cmd: give it or a command, "
                f"not both (command={self.command!r})"
            )
        object.__setattr__(self, "environment_variables", dict(self.environment_variables))
        object.__setattr__(self, "node_selector", coerce_node_selector(self.node_selector))
        if self.resources is not None:
            object.__setattr__(self, "resources", dict(self.resources))
            resources_to_proto(self.resources)  # validate early
        if self.request_timeout_seconds <= 0:
            raise ValueError("request_timeout_seconds must be positive")
        byte_count("max_output_bytes", self.max_output_bytes)
        byte_count("max_read_file_bytes", self.max_read_file_bytes)
        if self.base_url is not None:
            object.__setattr__(self, "base_url", self.base_url.rstrip("/"))

    def merge_tags(self, tags: Iterable[str] | None) -> list[str]:
        """The default tags followed by `tags` (concatenated, not de-duplicated)."""
        return [*self.tags, *_as_str_tuple("tags", tags)]

    def merge_environment_variables(self, env: Mapping[str, str] | None) -> dict[str, str]:
        """The default environment updated with `env` (explicit keys win)."""
        merged = dict(self.environment_variables)
        merged.update(env or {})
        return merged

    def merge_node_selector(self, selector: Mapping[str, str] | None) -> dict[str, str]:
        """The default node selector updated with `selector` (explicit labels win)."""
        merged = dict(self.node_selector)
        merged.update(coerce_node_selector(selector))
        return merged

    def with_overrides(self, **overrides: Any) -> SandboxDefaults:
        """A copy with some fields replaced (`dataclasses.replace`)."""
        return dataclasses.replace(self, **overrides)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SandboxDefaults:
        """Builds defaults from a mapping (e.g. a loaded config file); unknown keys raise."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise TypeError(f"unknown SandboxDefaults fields: {', '.join(unknown)}")
        return cls(**dict(data))


# --- environment ------------------------------------------------------------------------------


def resolve_base_url(explicit: str | None, defaults: SandboxDefaults | None) -> str | None:
    """explicit > `AVIATO_BASE_URL` > `defaults.base_url`; None means the local service."""
    for candidate in (explicit, os.environ.get(ENV_BASE_URL), defaults and defaults.base_url):
        if candidate:
            return candidate.rstrip("/")
    return None


def resolve_image(explicit: str | None, defaults: SandboxDefaults) -> str:
    """explicit > `defaults.container_image` > `AVIATO_IMAGE` > "" (the service's default)."""
    return explicit or defaults.container_image or os.environ.get(ENV_IMAGE) or ""


def api_key() -> str | None:
    return os.environ.get(ENV_API_KEY) or None


def lease_ttl_seconds(defaults: SandboxDefaults | None = None) -> float:
    """`defaults.lease_ttl_seconds` > `AVIATO_LEASE_TTL` > 30 s (clamped to 1..3600)."""
    value: float | None = defaults.lease_ttl_seconds if defaults else None
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
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise SandboxValidationError(
            f"resources.{key}: expected a string or a number, got {value!r}"
        )
    if isinstance(value, str):
        return value.strip()
    if key == "cpu":
        return repr(float(value)) if isinstance(value, float) else str(value)
    return str(int(value))


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
                f"resources.pids: expected an integer, got {pids!r}"
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
