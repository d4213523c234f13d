"""A representative subset of the SDK tests (tests/sdk), unchanged, against the cluster.

The test functions are imported from their modules, not copied: pytest collects them here, so
they resolve their fixtures in this package (`sandbox`, `session`: cluster-backed equivalents in
conftest.py) and, through the autouse fixture below, run with `AVIATO_BASE_URL` pointing at the
control plane placed on the Ray cluster. Every SDK test module that talks to the service is
represented: lifecycle, discovery and errors (test_sandbox), commands (test_exec), files
(test_files), sessions (test_session) and remote functions (test_function).

Left out on purpose, each for a reason that is not the cluster's:
- sdk.test_exec.test_100_execs_over_10_sandboxes_run_concurrently: ten sandboxes at once, where
  the test cluster holds eight at the default 1 GiB reservation (two workers of 4 GiB; that
  placement waits for room is tested in test_cluster.py).
- sdk.test_files.test_1_gib_round_trip: slow-only (AVIATO_SLOW_TESTS) and 3 GiB of disk.
- sdk.test_local, test_cleanup, test_seed, test_remote: they start their own local service
  (autostart, signals to the SDK's process, seed documents, TCP/TLS listeners), so they test
  the machine-local service, not the placement.
- sdk.test_client_fake, test_unit_*, test_typing, test_api_docs: no service involved.
"""

from __future__ import annotations

import pytest
from raycluster import RayCluster

# ruff: noqa: F401 (imported to be collected here)
from sdk.test_exec import (
    test_argument_validation,
    test_async_for_from_other_threads_and_loops,
    test_aviato_wait_and_results,
    test_cancel_kills_the_remote_command,
    test_check_raises_with_exec_result_after_the_output,
    test_exec_on_unstarted_sandbox_starts_and_waits,
    test_exec_timeout_kills_the_command,
    test_input_is_the_whole_stdin,
    test_large_output_in_order,
    test_missing_executable_exits_127_like_a_shell,
    test_result_fields,
    test_result_timeout_is_standard_and_retriable,
    test_returncode_lifecycle,
    test_signal_exit_code,
    test_stdin_async,
    test_stdin_backpressure_and_large_input,
    test_stdin_eof_and_interaction,
    test_stdin_round_trip,
    test_streaming_is_live_async,
    test_streaming_is_live_sync,
)
from sdk.test_files import (
    test_100_mib_round_trip,
    test_binary_round_trip,
    test_files_written_by_commands_are_readable,
    test_missing_file_raises_with_filepath,
    test_write_creates_parents_and_mode,
)
from sdk.test_function import (
    test_environment_variables_are_applied_per_call,
    test_json_results_closures_and_globals,
    test_map_concurrency_limit_and_sandbox_reuse,
    test_no_reuse_gives_a_fresh_sandbox,
    test_non_json_result,
    test_remote_exception_comes_back_typed_with_traceback,
    test_remote_map_local,
)
from sdk.test_sandbox import (
    test_await_sandbox_and_async_context_manager,
    test_constructor_sends_nothing_and_start_is_idempotent,
    test_from_id_and_delete,
    test_invalid_options_are_rejected_by_the_service,
    test_list_filters,
    test_main_process_exit_codes,
    test_mounted_files_and_environment,
    test_run_returns_once_accepted_then_wait_and_status,
    test_stop_before_start_sends_nothing,
    test_stop_resolves_when_terminal_and_is_idempotent,
    test_sync_api_from_many_threads,
    test_sync_api_inside_a_running_event_loop,
    test_sync_context_manager_stops_and_does_not_mask_errors,
    test_unknown_ids_raise_typed_errors,
    test_wait_until_complete_timeout_and_unlimited,
)
from sdk.test_session import (
    test_async_session,
    test_deferred_start_and_close_stops_everything_concurrently,
    test_environment_defaults_merge_in_the_sandbox,
    test_list_adopt_and_from_id,
    test_list_include_stopped_and_status_filter,
    test_session_from_mapping_and_classmethod,
    test_stopped_sandboxes_leave_the_session,
)

pytestmark = pytest.mark.slow  # every test here runs on the Ray cluster of network namespaces


@pytest.fixture(scope="module", autouse=True)
def _on_the_cluster(ray_cluster: RayCluster) -> None:
    """Every test here, with or without fixtures, talks to the cluster's control plane."""
