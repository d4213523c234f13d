"""The node protocol's codec carries every field of the runtime's model (pure; no cluster).

Each model dataclass is filled with a value that differs from its default in every field,
derived from the field's type, then sent through the codec and serialized bytes. A field the
codec does not carry comes back as its default and fails the comparison; a field of a type this
test does not know fails too, asking for a value (and, if runtime/model_codec.py cannot convert
that type, for a case there). SandboxConfig and ExecSpec travel as model payloads, so a field
added to them needs nothing in the cluster: a variant of the model with one more field crosses
unchanged.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from collections.abc import Callable
from typing import Any

import pytest

from aviato.cluster import codec
from aviato.egress.gateway import EgressUsage
from aviato.node.v1 import node_pb2 as npb
from aviato.runtime import model_codec
from aviato.runtime.base import (
    ExecExit,
    ExecFailed,
    ExecOutput,
    ExecSpec,
    FileInfo,
    ImageInfo,
    ImagePullProgress,
    LogRecord,
    MainExit,
    RegistryCredentials,
    SandboxConfig,
)
from aviato.runtime.model import DirectoryMount, EgressPolicy, EgressRule

# A value unlike any default, per annotated type (as the dataclasses spell them).
_VALUES: dict[Any, Callable[[str], Any]] = {
    str: lambda name: f"{name}-value",
    int: lambda name: 100_000 + len(name),
    float: lambda name: 2.5 + len(name),
    bool: lambda name: True,
    bytes: lambda name: b"\x00\xff" + name.encode(),
    int | None: lambda name: 0,  # a limit of zero is not "no limit"
    tuple[str, ...]: lambda name: (f"{name}-a", "", f"{name}-b"),
    tuple[int, ...]: lambda name: (8080, 1, 65535),
    dict[str, str]: lambda name: {f"{name}-k": "v", "EMPTY": ""},
    tuple[tuple[str, bytes], ...]: lambda name: (("/a", b"\x00one"), ("/b", b"")),
    tuple[tuple[str, str], ...]: lambda name: (("zone", "b"), ("aviato.node", "n1")),
    RegistryCredentials | None: lambda name: RegistryCredentials("user", "secret", "tok"),
    frozenset[str]: lambda name: frozenset({"memory", "pids"}),
    tuple[DirectoryMount, ...]: lambda name: (
        DirectoryMount("/cache", volume="cache", source="/s/volumes/k/cache"),
        DirectoryMount("/d", host_path="/data/d", read_only=True, source="/data/real"),
    ),
    EgressPolicy: lambda name: EgressPolicy(
        internet=True, rules=(EgressRule(dns_name="*.pypi.org"), EgressRule(cidr="10.8.0.0/16"))
    ),
}


def _filled(cls: type[Any], **fixed: Any) -> Any:
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for field in dataclasses.fields(cls):
        if field.name in fixed:
            values[field.name] = fixed[field.name]
            continue
        make = _VALUES.get(hints[field.name])
        if make is None:
            pytest.fail(
                f"{cls.__name__}.{field.name}: a field of type {hints[field.name]} this test has "
                "no value for; add one here (and teach aviato/runtime/model_codec.py the type if "
                "it cannot convert it)"
            )
        values[field.name] = make(field.name)
        default = field.default
        if default is dataclasses.MISSING and field.default_factory is not dataclasses.MISSING:
            default = field.default_factory()
        assert values[field.name] != default, f"{cls.__name__}.{field.name}: pick another value"
    return cls(**values)


def _through_bytes(message: Any) -> Any:
    return type(message).FromString(message.SerializeToString())


CASES: list[tuple[Any, Callable[[Any], Any], Callable[[Any], Any]]] = [
    (_filled(SandboxConfig), codec.encode_config, codec.decode_config),
    (_filled(ExecSpec), codec.encode_spec, codec.decode_spec),
    (_filled(MainExit), codec.encode_main_exit, codec.decode_main_exit),
    (_filled(FileInfo), codec.encode_file_info, codec.decode_file_info),
    (_filled(LogRecord), codec.encode_record, codec.decode_record),
    (_filled(ImageInfo), codec.encode_image, codec.decode_image),
    (_filled(ImagePullProgress), codec.encode_progress, codec.decode_progress),
    (_filled(RegistryCredentials), codec.encode_credentials, codec.decode_credentials),
    (_filled(ExecOutput), codec.encode_event, codec.decode_event),
    (_filled(ExecExit), codec.encode_event, codec.decode_event),
    (_filled(ExecFailed), codec.encode_event, codec.decode_event),
    (_filled(EgressUsage), codec.encode_egress_usage, codec.decode_egress_usage),
    (
        _filled(EgressPolicy, rules=(EgressRule(dns_name="*.pypi.org"), EgressRule(cidr="::/0"))),
        codec.encode_policy,
        codec.decode_policy,
    ),
]


@pytest.mark.parametrize("model,encode,decode", CASES, ids=lambda c: type(c).__name__)
def test_every_field_survives_the_node_protocol(
    model: Any, encode: Callable[[Any], Any], decode: Callable[[Any], Any]
) -> None:
    assert decode(_through_bytes(encode(model))) == model


def test_no_cpu_limit_stays_no_limit() -> None:
    """cpu_millis None (no cpu limit) is not 0; the other limits are always resolved."""
    config = SandboxConfig(
        sandbox_id="s", image="", command=(), env={}, working_dir="", registry_credentials=None
    )
    back = codec.decode_config(_through_bytes(codec.encode_config(config)))
    assert back == config
    assert back.cpu_millis is None
    assert back.registry_credentials is None


def test_an_unknown_event_is_ignored() -> None:
    assert codec.decode_event(npb.ExecEvent()) is None


def test_the_version_is_the_protos() -> None:
    assert codec.VERSION == npb.VERSION_CURRENT >= 1


def test_a_node_host_of_another_version_is_refused_with_the_reason() -> None:
    codec.check_version(codec.VERSION, "n" * 40)
    for reported in (codec.VERSION + 1, None, "1"):
        with pytest.raises(codec.ProtocolMismatch) as info:
            codec.check_version(reported, "abcdef123456" + "0" * 28)
        message = str(info.value)
        assert "abcdef123456" in message and f"version {codec.VERSION}" in message
        assert "same aviato release" in message


def test_a_field_added_to_the_model_needs_no_cluster_change() -> None:
    """The config and spec payloads are derived from the dataclass: a variant of each with an
    extra field (as a release that adds one would have) crosses the node protocol whole."""
    for model, limit in (
        (SandboxConfig, codec.MAX_CONFIG_PAYLOAD),
        (ExecSpec, codec.MAX_SPEC_PAYLOAD),
    ):
        grown = dataclasses.make_dataclass(
            f"Grown{model.__name__}",
            [
                ("gpu_slices", tuple[tuple[str, bytes], ...], dataclasses.field(default=())),
                ("deadline_ns", int | None, dataclasses.field(default=None)),
            ],
            bases=(model,),
            frozen=True,
        )
        value = _filled(grown, gpu_slices=(("a100", b"\x01"),), deadline_ns=7)
        payload = codec.encode_model(value)
        assert json.loads(payload)["gpu_slices"] == [["a100", "AQ=="]]
        assert codec.decode_model(grown, payload, limit) == value


def test_a_payload_of_another_release_is_refused_naming_the_fields() -> None:
    """A node host reading a config with a field it does not know (or without one it needs)
    refuses it rather than dropping the field or running with a default."""
    config = _filled(SandboxConfig)
    plain = json.loads(codec.encode_model(config))
    for changed in ({**plain, "gpu_slices": []}, {k: v for k, v in plain.items() if k != "pids"}):
        message = npb.SandboxConfig(model=json.dumps(changed).encode())
        with pytest.raises(codec.BadModelPayload) as info:
            codec.decode_config(message)
        assert "gpu_slices" in str(info.value) or "pids" in str(info.value)
        assert "same aviato release" in str(info.value)
        assert info.value.code == "INTERNAL"


@pytest.mark.parametrize(
    "field,value",
    [
        ("pids", "1024"),  # a string is not coerced to a number
        ("pids", True),
        ("image_command", 1),
        ("mounted_files", [["/a", "not base64!"]]),
        ("mounted_files", [["/a"]]),
        ("env", ["A", "b"]),
        ("registry_credentials", "user:secret"),
    ],
)
def test_a_payload_value_of_the_wrong_kind_is_refused(field: str, value: object) -> None:
    plain = json.loads(codec.encode_model(_filled(SandboxConfig)))
    message = npb.SandboxConfig(model=json.dumps({**plain, field: value}).encode())
    with pytest.raises(codec.BadModelPayload, match="cannot read"):
        codec.decode_config(message)


def test_a_payload_over_the_limit_is_refused_before_it_is_read() -> None:
    too_big = b"[" * (codec.MAX_SPEC_PAYLOAD + 1)  # would nest past any recursion limit
    with pytest.raises(codec.BadModelPayload, match="over the node protocol's limit"):
        codec.decode_spec(npb.ExecSpec(model=too_big))
    with pytest.raises(codec.BadModelPayload, match="cannot read"):
        codec.decode_spec(npb.ExecSpec(model=b"\xff"))


def test_the_largest_valid_requests_fit_the_limits() -> None:
    """What validation lets through (server/validation.py) fits: mounted files of 16 MiB, and
    argv and env of 1 MiB each, all control characters (six bytes each in JSON)."""
    mib = 1 << 20
    config = SandboxConfig(
        sandbox_id="s",
        image="i",
        command=("\x01" * (mib - 2),),
        env={"K": "\x01" * (mib - 4)},
        working_dir="/",
        mounted_files=tuple((f"/f{i}", b"\xff" * mib) for i in range(16)),
    )
    spec = ExecSpec(argv=("\x01" * (mib - 2),), env={"K": "\x01" * (mib - 4)})
    assert len(codec.encode_config(config).model) <= codec.MAX_CONFIG_PAYLOAD
    assert len(codec.encode_spec(spec).model) <= codec.MAX_SPEC_PAYLOAD
    assert codec.decode_spec(codec.encode_spec(spec)) == spec


def test_a_value_of_a_kind_without_a_plain_form_is_refused() -> None:
    with pytest.raises(TypeError, match="type set, which has no plain form"):
        model_codec.to_plain({"k": {1, 2}})
    with pytest.raises(TypeError, match="no plain form"):
        model_codec.from_plain(set[int], [1])
