"""SandboxDefaults, NetworkOptions, option conversion and environment configuration (no service)."""

from __future__ import annotations

import dataclasses

import pytest

from aviato import (
    EgressRule,
    NetworkOptions,
    Sandbox,
    SandboxDefaults,
    SandboxValidationError,
    Serialization,
    Session,
    _defaults,
)
from aviato._options import SandboxArgs
from aviato.v1 import sandbox_pb2 as pb


def test_defaults_are_frozen_and_documented_values() -> None:
    d = SandboxDefaults()
    assert d.container_image is None and d.command is None and d.args == ()
    assert d.base_url is None and d.request_timeout_seconds == 300.0
    assert d.temp_dir == "/tmp" and d.tags == () and d.environment_variables == {}
    with pytest.raises(dataclasses.FrozenInstanceError):
        d.tags = ("x",)  # type: ignore[misc]


def test_merge_rules() -> None:
    d = SandboxDefaults(tags=["a", "b"], environment_variables={"X": "1", "Y": "2"})
    assert d.tags == ("a", "b")
    assert d.merge_tags(["b", "c"]) == ["a", "b", "b", "c"]  # concatenated, not de-duplicated
    assert d.merge_environment_variables({"Y": "3", "Z": "4"}) == {"X": "1", "Y": "3", "Z": "4"}
    assert d.merge_tags(None) == ["a", "b"]
    e = d.with_overrides(request_timeout_seconds=5)
    assert e.request_timeout_seconds == 5 and e.tags == d.tags and d.request_timeout_seconds == 300


def test_bare_string_tags_are_rejected() -> None:
    with pytest.raises(TypeError, match="bare string"):
        SandboxDefaults(tags="oops")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        Sandbox(tags="oops")  # type: ignore[arg-type]


def test_from_dict() -> None:
    d = SandboxDefaults.from_dict({"tags": ["t"], "max_lifetime_seconds": 60})
    assert d.tags == ("t",) and d.max_lifetime_seconds == 60
    with pytest.raises(TypeError, match="unknown"):
        SandboxDefaults.from_dict({"runway_ids": ["x"]})


def test_sandbox_spec_merges_defaults_and_explicit_values() -> None:
    d = SandboxDefaults(
        container_image="img:1",
        tags=("team",),
        environment_variables={"A": "1", "B": "1"},
        max_lifetime_seconds=120,
        resources={"cpu": "500m"},
        working_dir="/work",
    )
    sb = Sandbox(
        defaults=d,
        command="python",
        args=["-c", "pass"],
        tags=["job"],
        environment_variables={"B": "2"},
        resources={"memory": 256 * 1024 * 1024, "pids": 64},
    )
    spec = sb._spec
    assert spec.image == "img:1"
    assert list(spec.command) == ["python", "-c", "pass"]
    assert list(spec.tags) == ["team", "job"]
    assert dict(spec.env) == {"A": "1", "B": "2"}
    assert spec.max_lifetime_seconds == 120
    assert spec.working_dir == "/work"
    assert spec.resources.memory == str(256 * 1024 * 1024) and spec.resources.pids == 64
    assert spec.resources.cpu == ""  # explicit resources replace the default dict
    assert spec.network == "" and spec.egress_mode == "" and not spec.egress
    assert sb.sandbox_id is None and sb.status is None  # nothing sent


def test_options_left_out_leave_the_spec_empty_and_given_ones_are_checked(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The spec holds only what is set (an option left out whose default is empty costs the
    create nothing); an option given, even empty, is still checked and merged."""
    monkeypatch.delenv("AVIATO_IMAGE", raising=False)
    assert Sandbox()._spec == pb.SandboxSpec()
    assert Sandbox(tags=[], environment_variables={}, secrets=[], volumes={})._spec == (
        pb.SandboxSpec()
    )
    with pytest.raises(SandboxValidationError, match="secrets"):
        Sandbox(secrets="NAME")
    with pytest.raises(SandboxValidationError, match="mounted_files"):
        Sandbox(mounted_files=[{"path": "relative", "content": b""}])
    with pytest.raises(SandboxValidationError, match="writable_layer"):
        Sandbox(writable_layer="tape")
    d = SandboxDefaults(
        tags=("team",), secrets=("A_KEY",), node_selector={"zone": "a"}, idle_timeout_seconds=5
    )
    spec = Sandbox(defaults=d, secrets=["B_KEY"], image_command=True)._spec
    assert list(spec.tags) == ["team"] and list(spec.secrets) == ["A_KEY", "B_KEY"]
    assert dict(spec.node_selector) == {"zone": "a"} and spec.idle_timeout_seconds == 5
    assert spec.image_command and not spec.command


def test_default_command_is_the_keepalive_and_image_from_env(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("AVIATO_IMAGE", raising=False)
    sb = Sandbox()
    # no image is sent, so the service's default applies (docs/images.md); "host" by default
    assert list(sb._spec.command) == [] and sb._spec.image == ""
    assert sb.container_image == "host"
    monkeypatch.setenv("AVIATO_IMAGE", "python:3.11")
    assert Sandbox()._spec.image == "python:3.11"
    assert Sandbox(container_image="x")._spec.image == "x"
    assert Sandbox(defaults=SandboxDefaults(container_image="y"))._spec.image == "y"


def test_base_url_precedence(monkeypatch: pytest.MonkeyPatch) -> None:
    d = SandboxDefaults(base_url="http://defaults:1/")
    monkeypatch.delenv("AVIATO_BASE_URL", raising=False)
    assert _defaults.resolve_base_url(None, None) is None
    assert Sandbox(defaults=d)._base_url == "http://defaults:1"
    monkeypatch.setenv("AVIATO_BASE_URL", "http://env:2")
    assert Sandbox(defaults=d)._base_url == "http://env:2"  # env wins over defaults
    assert Sandbox(defaults=d, base_url="unix:///x.sock")._base_url == "unix:///x.sock"


def test_lease_ttl(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AVIATO_LEASE_TTL", raising=False)
    assert _defaults.lease_ttl_seconds() == 30
    monkeypatch.setenv("AVIATO_LEASE_TTL", "3")
    assert _defaults.lease_ttl_seconds() == 3
    assert Session(SandboxDefaults(lease_ttl_seconds=7))._lease_ttl == 7
    monkeypatch.setenv("AVIATO_LEASE_TTL", "0.1")
    assert _defaults.lease_ttl_seconds() == 1.0  # clamped to the service's minimum
    monkeypatch.setenv("AVIATO_LEASE_TTL", "soon")
    with pytest.raises(ValueError, match="AVIATO_LEASE_TTL"):
        _defaults.lease_ttl_seconds()


def test_mounted_files_accept_both_spellings() -> None:
    files = _defaults.mounted_files_to_proto(
        [
            {"path": "/etc/a.txt", "content": "text"},
            {"mount_path": "/etc/b.bin", "file_content": b"\x00\x01"},
        ]
    )
    assert files == [
        pb.MountedFile(path="/etc/a.txt", content=b"text"),
        pb.MountedFile(path="/etc/b.bin", content=b"\x00\x01"),
    ]
    with pytest.raises(SandboxValidationError, match="absolute"):
        _defaults.mounted_files_to_proto([{"path": "rel", "content": ""}])


def test_resources_conversion() -> None:
    r = _defaults.resources_to_proto({"cpu": 0.5, "memory": "256Mi", "pids": "100", "disk": 10**9})
    assert r == pb.Resources(cpu="0.5", memory="256Mi", pids=100, disk="1000000000")
    assert _defaults.resources_to_proto({"cpu": 2}) == pb.Resources(cpu="2")
    assert _defaults.resources_to_proto(None) is None
    with pytest.raises(SandboxValidationError, match="gpu"):
        _defaults.resources_to_proto({"gpu": "1"})
    with pytest.raises(ValueError):  # SandboxValidationError is a ValueError
        Sandbox(resources={"pids": "many"})


def test_network_options() -> None:
    assert NetworkOptions().to_spec_egress() == ("", [])
    assert NetworkOptions(egress_mode="isolated").to_spec_egress() == ("isolated", [])
    assert NetworkOptions(deny_egress=True).to_spec_egress() == ("isolated", [])
    assert Sandbox(network={"egress_mode": "none"})._spec.egress_mode == "isolated"
    spec = Sandbox(network=NetworkOptions(egress_mode="internet"))._spec
    assert spec.egress_mode == "internet" and not spec.egress
    rules = [EgressRule(dns_name="pypi.org"), {"cidr": "10.8.0.0/16"}]
    spec = Sandbox(network={"egress": rules})._spec
    assert spec.egress_mode == "" and [r.WhichOneof("target") for r in spec.egress] == [
        "dns_name",
        "cidr",
    ]
    for bad in (
        NetworkOptions(egress_mode="org"),
        NetworkOptions(deny_egress=True, egress=[EgressRule(dns_name="a.b")]),
        NetworkOptions(egress_mode="isolated", egress=[EgressRule(dns_name="a.b")]),
        NetworkOptions(egress_mode="allowlist"),
    ):
        with pytest.raises(SandboxValidationError, match="network: "):
            Sandbox(network=bad)
    with pytest.raises(ValueError, match="exactly one of dns_name and cidr"):
        EgressRule()
    with pytest.raises(ValueError, match="exactly one of dns_name and cidr"):
        EgressRule(dns_name="a", cidr="10.0.0.0/8")
    with pytest.raises(TypeError, match=r"network\.egress must be a list"):
        NetworkOptions(egress=EgressRule(dns_name="a"))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"network\.deny_egress"):
        NetworkOptions(deny_egress="yes")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        Sandbox(network=NetworkOptions(ingress_mode="world", exposed_ports=[8080]))
    # the original SDK's names are served as the local ingress
    assert Sandbox(network=NetworkOptions(ingress_mode="public", exposed_ports=[8080]))._spec
    with pytest.raises(TypeError):
        Sandbox(network="internet")  # type: ignore[arg-type]
    assert NetworkOptions(exposed_ports=[]).exposed_ports is None


def test_serialization_enum() -> None:
    assert Serialization("json") is Serialization.JSON
    assert Serialization.PICKLE == "pickle"


def test_constructor_validation() -> None:
    with pytest.raises(ValueError, match="absolute"):
        Sandbox(working_dir="relative")
    with pytest.raises(ValueError):
        Sandbox(args=["x"])  # args without a command
    with pytest.raises(ValueError):
        Sandbox().stop(snapshot_on_stop=True)


def test_image_command_merge_rules() -> None:
    def spec(sandbox: Sandbox) -> tuple[list[str], bool]:
        return list(sandbox._spec.command), sandbox._spec.image_command

    assert spec(Sandbox()) == ([], False)
    assert spec(Sandbox(image_command=True)) == ([], True)
    with pytest.raises(SandboxValidationError, match="image_command=True runs the image's"):
        Sandbox(command="echo", image_command=True)
    with pytest.raises(SandboxValidationError, match="not both"):
        SandboxDefaults(command="echo", image_command=True)
    with pytest.raises(TypeError, match="image_command must be"):
        Sandbox(image_command="yes")  # type: ignore[arg-type]
    # the call's choice of main process wins over the defaults'
    image_default = SandboxDefaults(image_command=True)
    assert spec(Sandbox(defaults=image_default)) == ([], True)
    assert spec(Sandbox(defaults=image_default, command="echo")) == (["echo"], False)
    assert spec(Sandbox(defaults=image_default, image_command=False)) == ([], False)
    command_default = SandboxDefaults(command="sleep", args=("9",))
    assert spec(Sandbox(defaults=command_default)) == (["sleep", "9"], False)
    assert spec(Sandbox(defaults=command_default, image_command=True)) == ([], True)


def test_image_pull_credentials_shape_and_secrecy() -> None:
    from aviato import ImagePullCredentials

    creds = ImagePullCredentials(username="bob", password="hunter2")
    assert repr(creds) == str(creds) == "ImagePullCredentials(username='bob', password='***')"
    assert repr(ImagePullCredentials(token="tok")) == "ImagePullCredentials(token='***')"
    with pytest.raises(dataclasses.FrozenInstanceError):
        creds.password = "x"  # type: ignore[misc]
    d = SandboxDefaults(image_pull_credentials={"username": "bob", "password": "hunter2"})
    assert d.image_pull_credentials == creds and "hunter2" not in repr(d)
    assert SandboxDefaults.from_dict({"image_pull_credentials": {"token": "t"}}) == (
        SandboxDefaults(image_pull_credentials=ImagePullCredentials(token="t"))
    )
    # explicit > defaults; never in the sandbox's spec (only on the wire, at create)
    sb = Sandbox(defaults=d)
    assert sb._pull_credentials == creds and not sb._spec.HasField("registry_auth")
    token = ImagePullCredentials(token="t2")
    assert Sandbox(defaults=d, image_pull_credentials=token)._pull_credentials == token
    assert Sandbox(image_pull_credentials={"token": "t3"})._pull_credentials == (
        ImagePullCredentials(token="t3")
    )
    errors = [
        ({"username": "bob"}, "image_pull_credentials.password: required with a username"),
        ({"password": "x"}, "image_pull_credentials.username: required with a password"),
        ({"token": "t", "password": "x"}, "either a token or a username and password"),
        ({}, "image_pull_credentials: empty"),
        ({"username": "a:b", "password": "x"}, "username: must not contain ':'"),
        ({"username": "bob", "password": "x\ny"}, "password: contains NUL or a line break"),
        ({"login": "bob"}, r"unknown keys \['login'\]"),
    ]
    for value, message in errors:
        with pytest.raises(SandboxValidationError, match=message):
            Sandbox(image_pull_credentials=value)
    with pytest.raises(TypeError, match=r"image_pull_credentials\.password must be a string"):
        ImagePullCredentials(username="bob", password=b"x")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="must be ImagePullCredentials, a dict or None"):
        Sandbox(image_pull_credentials=("bob", "x"))  # type: ignore[arg-type]


def test_node_selector_merge_and_validation() -> None:
    d = SandboxDefaults(node_selector={"pool": "cpu", "zone": "a"})
    assert d.node_selector == {"pool": "cpu", "zone": "a"}
    sb = Sandbox(defaults=d, node_selector={"pool": "gpu"})
    assert dict(sb._spec.node_selector) == {"pool": "gpu", "zone": "a"}  # explicit labels win
    assert sb.node_selector == {"pool": "gpu", "zone": "a"}
    assert Sandbox().node_selector == {} and dict(Sandbox()._spec.node_selector) == {}
    assert SandboxDefaults.from_dict({"node_selector": {"k": "v"}}).node_selector == {"k": "v"}
    with pytest.raises(TypeError, match="node_selector must be a mapping"):
        Sandbox(node_selector="pool=gpu")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="node_selector: labels and values must be strings"):
        Sandbox(node_selector={"gpus": 1})  # type: ignore[dict-item]
    with pytest.raises(SandboxValidationError, match="node_selector: a label name is empty"):
        SandboxDefaults(node_selector={"": "x"})


def test_every_sandbox_option_has_its_default_field() -> None:
    """The options are declared once (`aviato._options`); `SandboxDefaults` holds a default for
    each, so that a new option cannot be forgotten there (mounted files and the snapshot to
    start from have none)."""
    fields = {f.name for f in dataclasses.fields(SandboxDefaults)}
    assert SandboxArgs.__optional_keys__ - {"mounted_files", "snapshot"} <= fields
