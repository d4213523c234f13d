"""The one codec between the public protocol (`aviato.v1`) and the service's model.

Decoding validates as it goes (`validation` checks each value and resolves each default) and
yields the model: `decode_spec` a `SandboxSpec` into a `ValidSpec` (a `SandboxConfig` with
every default resolved, tags, lifetime), `decode_exec_init` an `ExecInit` into an `ExecSpec`.
Encoding answers from the model: `encode_sandbox` a `SandboxRecord` for Get/List/Create/Wait/
Stop, `encode_exit` and friends the frames of an exec.

Only the API servicers and this module touch `aviato.v1` messages in the service. A new spec
field is read in `decode_spec` and written back in `_encode_spec`, beside its siblings.

Statuses: the registry's `SandboxStatus` and the proto's `SandboxStatus` are mapped here
explicitly (`STATUS_TO_PROTO`); nothing relies on the two enums having equal integers.

What the codec cannot give back: what a request left to the defaults. An answer's spec shows
the resolved values (e.g. `resources.memory` "1Gi" for a sandbox that asked for no memory),
never mounted file contents, never registry credentials, never a secret's value.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from typing import Any

from aviato.runtime.base import ExecExit, ExecOutput
from aviato.runtime.model import (
    DEFAULT_DISK_BYTES,
    DEFAULT_MEMORY_BYTES,
    DEFAULT_PIDS,
    EgressPolicy,
    ExecSpec,
    SandboxConfig,
)
from aviato.server import validation
from aviato.server.errors import InvalidArgument
from aviato.server.records import SandboxRecord, SandboxStatus, SnapshotRecord, ValidSpec
from aviato.server.secret_store import SecretInfo, validate_secret_names
from aviato.server.validation import SpecDefaults
from aviato.server.volumes import VolumeInfo, validate_mounts
from aviato.v1 import quantities
from aviato.v1 import sandbox_pb2 as pb

__all__ = [
    "STATUS_TO_PROTO",
    "SpecDecoder",
    "decode_exec_init",
    "decode_resize",
    "decode_spec",
    "decode_statuses",
    "decode_stored_spec",
    "default_config",
    "encode_exit",
    "encode_lease",
    "encode_output",
    "encode_sandbox",
    "encode_secret",
    "encode_snapshot",
    "encode_volume",
]

STATUS_TO_PROTO: dict[SandboxStatus, pb.SandboxStatus] = {
    SandboxStatus.PENDING: pb.SANDBOX_STATUS_PENDING,
    SandboxStatus.CREATING: pb.SANDBOX_STATUS_CREATING,
    SandboxStatus.RUNNING: pb.SANDBOX_STATUS_RUNNING,
    SandboxStatus.COMPLETED: pb.SANDBOX_STATUS_COMPLETED,
    SandboxStatus.FAILED: pb.SANDBOX_STATUS_FAILED,
    SandboxStatus.TERMINATED: pb.SANDBOX_STATUS_TERMINATED,
    SandboxStatus.PAUSED: pb.SANDBOX_STATUS_PAUSED,
}
_STATUS_FROM_PROTO = {wire: status for status, wire in STATUS_TO_PROTO.items()}


# -- requests -> model ------------------------------------------------------------------------


def default_config(defaults: SpecDefaults) -> SandboxConfig:
    """What a create that asks for nothing validates to (the warm pool's shape)."""
    return decode_spec(pb.SandboxSpec(), defaults).config


class SpecDecoder:
    """`decode_spec` with the service's defaults, remembering its answers for the few small
    specs that creates send again and again (`Sandbox.run()`'s, a harness's): a spec is known by
    its wire bytes (deterministic), at most `size` of them, each at most `max_bytes` (a spec
    with mounted files' contents is decoded each time). `decode_spec` is a function of the
    spec and the defaults alone (it reads no state), and nothing changes its answer in place
    (a frozen model), so a remembered answer is the one decoding would give; an invalid spec
    raises each time."""

    def __init__(self, defaults: SpecDefaults, size: int = 32, max_bytes: int = 2048) -> None:
        self.defaults = defaults
        self._size = size
        self._max_bytes = max_bytes
        self._known: OrderedDict[bytes, ValidSpec] = OrderedDict()

    def decode(self, spec: pb.SandboxSpec) -> ValidSpec:
        key = spec.SerializeToString(deterministic=True)
        if len(key) > self._max_bytes:
            return decode_spec(spec, self.defaults)
        known = self._known.get(key)
        if known is not None:
            self._known.move_to_end(key)
            return known
        valid = decode_spec(spec, self.defaults)
        self._known[key] = valid
        if len(self._known) > self._size:
            self._known.popitem(last=False)
        return valid


def decode_spec(spec: pb.SandboxSpec, defaults: SpecDefaults) -> ValidSpec:
    """Validates every field of `spec` (the first invalid one raises InvalidArgument) and
    resolves every default: an empty image is `defaults.image`, and so on."""
    image = validation.validate_image(spec.image, defaults.image)
    command = validation.validate_argv(spec.command, "spec.command", allow_empty=True)
    credentials = validation.validate_registry_auth(spec.registry_auth, "spec.registry_auth")
    image_command = validation.validate_image_command(spec.image_command, image, command)
    env = validation.validate_env(spec.env, "spec.env")
    working_dir = validation.validate_path(spec.working_dir, "spec.working_dir", allow_empty=True)
    tags = validation.validate_tags(spec.tags, "spec.tags")
    node_selector = validation.validate_node_selector(spec.node_selector, "spec.node_selector")
    res = spec.resources
    limits = validation.validate_resources(
        res.cpu, res.memory, res.pids, res.disk, defaults, "spec.resources"
    )
    lifetime = validation.validate_lifetime(
        spec.max_lifetime_seconds, defaults, "spec.max_lifetime_seconds"
    )
    mounted = validation.validate_mounted_files(
        ((item.path, item.content) for item in spec.mounted_files), "spec.mounted_files"
    )
    validation.validate_network(spec.network, "spec.network")
    egress = decode_egress(spec.egress_mode, spec.egress, "spec.egress_mode", "spec.egress")
    exposed_ports = validation.validate_exposed_ports(spec.exposed_ports, "spec.exposed_ports")
    idle_timeout = validation.validate_finite(
        spec.idle_timeout_seconds, "spec.idle_timeout_seconds", 0.0, validation.MAX_LIFETIME_SECONDS
    )
    mounts = validate_mounts(
        ((m.path, m.volume, m.host_path, m.read_only, m.size_bytes) for m in spec.mounts),
        "spec.mounts",
    )
    writable_layer = validation.validate_choice(
        spec.writable_layer, "spec.writable_layer", ("memory", "disk"), defaults.writable_layer
    )
    snapshot_id = validation.validate_snapshot_id(spec.snapshot_id, "spec.snapshot_id")
    secrets = validate_secret_names(list(spec.secrets), env, "spec.secrets")
    config = SandboxConfig(
        sandbox_id="",
        image=image,
        command=command,
        env=env,
        working_dir=working_dir,
        cpu_millis=limits.cpu_millis,
        memory_bytes=limits.memory_bytes,
        pids=limits.pids,
        disk_bytes=limits.disk_bytes,
        asked_limits=limits.asked,
        mounted_files=mounted,
        egress=egress,
        exposed_ports=exposed_ports,
        registry_credentials=credentials,
        image_command=image_command,
        node_selector=node_selector,
        idle_timeout_seconds=idle_timeout,
        mounts=mounts,
        writable_layer=writable_layer,
        snapshot_id=snapshot_id,
        secrets=secrets,
    )
    return ValidSpec(config=config, tags=tags, max_lifetime_seconds=lifetime)


def decode_egress(
    mode: str, rules: Iterable[pb.EgressRule], mode_field: str, rules_field: str
) -> EgressPolicy:
    """An egress mode and rules of a request (a create's spec or a SetNetwork) as the model."""
    # a oneof: the field that is not set reads as ""
    pairs = [(rule.WhichOneof("target") or "", rule.dns_name or rule.cidr) for rule in rules]
    return validation.validate_egress(mode, pairs, mode_field, rules_field)


def decode_exec_init(init: pb.ExecInit) -> ExecSpec:
    """The ExecSpec of an ExecInit (the sandbox id and `input` are the caller's)."""
    argv = validation.validate_argv(init.argv, "init.argv", allow_empty=False)
    cwd = validation.validate_path(init.cwd, "init.cwd", allow_empty=True)
    env = validation.validate_env(init.env, "init.env")
    timeout = validation.validate_finite(
        init.timeout_seconds, "init.timeout_seconds", 0.0, validation.MAX_EXEC_TIMEOUT_SECONDS
    )
    protected = validation.validate_protected(init.protected, init.tty)
    rows, cols = 24, 80
    if init.HasField("tty_size"):
        rows, cols = validation.validate_terminal_size(
            init.tty_size.rows, init.tty_size.cols, "init.tty_size"
        )
    return ExecSpec(
        argv=argv,
        cwd=cwd,
        env=env,
        timeout_seconds=timeout,
        stdin=init.stdin,
        tty=init.tty,
        rows=rows,
        cols=cols,
        protected=protected,
    )


def decode_resize(size: pb.TerminalSize, field: str) -> tuple[int, int]:
    """(rows, cols) of a resize frame; 0 keeps the default 24 rows or 80 columns."""
    return validation.validate_terminal_size(size.rows, size.cols, field)


def decode_statuses(values: Iterable[int], field: str) -> list[SandboxStatus]:
    result: list[SandboxStatus] = []
    for i, value in enumerate(values):
        status = _STATUS_FROM_PROTO.get(value)  # type: ignore[call-overload]
        if status is None:
            raise InvalidArgument(f"{field}[{i}]", f"{value} is not a sandbox status")
        result.append(status)
    return result


def decode_stored_spec(
    blob: bytes, created_ns: int, expires_ns: int | None
) -> tuple[SandboxConfig, tuple[str, ...], float]:
    """(config, tags, lifetime) of a spec that a registry before schema 3 stored as wire bytes.

    Those specs were validated when stored; what they left out gets the platform's defaults
    (the sandbox got those), and their lifetime is read off the recorded deadline. A blob that
    does not parse gives a config of the "host" image, so that the record stays readable.
    """
    try:
        spec = pb.SandboxSpec.FromString(blob)
    except Exception:
        spec = pb.SandboxSpec(image="host")
    res = spec.resources
    asked: set[str] = set()

    def parse(name: str, text: str) -> int | None:
        if not text:
            return None
        try:
            value = (
                quantities.parse_cpu_millis(text) if name == "cpu" else quantities.parse_bytes(text)
            )
        except quantities.QuantityError:
            return None
        asked.add(name)
        return value

    cpu = parse("cpu", res.cpu)
    memory = parse("memory", res.memory)
    disk = parse("disk", res.disk)
    if res.pids > 0:
        asked.add("pids")
    lifetime = spec.max_lifetime_seconds
    if lifetime <= 0 and expires_ns is not None:
        lifetime = max(expires_ns - created_ns, 0) / 1e9
    config = SandboxConfig(
        sandbox_id="",
        image=spec.image or "host",
        command=tuple(spec.command),
        env=dict(sorted(spec.env.items())),
        working_dir=spec.working_dir,
        cpu_millis=cpu,
        memory_bytes=DEFAULT_MEMORY_BYTES if memory is None else memory,
        pids=res.pids if res.pids > 0 else DEFAULT_PIDS,
        disk_bytes=DEFAULT_DISK_BYTES if disk is None else disk,
        asked_limits=frozenset(asked),
        mounted_files=tuple((m.path, b"") for m in spec.mounted_files),
        image_command=spec.image_command,
        node_selector=tuple(sorted(spec.node_selector.items())),
        writable_layer=spec.writable_layer or "memory",
        snapshot_id=spec.snapshot_id,
    )
    return config, tuple(spec.tags), lifetime


# -- model -> answers -------------------------------------------------------------------------


def _encode_spec(rec: SandboxRecord) -> pb.SandboxSpec:
    """The record's spec as answered: its resolved fields, only those set (an empty field is
    the unset one on the wire, and not filling it saves the answer's building)."""
    config = rec.config
    fields: dict[str, Any] = {
        "image": config.image,
        "resources": pb.Resources(
            cpu="" if config.cpu_millis is None else quantities.cpu_quantity(config.cpu_millis),
            memory=quantities.bytes_quantity(config.memory_bytes),
            pids=config.pids,
            disk=quantities.bytes_quantity(config.disk_bytes),
        ),
        "network": "none",
        "writable_layer": config.writable_layer,
    }
    if config.command:
        fields["command"] = config.command
    if config.env:
        fields["env"] = config.env
    if config.working_dir:
        fields["working_dir"] = config.working_dir
    if rec.tags:
        fields["tags"] = rec.tags
    if rec.max_lifetime_seconds:
        fields["max_lifetime_seconds"] = rec.max_lifetime_seconds
    if config.mounted_files:
        fields["mounted_files"] = [pb.MountedFile(path=path) for path, _ in config.mounted_files]
    egress = config.egress
    if egress.internet:
        fields["egress_mode"] = "internet"
    if egress.rules:
        fields["egress"] = [
            pb.EgressRule(dns_name=r.dns_name) if r.dns_name else pb.EgressRule(cidr=r.cidr)
            for r in egress.rules
        ]
    if config.exposed_ports:
        fields["exposed_ports"] = config.exposed_ports
    if config.node_selector:
        fields["node_selector"] = dict(config.node_selector)
    if config.image_command:
        fields["image_command"] = True
    if config.idle_timeout_seconds:
        fields["idle_timeout_seconds"] = config.idle_timeout_seconds
    if config.mounts:
        fields["mounts"] = [
            pb.DirectoryMount(
                path=m.path,
                volume=m.volume,
                host_path=m.host_path,
                read_only=m.read_only,
                size_bytes=m.size_bytes,
            )
            for m in config.mounts
        ]
    if config.snapshot_id:
        fields["snapshot_id"] = config.snapshot_id
    if config.secrets:
        fields["secrets"] = config.secrets
    return pb.SandboxSpec(**fields)


def encode_snapshot(snap: SnapshotRecord) -> pb.Snapshot:
    msg = pb.Snapshot(
        id=snap.id, source_sandbox_id=snap.source_sandbox_id, image=snap.image,
        size_bytes=snap.size_bytes, entries=snap.entries, skipped_entries=snap.skipped,
    )  # fmt: skip
    msg.created_at.FromNanoseconds(snap.created_ns)
    return msg


def encode_sandbox(rec: SandboxRecord) -> pb.Sandbox:
    """The answer of a record. Mounted files are listed without their content; the exposed
    ports' addresses only while the sandbox is RUNNING (none are served otherwise)."""
    msg = pb.Sandbox(
        id=rec.id,
        status=STATUS_TO_PROTO[rec.status],
        status_reason=rec.reason,
        lease_id=rec.lease_id,
        node=rec.node,
        spec=_encode_spec(rec),
    )
    if rec.status in (SandboxStatus.RUNNING, SandboxStatus.PAUSED):
        msg.exposed_ports.extend(
            pb.ExposedPort(port=port, address=address) for port, address in rec.port_addresses
        )
    usage = rec.network_usage
    msg.network_usage.CopyFrom(
        pb.NetworkUsage(
            bytes_sent=usage.bytes_sent,
            bytes_received=usage.bytes_received,
            connections=usage.connections,
            refused=usage.refused,
        )
    )
    if rec.exit_code is not None:
        msg.exit_code = rec.exit_code
    msg.created_at.FromNanoseconds(rec.created_ns)
    if rec.started_ns is not None:
        msg.started_at.FromNanoseconds(rec.started_ns)
    if rec.ended_ns is not None:
        msg.ended_at.FromNanoseconds(rec.ended_ns)
    if rec.expires_ns is not None:
        msg.expires_at.FromNanoseconds(rec.expires_ns)
    return msg


def encode_lease(lease_id: str, sandbox_count: int, expires_ns: int) -> pb.Lease:
    msg = pb.Lease(id=lease_id, sandbox_count=sandbox_count)
    msg.expires_at.FromNanoseconds(expires_ns)
    return msg


def encode_output(event: ExecOutput) -> pb.ExecResponse:
    return pb.ExecResponse(
        output=pb.ExecOutput(stream=event.stream, data=event.data)  # type: ignore[arg-type]
    )


def encode_exit(event: ExecExit) -> pb.ExecResponse:
    return pb.ExecResponse(
        exit=pb.ExecExit(
            exit_code=event.exit_code,
            signal=event.signal,
            timed_out=event.timed_out,
            oom_killed=event.oom_killed,
            usage=pb.ResourceUsage(
                cpu_user_seconds=event.cpu_user_seconds,
                cpu_system_seconds=event.cpu_system_seconds,
                peak_memory_bytes=event.peak_memory_bytes,
                wall_seconds=event.wall_seconds,
            ),
        )
    )


def encode_volume(volume: VolumeInfo) -> pb.Volume:
    """The answer of one of the caller's volumes (its host directory is never shown)."""
    msg = pb.Volume(
        name=volume.name,
        size_bytes=volume.size_bytes,
        max_size_bytes=volume.max_size_bytes,
        used_by=volume.used_by,
        node=volume.node,
        size_enforced=volume.size_enforced,
    )
    msg.created_at.FromNanoseconds(volume.created_ns)
    return msg


def encode_secret(secret: SecretInfo) -> pb.SecretInfo:
    """One of the caller's secrets: its name and times (a value is never sent back)."""
    msg = pb.SecretInfo(name=secret.name)
    msg.created_at.FromNanoseconds(secret.created_ns)
    msg.updated_at.FromNanoseconds(secret.updated_ns)
    return msg
