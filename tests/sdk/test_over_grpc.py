"""A subset of the SDK's tests over gRPC on the unix socket (`AVIATO_TRANSPORT=grpc`).

Everything else in tests/sdk runs over the lean local transport, which the SDK picks for the
local service; gRPC stays the public protocol (TCP, TLS, other languages), so the calls that
matter most run over it too: exec (stdin, backpressure, timeouts, cancellation), files, errors
and their details, and the bounds on streams in both directions. Small on purpose (CI time).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from aviato._client import get_client
from aviato._transport.grpc import GrpcTransport
from aviato._transport.lean_channel import LeanChannel

from . import test_error_details, test_exec, test_file_bounds, test_files, test_output_bounds

test_a_file_operation_on_a_deleted_sandbox_is_not_a_file_error = (
    test_error_details.test_a_file_operation_on_a_deleted_sandbox_is_not_a_file_error
)
test_an_invalid_option_names_the_field = test_error_details.test_an_invalid_option_names_the_field
test_result_fields = test_exec.test_result_fields
test_signal_exit_code = test_exec.test_signal_exit_code
test_stdin_eof_and_interaction = test_exec.test_stdin_eof_and_interaction
test_stdin_backpressure_and_large_input = test_exec.test_stdin_backpressure_and_large_input
test_exec_timeout_kills_the_command = test_exec.test_exec_timeout_kills_the_command
test_cancel_kills_the_remote_command = test_exec.test_cancel_kills_the_remote_command
test_100_execs_over_10_sandboxes_run_concurrently = (
    test_exec.test_100_execs_over_10_sandboxes_run_concurrently
)
test_binary_round_trip = test_files.test_binary_round_trip
test_missing_file_raises_with_filepath = test_files.test_missing_file_raises_with_filepath
big = test_file_bounds.big  # the fixture of the next test
test_a_stream_stops_early_and_reports_errors = (
    test_file_bounds.test_a_stream_stops_early_and_reports_errors
)
test_a_slow_reader_holds_the_command_back_and_loses_nothing = (
    test_output_bounds.test_a_slow_reader_holds_the_command_back_and_loses_nothing
)
test_closing_a_reader_releases_the_command = (
    test_output_bounds.test_closing_a_reader_releases_the_command
)
test_a_line_without_end_cannot_fill_the_client = (
    test_output_bounds.test_a_line_without_end_cannot_fill_the_client
)


@pytest.fixture(scope="module", autouse=True)
def over_grpc() -> Iterator[None]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("AVIATO_TRANSPORT", "grpc")
        yield


def test_these_tests_run_over_grpc() -> None:
    async def transport() -> object:
        return (await get_client(None)).transport

    used = asyncio.run(transport())
    assert isinstance(used, GrpcTransport) and not isinstance(used._channel, LeanChannel)
