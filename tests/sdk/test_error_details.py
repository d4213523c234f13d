"""Errors travel as a status code plus an `ErrorDetail` (errors.proto), and the SDK maps them by
those, never by the message text (a real service)."""

from __future__ import annotations

import grpc
import pytest

from aviato import Sandbox, SandboxFileError, SandboxNotFoundError, SandboxValidationError
from aviato.v1 import error_detail, sandbox_pb2_grpc
from aviato.v1 import errors_pb2 as epb
from aviato.v1 import sandbox_pb2 as pb

from .conftest import TEST_TAG, state_dir


def test_the_detail_travels_in_the_trailing_metadata() -> None:
    Sandbox.list().result(timeout=60)  # the service is up
    channel = grpc.insecure_channel(f"unix://{state_dir() / 'aviato.sock'}")
    try:
        stub = sandbox_pb2_grpc.SandboxServiceStub(channel)  # type: ignore[no-untyped-call]
        with pytest.raises(grpc.RpcError) as info:
            stub.GetSandbox(pb.GetSandboxRequest(sandbox_id="sb-nothing"), timeout=30)
        err = info.value
        assert err.code() == grpc.StatusCode.NOT_FOUND  # type: ignore[attr-defined]
        detail = error_detail.from_metadata(err.trailing_metadata())  # type: ignore[attr-defined]
        assert detail is not None
        assert (detail.reason, detail.sandbox_id) == (epb.SANDBOX_NOT_FOUND, "sb-nothing")
        with pytest.raises(grpc.RpcError) as info:
            stub.CreateSandbox(
                pb.CreateSandboxRequest(
                    spec=pb.SandboxSpec(resources=pb.Resources(memory="12Qi")), request_id="r-1"
                ),
                timeout=30,
            )
        detail = error_detail.from_metadata(info.value.trailing_metadata())  # type: ignore[attr-defined]
        assert detail is not None and detail.reason == epb.FIELD_INVALID
        assert detail.field == "spec.resources.memory"
    finally:
        channel.close()


def test_a_file_operation_on_a_deleted_sandbox_is_not_a_file_error() -> None:
    """NOT_FOUND from a file operation: the detail says whether the sandbox or the file."""
    sb = Sandbox.run(tags=[TEST_TAG])
    sb.wait()
    with pytest.raises(SandboxFileError) as missing:
        sb.read_file("/no/such/file").result(timeout=60)
    assert missing.value.filepath == "/no/such/file" and missing.value.code == "NOT_FOUND"
    Sandbox.delete(sb.sandbox_id or "").result(timeout=60)
    with pytest.raises(SandboxNotFoundError) as gone:
        sb.read_file("/etc/hostname").result(timeout=60)
    assert gone.value.sandbox_id == sb.sandbox_id
    assert "NOT_FOUND" not in str(gone.value)


def test_an_invalid_option_names_the_field() -> None:
    # Refused by the service (a size, but too small): named as the user wrote it.
    with pytest.raises(SandboxValidationError, match="memory") as info:
        Sandbox.run(tags=[TEST_TAG], resources={"memory": "1Ki"})
    assert info.value.code == "INVALID_ARGUMENT"
    assert str(info.value).startswith('create sandbox failed: resources["memory"]: ')
    assert "spec." not in str(info.value)
    # Not a size at all: refused before the call, in the same words.
    with pytest.raises(SandboxValidationError) as info:
        Sandbox.run(tags=[TEST_TAG], resources={"memory": "12Qi"})
    assert str(info.value).startswith("resources[\"memory\"]: '12Qi' is not a size such as 512Mi")
