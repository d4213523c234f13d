"""@session.function: remote, map, local, capture, remote errors (real service)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import pytest

import aviato
from aviato import SandboxDefaults, Session

from .conftest import TEST_TAG

MULTIPLIER = 3


@pytest.fixture(scope="module")
def session() -> Iterator[Session]:
    with Session(SandboxDefaults(tags=(TEST_TAG, f"f-{uuid.uuid4().hex[:8]}"))) as s:
        yield s


def test_remote_map_local(session: Session) -> None:
    @session.function()
    def add(a: int, b: int = 10) -> int:
        return a + b

    assert add.remote(2, 3).result(timeout=60) == 5
    assert add.remote(1, b=1).result(timeout=60) == 2
    assert add.local(2, 3) == 5
    refs = add.map([(i, i) for i in range(6)])
    assert [r.result(timeout=60) for r in refs] == [0, 2, 4, 6, 8, 10]
    assert aviato.results(add.map([1, 2])) == [11, 12]  # a non-tuple item is the argument


def test_json_results_closures_and_globals(session: Session) -> None:
    offset = 7
    names = ["x", "y"]

    @session.function()
    def compute(values: list[int]) -> dict[str, object]:
        import os

        return {
            "total": sum(values) * MULTIPLIER + offset,
            "names": names,
            "inside": os.environ.get("WHERE", "?"),
            "tuple": (1, 2),
        }

    assert compute.remote([1, 2]).result(timeout=60) == {
        "total": 16,
        "names": ["x", "y"],
        "inside": "?",
        "tuple": [1, 2],
    }


def test_remote_exception_comes_back_typed_with_traceback(session: Session) -> None:
    @session.function()
    def explode(n: int) -> int:
        if n > 1:
            raise ValueError(f"n too big: {n}")
        return n

    with pytest.raises(aviato.RemoteFunctionError) as info:
        explode.remote(5).result(timeout=60)
    err = info.value
    assert isinstance(err, aviato.SandboxExecutionError) and isinstance(err, aviato.FunctionError)
    assert err.exception_type == "ValueError"
    assert err.exception_message == "n too big: 5"
    assert err.remote_traceback is not None
    assert __file__ in err.remote_traceback and "in explode" in err.remote_traceback
    assert 'raise ValueError(f"n too big: {n}")' in err.remote_traceback
    assert err.exec_result is not None and err.exec_result.returncode == 1
    assert explode.remote(1).result(timeout=60) == 1  # the sandbox is still usable


def test_non_json_result(session: Session) -> None:
    @session.function()
    def make_set() -> object:
        return {1, 2}

    with pytest.raises(aviato.RemoteFunctionError, match="JSON"):
        make_set.remote().result(timeout=60)


def test_environment_variables_are_applied_per_call(session: Session) -> None:
    env = {"MODE": "first"}

    @session.function(environment_variables=env)
    def mode() -> str:
        import os

        return os.environ["MODE"]

    assert mode.remote().result(timeout=60) == "first"
    env["MODE"] = "second"  # held by reference, as in the aviato SDK
    assert mode.remote().result(timeout=60) == "second"


@pytest.mark.slow
def test_map_concurrency_limit_and_sandbox_reuse() -> None:
    with Session(SandboxDefaults(tags=(TEST_TAG,))) as session:

        @session.function()
        def nap(i: int) -> int:
            import time as t

            t.sleep(0.5)
            return i

        t0 = time.monotonic()
        assert aviato.results(nap.map(range(8), max_concurrency=4)) == list(range(8))
        elapsed = time.monotonic() - t0
        assert 0.9 < elapsed < 6, elapsed  # two waves of four
        assert session.sandbox_count <= 4  # the sandboxes were reused, not one per item
        assert aviato.results(nap.map(range(4), max_concurrency=4)) == list(range(4))
        assert session.sandbox_count <= 4
    assert session.sandbox_count == 0


def test_no_reuse_gives_a_fresh_sandbox(session: Session) -> None:
    @session.function(reuse_sandboxes=False)
    def leave_a_file() -> bool:
        import os

        existed = os.path.exists("/tmp/marker")
        open("/tmp/marker", "w").close()
        return existed

    assert leave_a_file.remote().result(timeout=60) is False
    assert leave_a_file.remote().result(timeout=60) is False
