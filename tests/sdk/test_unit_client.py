"""Base URL parsing and the translation of gRPC failures into aviato exceptions (no service)."""

from __future__ import annotations

import grpc
import pytest

from aviato import exceptions as exc
from aviato._client import error_from_status, parse_base_url


def test_parse_base_url_forms() -> None:
    t = parse_base_url("unix:///tmp/x/aviato.sock")
    assert (t.target, t.secure) == ("unix:///tmp/x/aviato.sock", False)
    t = parse_base_url("http://127.0.0.1:7443/")
    assert (t.target, t.secure) == ("127.0.0.1:7443", False)
    t = parse_base_url("https://aviato.example.com")
    assert (t.target, t.secure) == ("aviato.example.com:443", True)
    assert parse_base_url("http://example.com").target == "example.com:80"
    assert parse_base_url("https://[::1]:9000").target == "[::1]:9000"


@pytest.mark.parametrize(
    "url", ["ftp://x", "example.com:80", "http://", "https://host/path", "unix://"]
)
def test_parse_base_url_rejects(url: str) -> None:
    with pytest.raises(ValueError):
        parse_base_url(url)


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        (grpc.StatusCode.NOT_FOUND, exc.SandboxNotFoundError),
        (grpc.StatusCode.UNAUTHENTICATED, exc.AviatoAuthenticationError),
        (grpc.StatusCode.PERMISSION_DENIED, exc.AviatoAuthenticationError),
        (grpc.StatusCode.DEADLINE_EXCEEDED, exc.SandboxTimeoutError),
        (grpc.StatusCode.UNAVAILABLE, exc.AviatoConnectionError),
        (grpc.StatusCode.INVALID_ARGUMENT, exc.SandboxValidationError),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, exc.SandboxResourceExhaustedError),
        (grpc.StatusCode.FAILED_PRECONDITION, exc.SandboxNotRunningError),
        (grpc.StatusCode.ABORTED, exc.SandboxTerminatedError),
        (grpc.StatusCode.INTERNAL, exc.SandboxError),
    ],
)
def test_status_mapping(code: grpc.StatusCode, expected: type[Exception]) -> None:
    err = error_from_status(code, "details here", op="get sandbox", sandbox_id="sb-1")
    assert type(err) is expected
    assert err.code == code.name
    assert isinstance(err, exc.AviatoError)


def test_numeric_codes_from_exec_error_frames() -> None:
    err = error_from_status(5, "sandbox sb-9 not found", op="exec", sandbox_id="sb-9")
    assert isinstance(err, exc.SandboxNotFoundError) and err.sandbox_id == "sb-9"
    err = error_from_status(9, "sandbox is FAILED", op="exec", sandbox_id="sb-9")
    assert isinstance(err, exc.SandboxNotRunningError)


def test_file_errors_carry_the_path() -> None:
    err = error_from_status(
        grpc.StatusCode.NOT_FOUND,
        "/nope: no such file",
        op="read file",
        sandbox_id="s",
        filepath="/nope",
    )
    assert isinstance(err, exc.SandboxFileError) and err.filepath == "/nope"
    err = error_from_status(
        grpc.StatusCode.INVALID_ARGUMENT,
        "/tmp is a directory",
        op="read file",
        sandbox_id="s",
        filepath="/tmp",
    )
    assert isinstance(err, exc.SandboxFileError)
    # a NOT_FOUND naming the sandbox (not the file) means the sandbox is gone
    err = error_from_status(
        grpc.StatusCode.NOT_FOUND,
        "sandbox sb-3 not found",
        op="read file",
        sandbox_id="sb-3",
        filepath="/x",
    )
    assert isinstance(err, exc.SandboxNotFoundError)


def test_hierarchy_and_attributes() -> None:
    assert issubclass(exc.SandboxValidationError, ValueError)
    assert issubclass(exc.FunctionSerializationError, TypeError)
    assert issubclass(exc.RemoteFunctionError, exc.SandboxExecutionError)
    assert issubclass(exc.RemoteFunctionError, exc.FunctionError)
    assert issubclass(exc.WandbAuthError, exc.AviatoAuthenticationError)
    e = exc.SandboxExecutionError("x", exec_result=None, exception_type="T", exception_message="m")
    assert (e.exec_result, e.exception_type, e.exception_message) == (None, "T", "m")
    f = exc.SandboxFileError("x", filepath="/p", sandbox_id="s")
    assert (f.filepath, f.sandbox_id) == ("/p", "s")
    r = exc.RemoteFunctionError("boom", exception_type="ValueError", remote_traceback="Trace\n")
    assert "Remote traceback" in str(r)
