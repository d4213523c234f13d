"""Base URL parsing and the mapping of service errors into aviato exceptions (no service)."""

from __future__ import annotations

import grpc
import pytest

from aviato import exceptions as exc
from aviato._transport.errors import from_status
from aviato._transport.grpc import parse_base_url
from aviato.v1 import errors_pb2 as epb


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
    err = from_status(code.name, "details here", op="get sandbox", sandbox_id="sb-1")
    assert type(err) is expected
    assert err.code == code.name
    assert isinstance(err, exc.AviatoError)


def test_numeric_codes_from_exec_error_frames() -> None:
    err = from_status(5, "sandbox sb-9 not found", op="exec", sandbox_id="sb-9")
    assert isinstance(err, exc.SandboxNotFoundError) and err.sandbox_id == "sb-9"
    err = from_status(9, "sandbox is FAILED", op="exec", sandbox_id="sb-9")
    assert isinstance(err, exc.SandboxNotRunningError)


def test_file_errors_carry_the_path() -> None:
    err = from_status(
        "NOT_FOUND",
        "/nope: no such file",
        op="read file",
        sandbox_id="s",
        filepath="/nope",
    )
    assert isinstance(err, exc.SandboxFileError) and err.filepath == "/nope"
    err = from_status(
        "INVALID_ARGUMENT",
        "/tmp is a directory",
        op="read file",
        sandbox_id="s",
        filepath="/tmp",
    )
    assert isinstance(err, exc.SandboxFileError)
    # a NOT_FOUND whose detail names the sandbox (not the file) means the sandbox is gone
    err = from_status(
        "NOT_FOUND",
        "sandbox sb-3 not found",
        epb.ErrorDetail(reason=epb.SANDBOX_NOT_FOUND, sandbox_id="sb-3"),
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


def test_details_decide_not_the_message_text() -> None:
    """The reason of the detail picks the exception; the message is shown, never parsed."""
    # the text names the sandbox, the detail says the file: a file error
    err = from_status(
        "NOT_FOUND",
        "sandbox sb-3 not found",
        epb.ErrorDetail(reason=epb.FILE_NOT_FOUND, path="/x", sandbox_id="sb-3"),
        op="read file",
        filepath="/x",
    )
    assert isinstance(err, exc.SandboxFileError) and err.filepath == "/x"
    assert err.sandbox_id == "sb-3"
    # an exec error frame whose detail says the sandbox ended under the command
    err = from_status(
        10, "cut off", epb.ErrorDetail(reason=epb.SANDBOX_TERMINATED), op="exec", sandbox_id="s"
    )
    assert isinstance(err, exc.SandboxTerminatedError)
    # quota and capacity are both "at capacity" for the user
    err = from_status(
        "RESOURCE_EXHAUSTED", "quota full", epb.ErrorDetail(reason=epb.QUOTA_EXCEEDED), op="x"
    )
    assert isinstance(err, exc.SandboxResourceExhaustedError)
    # the sandbox id of the detail fills in what the caller did not know
    err = from_status(
        "FAILED_PRECONDITION",
        "sandbox sb-5 is TERMINATED",
        epb.ErrorDetail(reason=epb.SANDBOX_NOT_RUNNING, sandbox_id="sb-5"),
        op="exec",
    )
    assert isinstance(err, exc.SandboxNotRunningError) and err.sandbox_id == "sb-5"


def test_an_older_service_without_details_maps_by_code_alone() -> None:
    # a file operation's NOT_FOUND without a detail is about the file (no text is read)
    err = from_status("NOT_FOUND", "sandbox sb-3 not found", op="read file", filepath="/x")
    assert isinstance(err, exc.SandboxFileError)
    err = from_status("NOT_FOUND", "", op="get sandbox", sandbox_id="sb-3")
    assert isinstance(err, exc.SandboxNotFoundError) and "sb-3" in str(err)
    # a reason from a newer service that this SDK does not know: the code decides
    err = from_status("NOT_FOUND", "gone", epb.ErrorDetail(reason=999), op="get sandbox")  # type: ignore[arg-type]
    assert isinstance(err, exc.SandboxNotFoundError)


@pytest.mark.parametrize("code", list(grpc.StatusCode))
def test_messages_are_in_the_users_words(code: grpc.StatusCode) -> None:
    """No status name in the message, even when the service sent no text."""
    err = from_status(code.name, "", op="get sandbox")
    if code.name != "OK":
        assert code.name not in str(err) and str(err).startswith("get sandbox failed")
