"""The options of a sandbox, declared once, and the one function that merges them with defaults.

`SandboxSettings` is the set of options every way of making a sandbox takes; the signatures
compose it with PEP 692's ``**options: Unpack[...]``:

- `Sandbox(...)` takes `SandboxArgs`: the settings, `command`/`args` and `base_url`;
- `Sandbox.run(*command, ...)` takes `RunOptions`: the settings and `base_url`;
- `Session.sandbox(...)` takes `SandboxOptions`: the settings and `command`/`args` (a
  session's sandboxes live on its service);
- ``@session.function(...)`` takes `FunctionOptions`: the settings and the function's own.

`SandboxDefaults` holds a default for each setting; `resolve` applies the merge rules (explicit
value > default; tags concatenated; environment and node selector merged) and produces what the
create sends. A new option costs this module only: a key of `SandboxSettings` (and its line in
`SandboxArgs`' docstring), a field of `SandboxDefaults` if it has a default, and its line in
`resolve` (`tests/sdk/test_unit_defaults.py` checks that every setting has its default).
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypedDict

from aviato import _defaults
from aviato._credentials import ImagePullCredentials, coerce_pull_credentials
from aviato._defaults import (
    DEFAULT_MAX_OUTPUT_BYTES,
    DEFAULT_MAX_READ_FILE_BYTES,
    DEFAULT_REQUEST_TIMEOUT_SECONDS,
    NetworkOptions,
    Serialization,
    as_str_tuple,
    byte_count,
    coerce_network,
    coerce_node_selector,
    resources_to_proto,
)
from aviato._secrets import secret_names
from aviato._volumes import HostMount, Volume, mounts_to_proto
from aviato.exceptions import SandboxValidationError
from aviato.v1 import sandbox_pb2 as pb

if TYPE_CHECKING:
    from aviato._snapshot import Snapshot

__all__ = [
    "FunctionOptions",
    "ResolvedSandbox",
    "RunOptions",
    "SandboxArgs",
    "SandboxDefaults",
    "SandboxOptions",
    "SandboxSettings",
    "check_keys",
    "check_original_only",
    "resolve",
]


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
        idle_timeout_seconds: The service stops the sandbox (reason "idle") once no command
            has run and no file has moved for this long; None means never.
        temp_dir: Directory in the sandbox for `@session.function` payloads (default ``/tmp``).
        tags: Tags given to every sandbox (and the filter of `Session.list`).
        resources: ``{"cpu": "500m", "memory": "256Mi", "pids": 256, "disk": "1Gi"}``; strings in
            Kubernetes quantity form ("512Mi", "2G", "500m") or numbers (cpu in cores, memory
            and disk in bytes).
        network: `NetworkOptions` (egress by policy, exposed ports; loopback only by default).
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
        volumes: ``{"/cache": Volume("cache"), "/data": HostMount("/data/sets")}``: directories
            mounted at those sandbox paths (docs/volumes.md); a call's own ``volumes`` are
            merged over these, its paths winning.
        max_read_file_bytes: The largest file `read_file` reads into memory (64 MiB by
            default); a larger one raises `SandboxFileError`: use `read_file_streaming` or
            `download_file`. Overridden per call by ``read_file(max_bytes=...)``.
        writable_layer: Where the sandbox's writable layer (its files outside the image)
            lives: ``"memory"`` (a tmpfs, counted against the memory limit too) or ``"disk"``
            (a filesystem of the sandbox's disk size on the service's disk). None means the
            service's default (``aviato server --writable-layer``, ``"memory"`` unless set).
        secrets: Names of your secrets (`Secret.create`) that every sandbox gets as
            environment variables of the same names (docs/secrets.md); a call's own
            ``secrets`` are added to these.
    """

    container_image: str | None = None
    command: str | None = None
    args: tuple[str, ...] = ()
    base_url: str | None = None
    request_timeout_seconds: float = DEFAULT_REQUEST_TIMEOUT_SECONDS
    max_lifetime_seconds: float | None = None
    idle_timeout_seconds: float | None = None
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
    volumes: Mapping[str, Volume | HostMount] = field(default_factory=dict)
    writable_layer: str | None = None
    secrets: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "secrets", tuple(secret_names(self.secrets)))
        object.__setattr__(self, "tags", as_str_tuple("tags", self.tags))
        object.__setattr__(self, "args", as_str_tuple("args", self.args))
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
        object.__setattr__(self, "volumes", dict(self.volumes))
        mounts_to_proto(self.volumes)  # validate early
        if self.resources is not None:
            object.__setattr__(self, "resources", dict(self.resources))
            resources_to_proto(self.resources)  # validate early
        if self.request_timeout_seconds <= 0:
            raise ValueError("request_timeout_seconds must be positive")
        byte_count("max_output_bytes", self.max_output_bytes)
        byte_count("max_read_file_bytes", self.max_read_file_bytes)
        check_writable_layer(self.writable_layer)
        if self.base_url is not None:
            object.__setattr__(self, "base_url", self.base_url.rstrip("/"))

    def merge_tags(self, tags: Iterable[str] | None) -> list[str]:
        """The default tags followed by `tags` (concatenated, not de-duplicated)."""
        return [*self.tags, *as_str_tuple("tags", tags)]

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

    def merge_volumes(
        self, volumes: Mapping[str, Volume | HostMount] | None
    ) -> list[pb.DirectoryMount]:
        """The default volumes updated with `volumes` (explicit paths win), as the spec's."""
        merged = dict(self.volumes)
        merged.update(volumes or {})
        return mounts_to_proto(merged)

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


def check_writable_layer(value: str | None) -> str | None:
    """`value` if it is None, "memory" or "disk"; else ValueError naming the option."""
    if value is not None and value not in ("memory", "disk"):
        raise SandboxValidationError(f"writable_layer must be 'memory' or 'disk', not {value!r}")
    return value


def snapshot_id_of(snapshot: Snapshot | str | None) -> str:
    """The id of `snapshot` (a `Snapshot` or its id; None: "")."""
    if snapshot is None:
        return ""
    found = snapshot if isinstance(snapshot, str) else getattr(snapshot, "id", None)
    if not isinstance(found, str) or not found:
        raise TypeError(f"snapshot must be a Snapshot or a snapshot id, not {snapshot!r}")
    return found


class SandboxSettings(TypedDict, total=False):
    """Options of a sandbox (see `Sandbox` for what each means). None, or leaving one out,
    means the default of `SandboxDefaults`."""

    container_image: str | None
    image_command: bool | None
    image_pull_credentials: ImagePullCredentials | Mapping[str, str] | None
    tags: Sequence[str] | None
    environment_variables: Mapping[str, str] | None
    resources: Mapping[str, str | int | float] | None
    mounted_files: Sequence[Mapping[str, Any]] | None
    network: NetworkOptions | Mapping[str, Any] | None
    working_dir: str | None
    max_lifetime_seconds: float | None
    idle_timeout_seconds: float | None
    node_selector: Mapping[str, str] | None
    request_timeout_seconds: float | None
    volumes: Mapping[str, Volume | HostMount] | None
    writable_layer: str | None
    snapshot: Snapshot | str | None
    secrets: Sequence[str] | None


class _MainProcess(TypedDict, total=False):
    command: str | None
    args: Sequence[str] | None


class _Address(TypedDict, total=False):
    base_url: str | None


class SandboxOptions(_MainProcess, SandboxSettings, total=False):
    """The settings and the main process: what `Session.sandbox` takes."""


class SandboxArgs(SandboxOptions, _Address, total=False):
    """Everything the `Sandbox` constructor takes besides `defaults`:

    command, args: The main process (`run(*command)` takes them positionally). Default: none,
        i.e. the service's keep-alive, which runs until the sandbox is stopped.
    container_image: Default `AVIATO_IMAGE`, else the service's default (``"host"``).
        An OCI reference (``"python:3.11"``, ``"ghcr.io/org/app:1.4"``) is pulled on first
        use; the sandbox is PENDING ("pulling image ...") meanwhile.
    image_command: True: the main process is the image's own ``Entrypoint + Cmd`` instead
        of the keep-alive; the sandbox ends when it exits, with its exit code (see
        `returncode`). Cannot be combined with a command (`SandboxValidationError`). A call's
        command or image_command overrides those of `defaults`.
    image_pull_credentials: `ImagePullCredentials` (or ``{"username", "password"}`` /
        ``{"token"}``) for the image's registry; used for this pull only, never stored by
        the service. Default: `defaults.image_pull_credentials`, else the service's Docker
        config, else anonymous.
    tags: Added to the default tags.
    environment_variables: Merged over the default environment.
    resources: ``{"cpu", "memory", "pids", "disk"}`` (strings or numbers).
    mounted_files: ``[{"path": "/abs", "content": b"..."}]`` (or the spelling
        ``mount_path``/``file_content``): read-only files inside the sandbox.
    network: `NetworkOptions` or dict: ``NetworkOptions(egress=[EgressRule(dns_name=
        "pypi.org")])`` or ``egress_mode="internet"`` opens egress (loopback only by default);
        ``NetworkOptions(exposed_ports=[8080])`` relays servers of the sandbox from addresses
        on the local service's 127.0.0.1 (see `exposed_ports`).
    max_lifetime_seconds: The service stops the sandbox after this long (default: the
        service's, 1 hour).
    idle_timeout_seconds: The service stops the sandbox (reason "idle") once it has run no
        command and moved no file for this long (exec and file transfers count; logs and port
        traffic do not; a paused sandbox is never idle). Default: never.
    working_dir: Absolute directory for the main process and commands (default ``/workspace``).
    node_selector: Node labels the sandbox's node must carry, ``{"pool": "gpu"}``, when the
        service places sandboxes on a cluster (docs/cluster.md); merged over the default
        selector. A selector no node matches leaves the sandbox PENDING until the service's
        placement deadline, then FAILED. Ignored by the local placement.
    volumes: ``{"/cache": Volume("cache"), "/data": Volume("ds", read_only=True),
        "/datasets": HostMount("/data/datasets/imagenet")}``: the caller's named volumes
        (created on first use, persistent, shareable between sandboxes) and host directories
        the operator allowed (read-only), at absolute sandbox paths (docs/volumes.md). Merged
        over the default volumes.
    base_url: The service (default `AVIATO_BASE_URL`, else `defaults.base_url`, else local).
    request_timeout_seconds: Deadline of each request; default of `wait()` (300 s).
    writable_layer: ``"memory"`` or ``"disk"`` (see `SandboxDefaults.writable_layer`).
    snapshot: A `Snapshot` (or its id) to start from: the writable layer begins as the
        snapshot's content, over the same image (another image is refused); an unknown id or
        another owner's snapshot is `SandboxNotFoundError`.
    secrets: ``["OPENAI_API_KEY"]``: names of your secrets (`Secret.create`), each put into
        the environment of the main process and of every command under its own name; added to
        the default secrets. A name you have no secret of, or also in
        `environment_variables`, is refused when the sandbox is created
        (`SandboxValidationError`). Answers and `aviato get` show the names, never values.
    """


class RunOptions(SandboxSettings, _Address, total=False):
    """What `Sandbox.run` takes besides the positional command and `defaults`."""


class FunctionOptions(SandboxSettings, total=False):
    """What ``@session.function(...)`` takes: the settings of its sandboxes (its
    `environment_variables` apply per call, and `image_command` must stay False), and
    `serialization` (JSON only), `temp_dir` (default: the session's), `timeout_seconds` (per
    call; default none) and `reuse_sandboxes` (default True); see `RemoteFunction`."""

    serialization: Serialization | str
    temp_dir: str | None
    timeout_seconds: float | None
    reuse_sandboxes: bool


@dataclass(frozen=True)
class ResolvedSandbox:
    """What a sandbox's options resolve to: the spec to create, and where and how."""

    spec: pb.SandboxSpec
    base_url: str | None
    request_timeout_seconds: float
    pull_credentials: ImagePullCredentials | None
    request_id: str


# Options of the original aviato SDK that this one does not take, and what to do instead.
# Empty placement pins are accepted and ignored, so that code written for the original runs.
ORIGINAL_ONLY: dict[str, str] = {
    "ports": "expose a port with network=NetworkOptions(exposed_ports=[8080])",
    "s3_mount": "mount a volume (volumes={'/data': Volume('data')}) or copy the data in",
    "max_timeout_seconds": "use max_lifetime_seconds",
    "runway_ids": "the service places sandboxes itself (node_selector picks nodes by label)",
    "tower_ids": "the service places sandboxes itself (node_selector picks nodes by label)",
}
PLACEMENT_PINS = frozenset({"runway_ids", "tower_ids"})


def check_original_only(name: str, value: object, where: str) -> None:
    """`SandboxValidationError` for an option of the original SDK that this one does not take
    (`ORIGINAL_ONLY`), naming it and what to use; an empty placement pin passes."""
    if name in PLACEMENT_PINS and not value:
        return
    raise SandboxValidationError(
        f"{where}: {name}= is not supported by this SDK: {ORIGINAL_ONLY[name]}"
    )


def check_keys(options: Mapping[str, object], allowed: frozenset[str], where: str) -> None:
    """TypeError naming the keywords of `options` that `where` does not take (for callers whose
    keywords were not checked by a type checker); `SandboxValidationError` for those of the
    original SDK that this one does not support (`ORIGINAL_ONLY`)."""
    for name in sorted(set(options) & ORIGINAL_ONLY.keys()):
        check_original_only(name, options[name], where)
    unknown = sorted(set(options) - allowed - ORIGINAL_ONLY.keys())
    if unknown:
        raise TypeError(f"{where}: unexpected options: {', '.join(unknown)}")


def resolve(options: SandboxArgs, defaults: SandboxDefaults) -> ResolvedSandbox:
    """Merges `options` over `defaults` (the one place where that happens) and validates them;
    errors name the option."""
    check_keys(options, SandboxArgs.__optional_keys__, "Sandbox")
    d = defaults
    command = options.get("command")
    args = options.get("args")
    image_command = options.get("image_command")
    if image_command is not None and not isinstance(image_command, bool):
        raise TypeError(f"image_command must be True, False or None, not {image_command!r}")
    if image_command and command:
        raise SandboxValidationError(
            "image_command=True runs the image's Entrypoint + Cmd: give it or a command, "
            f"not both (command={command!r})"
        )
    # the call's own choice of main process wins over the defaults' (command or image's)
    use_image_command = (
        image_command if image_command is not None else (d.image_command and not command)
    )
    cmd = command or (None if use_image_command else d.command)
    if cmd:
        argv = [cmd, *(list(args) if args is not None else list(d.args))]
    else:
        if args:
            raise SandboxValidationError("args given without a command: give the command too")
        argv = []
    net = _defaults.coerce_network(options.get("network")) or d.network
    wd = options.get("working_dir") or d.working_dir
    if wd is not None and not wd.startswith("/"):
        raise SandboxValidationError(f"working_dir must be an absolute path, not {wd!r}")
    lifetime = options.get("max_lifetime_seconds")
    if lifetime is None:
        lifetime = d.max_lifetime_seconds
    idle = options.get("idle_timeout_seconds")
    if idle is None:
        idle = d.idle_timeout_seconds
    # Only what is set goes into the spec (an unset field is the empty one): an option left
    # out whose default is empty costs no merge, no conversion and no field to fill.
    spec_fields: dict[str, Any] = {"command": argv} if argv else {}
    image = _defaults.resolve_image(options.get("container_image"), d.container_image)
    if image:
        spec_fields["image"] = image
    env = options.get("environment_variables")
    if env is not None or d.environment_variables:
        spec_fields["env"] = d.merge_environment_variables(env)
    if wd:
        spec_fields["working_dir"] = wd
    tags = options.get("tags")
    if tags is not None or d.tags:
        spec_fields["tags"] = d.merge_tags(tags)
    if lifetime:
        spec_fields["max_lifetime_seconds"] = float(lifetime)
    files = options.get("mounted_files")
    if files is not None:
        spec_fields["mounted_files"] = _defaults.mounted_files_to_proto(files)
    if net is not None:
        spec_fields["egress_mode"], spec_fields["egress"] = net.to_spec_egress()
        spec_fields["exposed_ports"] = net.to_spec_ports()
    if use_image_command:
        spec_fields["image_command"] = True
    selector = options.get("node_selector")
    if selector is not None or d.node_selector:
        spec_fields["node_selector"] = d.merge_node_selector(selector)
    if idle:
        spec_fields["idle_timeout_seconds"] = float(idle)
    volumes = options.get("volumes")
    if volumes is not None or d.volumes:
        spec_fields["mounts"] = d.merge_volumes(volumes)
    layer = check_writable_layer(options.get("writable_layer"))
    if layer:
        spec_fields["writable_layer"] = layer
    snapshot = options.get("snapshot")
    if snapshot is not None:
        spec_fields["snapshot_id"] = snapshot_id_of(snapshot)
    secrets = options.get("secrets")
    if secrets is not None or d.secrets:
        spec_fields["secrets"] = secret_names([*d.secrets, *secret_names(secrets)])
    spec = pb.SandboxSpec(**spec_fields)
    if spec.writable_layer == "" and d.writable_layer:
        spec.writable_layer = d.writable_layer
    resources = options.get("resources")
    res = _defaults.resources_to_proto(resources if resources is not None else d.resources)
    if res is not None:
        spec.resources.CopyFrom(res)
    pull = coerce_pull_credentials(options.get("image_pull_credentials"))
    return ResolvedSandbox(
        spec=spec,
        base_url=_defaults.resolve_base_url(options.get("base_url"), d.base_url),
        request_timeout_seconds=float(
            options.get("request_timeout_seconds") or d.request_timeout_seconds
        ),
        pull_credentials=pull or d.image_pull_credentials,
        request_id=str(uuid.uuid4()),
    )
