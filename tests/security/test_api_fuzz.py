"""Hostile input to every RPC, property-based, against a real service.

For each RPC, hypothesis generates malformed, oversized and odd values: NUL bytes, huge strings
and lists, negative, huge, NaN and infinite numbers, unknown enum values, paths with `..`,
absolute paths outside the sandbox, paths through symlinks planted inside the sandbox that point
at host files, and raw bytes that are not a valid message (including strings that are not
UTF-8, which no well-behaved client can even send). Every call must end in success (when the
input happens to be valid) or in INVALID_ARGUMENT, NOT_FOUND or PERMISSION_DENIED with a
message; never another code, never a crash. Afterwards the service still runs, its log has no
traceback, the host's canary file is untouched and nothing was written outside the sandbox.

One deliberate exception: a message larger than the transport's 8 MiB limit is refused by gRPC
itself with RESOURCE_EXHAUSTED ("Received message larger than max"), before any of the service's
code runs (test_messages_beyond_the_transport_limit).
"""

from __future__ import annotations

import math
import os
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import pytest
from hypothesis import HealthCheck, assume, currently_in_test_context, event, given, settings
from hypothesis import strategies as st
from reliability.harness import Service, code_of, details_of

from aviato.v1 import sandbox_pb2 as pb

OK_CODES = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.PERMISSION_DENIED,
}
# Exec reports failures in an ExecError frame with the numeric code.
OK_NUMBERS = {3, 5, 7}
SETTINGS = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
    database=None,
)
METHOD = "/aviato.v1.SandboxService/"


class Target:
    def __init__(self, svc: Service, sandbox_id: str, canary: Path) -> None:
        self.svc = svc
        self.sandbox_id = sandbox_id
        self.canary = canary
        self.canary_text = canary.read_bytes()
        self.created: list[str] = []

    @property
    def stub(self) -> Any:
        return self.svc.stub()


@pytest.fixture(scope="module")
def target() -> Iterator[Target]:
    svc = Service()
    try:
        svc.start()
        canary = svc.base / "host-canary.txt"
        canary.write_bytes(b"HOST-CANARY-" + os.urandom(8).hex().encode())
        c = svc.client()
        sb = c.running()
        # Symlinks planted inside the sandbox that point out of it (at host paths).
        script = (
            f"ln -s {canary} /workspace/to-canary; ln -s {canary.parent} /workspace/to-base; "
            "ln -s / /workspace/to-root; ln -s /proc/1/root /workspace/to-proc-root; "
            "ln -s ../../../../../.. /workspace/up; ln -s /etc/shadow /workspace/to-shadow; "
            f"mkdir -p /workspace{canary.parent}; ln -s /workspace/loop /workspace/loop"
        )
        assert c.sh(sb.id, script).exit_code == 0
        t = Target(svc, sb.id, canary)
        yield t
        assert svc.running(), f"the service died:\n{svc.log_tail()}"
        assert canary.read_bytes() == t.canary_text, "the host canary was changed"
        assert sorted(p.name for p in canary.parent.iterdir()) == sorted(
            ["host-canary.txt", "s", "t", "server.log"]
        ), "something was written next to the host canary"
        log = svc.log_text()
        assert "Traceback" not in log, log[log.index("Traceback") - 2000 :][:6000]
        assert "level=error" not in log, [ln for ln in log.splitlines() if "level=error" in ln]
    finally:
        svc.finish()


# --- strategies -------------------------------------------------------------------------------

SAFE_CHARS = st.characters(blacklist_categories=("Cs",))  # encodable as UTF-8
HOSTILE_TEXT = st.one_of(
    st.text(SAFE_CHARS, max_size=40),
    st.text(SAFE_CHARS, max_size=8).map(lambda s: s + "\x00" + s),
    st.sampled_from(
        [
            "",
            " ",
            "\x00",
            "..",
            "../..",
            "a" * 5000,
            "é" * 70000,
            "-1",
            "🙂",
            "%s%n",
            "$(id)",
            "`id`",
            "'; DROP TABLE sandboxes; --",
            "\n",
            "\t",
        ]
    ),
    st.integers(min_value=1, max_value=3).map(lambda k: "x" * (10 ** (k + 3))),
)
ID_TEXT = st.one_of(
    HOSTILE_TEXT,
    st.just("sbx-000000000000"),
    st.uuids().map(str),
    st.text("abcdef0123456789", min_size=12, max_size=12).map("sbx-".__add__),
)
DOUBLES = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(
        [
            0.0,
            -0.0,
            -1.0,
            1e308,
            -1e308,
            5e-324,
            math.nan,
            math.inf,
            -math.inf,
            1e9,
            7 * 24 * 3600.0 + 1,
        ]
    ),
)
INT64 = st.one_of(st.integers(-(2**63), 2**63 - 1), st.sampled_from([0, -1, 1, 2**31, 2**63 - 1]))
INT32 = st.integers(-(2**31), 2**31 - 1)
UINT32 = st.integers(0, 2**32 - 1)


def paths(target_canary: str) -> st.SearchStrategy[str]:
    return st.one_of(
        HOSTILE_TEXT,
        st.sampled_from(
            [
                "/",
                "/..",
                "/../..",
                "/workspace/../../etc/passwd",
                "/workspace/./x",
                "//etc//shadow",
                "/etc/shadow",
                "/proc/1/environ",
                "/proc/self/root/etc/passwd",
                "/proc/1/root/",
                "/proc/1/mem",
                "/proc/self/pagemap",
                "/proc/kcore",
                "/sys/kernel/notes",
                "/dev/zero",
                "/dev/null",
                "/dev/full",
                "/.aviato/supervisor",
                "/root/.bashrc",
                target_canary,
                "/workspace/to-canary",
                "/workspace/to-base/host-canary.txt",
                "/workspace/to-base/new-file",
                "/workspace/to-root" + target_canary,
                "/workspace/to-proc-root" + target_canary,
                "/workspace/up" + target_canary,
                "/workspace/to-shadow",
                "/workspace/loop",
                "/workspace/loop/x",
                "/workspace" + target_canary,
                "relative/path",
                "./x",
                "~/x",
                "/x\x00/y",
                "/" + "d/" * 3000,
                "/" + "n" * 300,
                "/proc/sys/kernel/core_pattern",
            ]
        ),
        st.lists(
            st.sampled_from(
                [
                    "..",
                    ".",
                    "workspace",
                    "etc",
                    "tmp",
                    "proc",
                    "1",
                    "root",
                    "to-root",
                    "to-base",
                    "",
                    "x",
                ]
            ),
            min_size=1,
            max_size=8,
        ).map(lambda parts: "/" + "/".join(parts)),
    )


def _event(text: str) -> None:
    if currently_in_test_context():
        event(text)


def _check_status(err: grpc.RpcError, what: str) -> None:
    code = code_of(err)
    _event(f"{what.split('(')[0].split(' ')[0]}: {code.name if code else code}")
    assert code in OK_CODES, f"{what}: {code} {details_of(err)!r}"
    msg = details_of(err)
    assert msg and "internal error" not in msg and "Traceback" not in msg, (what, msg)


def _unary(target: Target, name: str, request: Any) -> Any:
    try:
        reply = getattr(target.stub, name)(request, timeout=30)
        _event(f"{name}: OK")
        return reply
    except grpc.RpcError as e:
        _check_status(e, f"{name}({request!r:.300})")
        return None


# --- one property per RPC ---------------------------------------------------------------------


# Egress rules: real-looking names and networks beside hostile text, a rule with neither field.
EGRESS_RULES = st.one_of(
    st.builds(lambda n: pb.EgressRule(dns_name=n), HOSTILE_TEXT | st.sampled_from(
        ["pypi.org", "*.example.com", "*", "*.", "1.2.3.4", "a..b", "xn--", "ü.example"])),
    st.builds(lambda c: pb.EgressRule(cidr=c), HOSTILE_TEXT | st.sampled_from(
        ["10.0.0.0/8", "0.0.0.0/0", "127.0.0.1", "::/0", "::ffff:127.0.0.1/128", "1.2.3.4/33"])),
    st.just(pb.EgressRule()),
)  # fmt: skip


def maybe(strategy: st.SearchStrategy[Any], default: Any) -> st.SearchStrategy[Any]:
    """The default (a valid value) in about 2 of 3 draws: one hostile field at a time is
    more telling than a request where every field is wrong."""
    return st.one_of(st.just(default), st.just(default), strategy)


@pytest.mark.slow
@SETTINGS
@given(
    image=maybe(HOSTILE_TEXT, ""),
    command=maybe(st.lists(HOSTILE_TEXT, max_size=4), []),
    env=maybe(st.dictionaries(HOSTILE_TEXT, HOSTILE_TEXT, max_size=3), {}),
    workdir=maybe(HOSTILE_TEXT, ""),
    tags=maybe(st.lists(HOSTILE_TEXT, max_size=3), []),
    cpu=maybe(HOSTILE_TEXT, ""),
    memory=maybe(HOSTILE_TEXT, ""),
    disk=maybe(HOSTILE_TEXT, ""),
    pids=maybe(INT64, 0),
    lifetime=maybe(DOUBLES, 0.0),
    network=maybe(HOSTILE_TEXT, ""),
    egress_mode=maybe(st.sampled_from(["internet", "allowlist", "isolated"]) | HOSTILE_TEXT, ""),
    egress=maybe(st.lists(EGRESS_RULES, max_size=4), []),
    mounted=maybe(st.lists(st.tuples(HOSTILE_TEXT, st.binary(max_size=64)), max_size=2), []),
    request_id=maybe(HOSTILE_TEXT, "fuzz-request"),
    lease_id=maybe(HOSTILE_TEXT, ""),
    lease_ttl=maybe(DOUBLES, 0.0),
)
def test_create_sandbox(
    target: Target,
    image: str,
    command: list[str],
    env: dict[str, str],
    workdir: str,
    tags: list[str],
    cpu: str,
    memory: str,
    disk: str,
    pids: int,
    lifetime: float,
    network: str,
    egress_mode: str,
    egress: list[pb.EgressRule],
    mounted: list[tuple[str, bytes]],
    request_id: str,
    lease_id: str,
    lease_ttl: float,
) -> None:
    spec = pb.SandboxSpec(
        image=image,
        command=command,
        env=env,
        working_dir=workdir,
        tags=tags,
        max_lifetime_seconds=lifetime,
        network=network,
        egress_mode=egress_mode,
        egress=egress,
        resources=pb.Resources(cpu=cpu, memory=memory, pids=pids, disk=disk),
        mounted_files=[pb.MountedFile(path=p, content=c) for p, c in mounted],
    )
    if request_id == "fuzz-request":
        request_id = str(uuid.uuid4())
    req = pb.CreateSandboxRequest(
        spec=spec, request_id=request_id, lease_id=lease_id, lease_ttl_seconds=lease_ttl
    )
    sb = _unary(target, "CreateSandbox", req)
    if sb is not None:  # valid by chance: it is a real sandbox; remove it
        target.svc.client().delete(sb.id)


@SETTINGS
@given(
    name=maybe(HOSTILE_TEXT, "FUZZ_SECRET"),
    value=maybe(HOSTILE_TEXT, "v"),
    use=st.lists(maybe(HOSTILE_TEXT, "FUZZ_SECRET"), max_size=3),
)
def test_secrets(target: Target, name: str, value: str, use: list[str]) -> None:
    """Hostile names and values to CreateSecret and DeleteSecret, and as a create's secrets:
    a status in words, and no value ever repeated in an answer."""
    made = _unary(
        target, "CreateSecret", pb.CreateSecretRequest(name=name, value=value, replace=True)
    )
    listed = _unary(target, "ListSecrets", pb.ListSecretsRequest())
    if value and len(value) > 3:
        assert value not in str(made) and value not in str(listed)
    spec = pb.SandboxSpec(secrets=use)
    sb = _unary(
        target, "CreateSandbox", pb.CreateSandboxRequest(spec=spec, request_id=str(uuid.uuid4()))
    )
    if sb is not None:
        target.svc.client().delete(sb.id)
    _unary(target, "DeleteSecret", pb.DeleteSecretRequest(name=name))


@SETTINGS
@given(
    egress_mode=st.sampled_from(["internet", "allowlist", "isolated", ""]) | HOSTILE_TEXT,
    egress=st.lists(EGRESS_RULES, max_size=6),
    mine=maybe(st.booleans(), True),
    sandbox_id=ID_TEXT,
)
def test_set_network(
    target: Target, egress_mode: str, egress: list[pb.EgressRule], mine: bool, sandbox_id: str
) -> None:
    request = pb.SetNetworkRequest(
        sandbox_id=target.sandbox_id if mine else sandbox_id,
        egress_mode=egress_mode,
        egress=egress,
    )
    _unary(target, "SetNetwork", request)


@SETTINGS
@given(sandbox_id=ID_TEXT)
def test_get_stop_delete_unknown_ids(target: Target, sandbox_id: str) -> None:
    assert _unary(target, "GetSandbox", pb.GetSandboxRequest(sandbox_id=sandbox_id)) is None
    assert _unary(target, "StopSandbox", pb.StopSandboxRequest(sandbox_id=sandbox_id)) is None
    assert _unary(target, "DeleteSandbox", pb.DeleteSandboxRequest(sandbox_id=sandbox_id)) is None


@SETTINGS
@given(grace=DOUBLES, sandbox_id=ID_TEXT)
def test_stop_with_hostile_grace(target: Target, grace: float, sandbox_id: str) -> None:
    _unary(target, "StopSandbox", pb.StopSandboxRequest(sandbox_id=sandbox_id, grace_seconds=grace))


@SETTINGS
@given(
    tags=st.lists(HOSTILE_TEXT, max_size=70),
    statuses=st.lists(INT32, max_size=4),
    include=st.booleans(),
    page_size=INT32,
    token=HOSTILE_TEXT,
)
def test_list_sandboxes(
    target: Target, tags: list[str], statuses: list[int], include: bool, page_size: int, token: str
) -> None:
    req = pb.ListSandboxesRequest(
        tags=tags, include_terminated=include, page_size=page_size, page_token=token
    )
    req.statuses.extend(statuses)  # unknown enum values go on the wire as they are
    _unary(target, "ListSandboxes", req)


@SETTINGS
@given(sandbox_id=ID_TEXT, condition=INT32, timeout=DOUBLES, mine=st.booleans())
def test_wait_sandbox(
    target: Target, sandbox_id: str, condition: int, timeout: float, mine: bool
) -> None:
    if mine:  # the running sandbox: only conditions that return at once
        sandbox_id = target.sandbox_id
        if condition == pb.WaitSandboxRequest.CONDITION_TERMINAL:
            condition = 99
    req = pb.WaitSandboxRequest(
        sandbox_id=sandbox_id,
        condition=condition,  # type: ignore[arg-type]
        timeout_seconds=timeout,
    )
    _unary(target, "WaitSandbox", req)


@SETTINGS
@given(lease_id=HOSTILE_TEXT, ttl=DOUBLES, stop=st.booleans())
def test_leases(target: Target, lease_id: str, ttl: float, stop: bool) -> None:
    _unary(target, "RenewLease", pb.RenewLeaseRequest(lease_id=lease_id, ttl_seconds=ttl))
    _unary(target, "ReleaseLease", pb.ReleaseLeaseRequest(lease_id=lease_id, stop_sandboxes=stop))


@SETTINGS
@given(sandbox_id=ID_TEXT, tail=INT64, mine=st.booleans())
def test_stream_logs(target: Target, sandbox_id: str, tail: int, mine: bool) -> None:
    req = pb.StreamLogsRequest(
        sandbox_id=target.sandbox_id if mine else sandbox_id, tail=tail, follow=not mine
    )
    try:
        list(target.stub.StreamLogs(req, timeout=30))
    except grpc.RpcError as e:
        _check_status(e, f"StreamLogs({req!r:.200})")


@pytest.mark.slow
@SETTINGS
@given(
    argv=st.lists(
        st.one_of(HOSTILE_TEXT, st.sampled_from(["-c", "x", "--", "-n", "$$"])),
        min_size=0,
        max_size=5,
    ),
    program=st.sampled_from(
        [
            "",
            "/bin/echo",
            "/bin/true",
            "python3",
            "/proc/1/exe",
            "/workspace/to-canary",
            "/etc",
            "/dev/null",
            "nonexistent",
            "\x00",
        ]
    ),
    cwd=maybe(paths("/x"), ""),
    env=maybe(st.dictionaries(HOSTILE_TEXT, HOSTILE_TEXT, max_size=3), {}),
    timeout=maybe(DOUBLES, 5.0),
    rows=maybe(UINT32, 0),
    cols=maybe(UINT32, 0),
    tty=st.booleans(),
    mine=maybe(st.booleans(), True),
    sandbox_id=ID_TEXT,
)
def test_exec(
    target: Target,
    argv: list[str],
    program: str,
    cwd: str,
    env: dict[str, str],
    timeout: float,
    rows: int,
    cols: int,
    tty: bool,
    mine: bool,
    sandbox_id: str,
) -> None:
    if math.isfinite(timeout) and timeout > 5:
        timeout = 5.0  # a valid command must not outlive the test
    init = pb.ExecInit(
        sandbox_id=target.sandbox_id if mine else sandbox_id,
        argv=[program, *argv] if program else argv,
        cwd=cwd,
        env=env,
        timeout_seconds=timeout,
        tty=tty,
        tty_size=pb.TerminalSize(rows=rows, cols=cols),
    )
    frames = list(target.stub.Exec(iter([pb.ExecRequest(init=init)]), timeout=30))
    ends = [f for f in frames if f.WhichOneof("msg") in ("exit", "error")]
    assert len(ends) == 1 and frames[-1] is ends[0], frames
    _event(f"Exec: {ends[0].WhichOneof('msg')} {ends[0].error.code or ''}")
    if ends[0].WhichOneof("msg") == "error":
        assert ends[0].error.code in OK_NUMBERS, (init, ends[0])
        assert ends[0].error.message and "internal" not in ends[0].error.message


@SETTINGS
@given(
    exec_id=ID_TEXT,
    offset=INT64,
    signal=INT32,
    mine=st.booleans(),
    sandbox_id=ID_TEXT,
    stdin=st.lists(st.binary(max_size=64), max_size=2),
)
def test_commands_by_id(
    target: Target,
    exec_id: str,
    offset: int,
    signal: int,
    mine: bool,
    sandbox_id: str,
    stdin: list[bytes],
) -> None:
    """Attach (an Exec whose first frame is `attach`), ListExecs and SignalExec with hostile
    ids, offsets and signals: a clear status or error frame, never a crash."""
    sid = target.sandbox_id if mine else sandbox_id
    # The checks look for "internal" in messages, which echo the ids they were given.
    assume("internal" not in sid.lower() and "internal" not in exec_id.lower())
    attach = pb.ExecAttach(sandbox_id=sid, exec_id=exec_id, offset=offset)
    requests = [pb.ExecRequest(attach=attach), *(pb.ExecRequest(stdin=d) for d in stdin)]
    frames = list(target.stub.Exec(iter(requests), timeout=30))
    ends = [f for f in frames if f.WhichOneof("msg") in ("exit", "error")]
    assert len(ends) == 1 and frames[-1] is ends[0], frames
    assert ends[0].error.code in OK_NUMBERS and ends[0].error.message, ends[0]
    _unary(target, "ListExecs", pb.ListExecsRequest(sandbox_id=sid))
    request = pb.SignalExecRequest(sandbox_id=sid, exec_id=exec_id, signal=signal)
    assert _unary(target, "SignalExec", request) is None


@SETTINGS
@given(data=st.data())
def test_read_file(target: Target, data: st.DataObject) -> None:
    path = data.draw(paths(str(target.canary)))
    mine = data.draw(st.booleans())
    req = pb.ReadFileRequest(
        sandbox_id=target.sandbox_id if mine else data.draw(ID_TEXT), path=path
    )
    try:
        frames = list(target.stub.ReadFile(req, timeout=30))
    except grpc.RpcError as e:
        _check_status(e, f"ReadFile({path!r:.200})")
        return
    content = b"".join(f.data for f in frames[1:])
    assert target.canary_text not in content, f"{path!r} read the host's canary"
    assert frames[0].info.size == 0 or len(content) <= frames[0].info.size, path


@SETTINGS
@given(data=st.data())
def test_write_file(target: Target, data: st.DataObject) -> None:
    path = data.draw(paths(str(target.canary)))
    header = pb.WriteFileHeader(
        sandbox_id=target.sandbox_id if data.draw(st.booleans()) else data.draw(ID_TEXT),
        path=path,
        mode=data.draw(UINT32),
        make_parents=data.draw(st.booleans()),
    )
    body = data.draw(st.binary(max_size=128))
    reqs = [
        pb.WriteFileRequest(header=header),
        pb.WriteFileRequest(data=body),
        pb.WriteFileRequest(end=True),
    ]
    try:
        target.stub.WriteFile(iter(reqs), timeout=30)
    except grpc.RpcError as e:
        _check_status(e, f"WriteFile({path!r:.200})")
    assert target.canary.read_bytes() == target.canary_text


def test_server_info_ignores_unknown_fields(target: Target) -> None:
    call = target.svc.channel().unary_unary(METHOD + "GetServerInfo")
    reply = pb.ServerInfo.FromString(call(b"\x08\x01\x12\x03abc\xf8\xff\x01\x05", timeout=10))
    assert reply.placement == "local"


# --- raw bytes: not a valid message at all ----------------------------------------------------

UNARY = [
    "CreateSandbox",
    "GetSandbox",
    "ListSandboxes",
    "WaitSandbox",
    "StopSandbox",
    "DeleteSandbox",
    "RenewLease",
    "ReleaseLease",
    "GetServerInfo",
    "SetNetwork",
    "PauseSandbox",
    "ResumeSandbox",
    "ExtendSandbox",
    "ListVolumes",
    "DeleteVolume",
    "StatPath",
    "ListDir",
    "RemovePath",
    "MakeDir",
    "RenamePath",
    "CreateSnapshot",
    "ListSnapshots",
    "DeleteSnapshot",
    "ForkSandbox",
    "CreateSecret",
    "ListSecrets",
    "DeleteSecret",
    "SandboxUsage",
    "ListExecs",
    "SignalExec",
]


def _raw(target: Target, method: str, frames: Sequence[bytes]) -> tuple[str, Any]:
    ch = target.svc.channel()
    try:
        if method in UNARY:
            return "ok", ch.unary_unary(METHOD + method)(frames[0], timeout=10)
        if method in ("ReadFile", "StreamLogs", "DownloadTree"):
            return "ok", list(ch.unary_stream(METHOD + method)(frames[0], timeout=10))
        if method in ("WriteFile", "UploadTree"):
            return "ok", ch.stream_unary(METHOD + method)(iter(frames), timeout=10)
        return "ok", list(ch.stream_stream(METHOD + method)(iter(frames), timeout=10))
    except grpc.RpcError as e:
        return "status", e


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def nest(fields: Sequence[int], payload: bytes) -> bytes:
    """A length-delimited value at the field path `fields` (outermost first)."""
    for number in reversed(fields):
        payload = _varint(number << 3 | 2) + _varint(len(payload)) + payload
    return payload


# Every string field of every request, by field-number path (map entries: key 1, value 2).
STRING_FIELDS = [
    ("CreateSandbox", [2]),
    ("CreateSandbox", [3]),
    ("CreateSandbox", [1, 1]),
    ("CreateSandbox", [1, 2]),
    ("CreateSandbox", [1, 3, 1]),
    ("CreateSandbox", [1, 3, 2]),
    ("CreateSandbox", [1, 4]),
    ("CreateSandbox", [1, 5]),
    ("CreateSandbox", [1, 6, 1]),
    ("CreateSandbox", [1, 6, 2]),
    ("CreateSandbox", [1, 6, 4]),
    ("CreateSandbox", [1, 8, 1]),
    ("CreateSandbox", [1, 9]),
    ("GetSandbox", [1]),
    ("ListSandboxes", [1]),
    ("ListSandboxes", [5]),
    ("WaitSandbox", [1]),
    ("StopSandbox", [1]),
    ("DeleteSandbox", [1]),
    ("Exec", [1, 1]),
    ("Exec", [1, 2]),
    ("Exec", [1, 3]),
    ("Exec", [1, 4, 1]),
    ("Exec", [1, 4, 2]),
    ("ReadFile", [1]),
    ("ReadFile", [2]),
    ("WriteFile", [1, 1]),
    ("WriteFile", [1, 2]),
    ("StreamLogs", [1]),
    ("RenewLease", [1]),
    ("ReleaseLease", [1]),
]


@pytest.mark.parametrize(
    ("method", "fields"),
    STRING_FIELDS,
    ids=[f"{m}-{'.'.join(map(str, f))}" for m, f in STRING_FIELDS],
)
def test_non_utf8_strings_are_invalid_argument(
    target: Target, method: str, fields: list[int]
) -> None:
    for bad in (b"\xff\xfe", b"ok\xc3(", b"\xed\xa0\x80", b"\x00\xc0\x80"):
        kind, result = _raw(target, method, [nest(fields, bad)])
        assert kind == "status", (method, fields, result)
        assert code_of(result) == grpc.StatusCode.INVALID_ARGUMENT, (method, fields, result)
        assert "not a valid message" in details_of(result) and "UTF-8" in details_of(result)


@SETTINGS
@given(
    method=st.sampled_from(
        [
            *UNARY,
            "ReadFile",
            "StreamLogs",
            "WriteFile",
            "Exec",
            "ForwardPort",
            "UploadTree",
            "DownloadTree",
        ]
    ),
    frames=st.lists(st.binary(max_size=64), min_size=1, max_size=3),
)
def test_arbitrary_bytes(target: Target, method: str, frames: list[bytes]) -> None:
    kind, result = _raw(target, method, frames)
    if kind == "status":
        _check_status(result, f"{method} raw {frames!r:.200}")
        return
    if method == "CreateSandbox":  # parsed into a valid request by chance
        target.svc.client().delete(pb.Sandbox.FromString(result).id)
    if method == "Exec":
        frames_out = [pb.ExecResponse.FromString(f) for f in result]
        ends = [f for f in frames_out if f.WhichOneof("msg") in ("exit", "error")]
        assert len(ends) == 1 and ends[0].WhichOneof("msg") == "error", frames_out
        assert ends[0].error.code in OK_NUMBERS, ends[0]


def test_oversized_values_within_the_transport_limit(target: Target) -> None:
    """Big but deliverable: 2 MiB argv, 5000 env entries, 70,000 arguments, 65 tags."""
    c = target.svc.client()
    big = "a" * (2 << 20)
    for spec in (
        {"command": [big]},
        {"env": {f"K{i}": "v" for i in range(5000)}},
        {"command": ["x"] * 70_000},
        {"tags": [f"t{i}" for i in range(65)]},
        {"working_dir": "/" + "w" * 5000},
    ):
        with pytest.raises(grpc.RpcError) as err:
            c.create(**spec)
        _check_status(err.value, str(list(spec)))
        assert code_of(err.value) == grpc.StatusCode.INVALID_ARGUMENT
    r = c.exec(target.sandbox_id, ["/bin/echo", big])
    assert r.error.code == 3 and "init.argv" in r.error.message


def test_messages_beyond_the_transport_limit(target: Target) -> None:
    """Over 8 MiB in one message: gRPC's own RESOURCE_EXHAUSTED, and the service lives on."""
    c = target.svc.client()
    spec = pb.SandboxSpec(
        mounted_files=[pb.MountedFile(path="/workspace/big", content=b"x" * (9 << 20))]
    )
    with pytest.raises(grpc.RpcError) as err:
        target.stub.CreateSandbox(
            pb.CreateSandboxRequest(request_id=str(uuid.uuid4()), spec=spec), timeout=30
        )
    assert code_of(err.value) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "larger than max" in details_of(err.value)
    assert c.get(target.sandbox_id).status == pb.SANDBOX_STATUS_RUNNING


def test_unsized_pseudo_files_are_bounded(target: Target) -> None:
    """/proc/<pid>/pagemap has no size and would stream hundreds of GiB: refused after 16 MiB;
    a sized file is sent as announced."""
    c = target.svc.client()
    # A process of the sandbox's own (the supervisor is not dumpable: its pagemap is closed to a
    # sandbox without capabilities in the rootless mode).
    pid = int(c.sh(target.sandbox_id, "sleep 60 >/dev/null 2>&1 & echo $!").stdout)
    with pytest.raises(grpc.RpcError) as err:
        c.read_file(target.sandbox_id, f"/proc/{pid}/pagemap")
    _check_status(err.value, "pagemap")
    assert "no size" in details_of(err.value)
    c.exec(target.sandbox_id, ["/bin/kill", str(pid)])
    info, data = target.svc.client().read_file(target.sandbox_id, "/proc/self/status")
    assert info.size == 0 and b"Pid:" in data


def test_unknown_methods_are_unimplemented(target: Target) -> None:
    for name in ("NoSuchMethod", "createSandbox", "../GetSandbox", "GetSandbox/x"):
        with pytest.raises(grpc.RpcError) as err:
            target.svc.channel().unary_unary(METHOD + name)(b"", timeout=10)
        assert code_of(err.value) == grpc.StatusCode.UNIMPLEMENTED, name
    assert target.svc.client().get(target.sandbox_id).status == pb.SANDBOX_STATUS_RUNNING
