"""Source extraction and variable capture of @session.function (no service)."""

from __future__ import annotations

import inspect
import math

import pytest

from aviato import AsyncFunctionError, FunctionSerializationError, Serialization, Session
from aviato._function import captured_variables, function_source

THRESHOLD = 10
CONFIG = {"scale": 2, "names": ["a", "b"]}
NOT_JSON = {1, 2}


class Fake:
    def function(self, *a: object, **k: object) -> object:
        return lambda f: f


fake = Fake()


@fake.function(
    image="x",
)
def decorated(x: int) -> int:
    return x * CONFIG["scale"] + THRESHOLD  # type: ignore[operator]


def uses_math(x: float) -> float:
    import math as m

    return m.sqrt(x) + math.pi


def test_source_strips_the_function_decorator_and_keeps_line_numbers() -> None:
    source, filename = function_source(decorated)
    assert filename == __file__
    assert "@fake.function" not in source and "image=" not in source
    lines = source.splitlines()
    first = inspect.getsourcelines(decorated)[1]
    assert lines[first + 2].startswith("def decorated")  # the def stays on its own line number
    namespace: dict[str, object] = {"CONFIG": CONFIG, "THRESHOLD": THRESHOLD}
    exec(compile(source, filename, "exec"), namespace)
    assert namespace["decorated"](3) == 16  # type: ignore[operator]


def test_captures_json_globals_and_skips_modules_and_callables() -> None:
    assert captured_variables(decorated) == {"CONFIG": CONFIG, "THRESHOLD": THRESHOLD}
    assert captured_variables(uses_math) == {}  # `math` is a module


def test_captures_closures() -> None:
    factor = 3
    label = "x"

    def inner(v: int) -> str:
        return label * (v * factor)

    assert captured_variables(inner) == {"factor": 3, "label": "x"}


def test_non_json_global_is_named() -> None:
    def bad() -> int:
        return len(NOT_JSON)

    with pytest.raises(FunctionSerializationError, match="NOT_JSON"):
        captured_variables(bad)


def test_lambda_source_errors() -> None:
    with pytest.raises(FunctionSerializationError):
        function_source(eval("lambda: 1"))


def test_decorator_checks() -> None:
    session = Session()
    try:
        with pytest.raises(AsyncFunctionError):

            @session.function()
            async def nope() -> None: ...

        with pytest.raises(FunctionSerializationError, match="JSON"):

            @session.function(serialization=Serialization.PICKLE)
            def pickled() -> None: ...

        @session.function
        def plain(a: int, b: int = 2) -> int:
            """Adds."""
            return a + b

        assert plain.local(1) == 3 and plain.__name__ == "plain" and plain.__doc__ == "Adds."
        with pytest.raises(FunctionSerializationError, match="arguments"):
            plain.remote({1, 2})  # type: ignore[arg-type]
        with pytest.raises(FunctionSerializationError):
            plain.remote(math.nan)  # type: ignore[arg-type]
        with pytest.raises(FunctionSerializationError, match="key"):
            plain.remote({1: 2})  # type: ignore[arg-type]
        with pytest.raises(ValueError):
            plain.map([(1,)], max_concurrency=0)
    finally:
        session.close().result()
