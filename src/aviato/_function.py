"""`RemoteFunction`: run a plain Python function in a sandbox (``@session.function()``).

How a call works (all on the SDK's loop, nothing blocks the caller):

1. The function's source is taken with `inspect.getsource`; decorators of the form
   ``@<anything>.function`` / ``@<anything>.function(...)`` are blanked out (other decorators are
   kept), and line numbers are preserved so a remote traceback points at your file's lines.
2. Variables the function reads from enclosing scopes (closure cells) and module globals are
   captured when they are JSON-safe data. Modules, classes and functions are not captured:
   import modules and define helpers *inside* the function. A referenced global that is data but
   not JSON-safe raises `FunctionSerializationError` (naming it) at call time.
3. Arguments must be JSON-safe (None, bool, int, float, str, lists/tuples, dicts with str keys);
   tuples arrive as lists. The payload is written into the sandbox with `write_file`, the runner is
   ``python3 -c <runner> <payload> <result>``, and the result file is read back with `read_file`.
4. The return value must be JSON-safe too. A remote exception comes back as `RemoteFunctionError`
   (a `SandboxExecutionError` and a `FunctionError`) with ``exception_type``,
   ``exception_message`` and ``remote_traceback``.

Sandbox reuse: by default (``reuse_sandboxes=True``) a function keeps up to 8 idle sandboxes and
runs later calls in them. This is safe for the function's own state because every call runs in a
fresh interpreter process; what does carry over between calls *of the same function* is the
sandbox's file system (files the function wrote outside the per-call payload files, which are
removed) and any background process it left running. Pass ``reuse_sandboxes=False`` for a fresh
sandbox per call. The idle sandboxes belong to the session and are stopped when it closes.
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import dis
import functools
import inspect
import json
import math
import textwrap
import types
import uuid
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Generic, ParamSpec, Protocol, TypeVar, Unpack, cast

from aviato._defaults import Serialization
from aviato._operation import OperationRef
from aviato._options import FunctionOptions, SandboxDefaults, SandboxOptions, check_keys
from aviato._process import ExecState
from aviato._sandbox import Sandbox
from aviato.exceptions import (
    AsyncFunctionError,
    FunctionSerializationError,
    RemoteFunctionError,
    SandboxExecutionError,
    SandboxFileError,
    SandboxNotFoundError,
    SandboxNotRunningError,
    SandboxTerminatedError,
)
from aviato.v1 import sandbox_pb2 as pb

__all__ = ["FunctionHost", "RemoteFunction"]

P = ParamSpec("P")
R = TypeVar("R")

MAX_IDLE_SANDBOXES = 8
# The options of a function that are not options of its sandboxes.
_OWN_OPTIONS = frozenset(FunctionOptions.__optional_keys__ - SandboxOptions.__optional_keys__)
DEFAULT_MAX_CONCURRENCY = 8


class FunctionHost(Protocol):
    """What a remote function needs from its `Session`: its defaults, whether it is closed, and
    new sandboxes."""

    defaults: SandboxDefaults

    @property
    def closed(self) -> bool: ...

    def sandbox(self, **options: Unpack[SandboxOptions]) -> Sandbox: ...


# The runner, executed as `python3 -c RUNNER <payload.json> <result.json>` inside the sandbox.
RUNNER = r"""
import glob, json, linecache, os, sys, traceback
_inp, _out = sys.argv[1], sys.argv[2]
for _stale in glob.glob(os.path.join(os.path.dirname(_out), "aviato-fn-*.out.json")):
    try:
        os.unlink(_stale)
    except OSError:
        pass
with open(_inp) as _f:
    _p = json.load(_f)
os.unlink(_inp)

def _write(_obj):
    with open(_out + ".tmp", "w") as _f:
        json.dump(_obj, _f)
    os.replace(_out + ".tmp", _out)

def _type_name(_e):
    _t = type(_e)
    return _t.__qualname__ if _t.__module__ == "builtins" else _t.__module__ + "." + _t.__qualname__

_ns = {"__name__": "__aviato_remote__", "__builtins__": __builtins__}
_ns.update(_p["captured"])
_src, _file = _p["source"], _p["filename"]
linecache.cache[_file] = (len(_src), None, _src.splitlines(True), _file)
try:
    exec(compile(_src, _file, "exec"), _ns)
    _value = _ns[_p["name"]](*_p["args"], **_p["kwargs"])
except BaseException as _e:
    _write({"ok": False, "type": _type_name(_e), "message": str(_e),
            "traceback": traceback.format_exc()})
    sys.exit(1)
try:
    _encoded = json.dumps({"ok": True, "value": _value}, allow_nan=True)
except (TypeError, ValueError) as _e:
    _write({"ok": False, "type": "FunctionSerializationError",
            "message": "the return value is not JSON-serializable: %s" % _e, "traceback": ""})
    sys.exit(1)
with open(_out + ".tmp", "w") as _f:
    _f.write(_encoded)
os.replace(_out + ".tmp", _out)
"""


# --- source and captured variables ------------------------------------------------------------


def _is_function_decorator(node: ast.expr) -> bool:
    target = node.func if isinstance(node, ast.Call) else node
    return isinstance(target, ast.Attribute) and target.attr == "function"


def function_source(fn: Callable[..., Any]) -> tuple[str, str]:
    """(source, filename): the function's source with ``@x.function(...)`` decorators blanked,
    dedented, and padded so line numbers match the original file."""
    fn = inspect.unwrap(fn)
    try:
        lines, start = inspect.getsourcelines(fn)
        filename = inspect.getsourcefile(fn) or inspect.getfile(fn)
    except (OSError, TypeError) as err:
        raise FunctionSerializationError(
            f"cannot get the source of {getattr(fn, '__qualname__', fn)!r} ({err}); remote "
            "functions must be defined with `def` in a file (not a lambda or a REPL line)"
        ) from err
    source = textwrap.dedent("".join(lines))
    tree = ast.parse(source)
    node = tree.body[0] if tree.body else None
    if not isinstance(node, ast.FunctionDef):
        raise FunctionSerializationError(f"{fn.__qualname__} is not a plain `def` function")
    src_lines = source.splitlines(keepends=True)
    for deco in node.decorator_list:
        if _is_function_decorator(deco):
            first = deco.lineno - 1
            last = deco.end_lineno or deco.lineno
            for i in range(first, last):
                src_lines[i] = "\n"
            # the "@" sits before the decorator expression on its first line
    padded = "\n" * max(start - 1, 0) + "".join(src_lines)
    return padded, filename


def _global_names(code: types.CodeType) -> set[str]:
    names: set[str] = set()
    for ins in dis.get_instructions(code):
        if ins.opname in ("LOAD_GLOBAL", "LOAD_NAME") and isinstance(ins.argval, str):
            names.add(ins.argval)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _global_names(const)
    return names


def _check_json(value: Any, where: str) -> None:
    """Raises FunctionSerializationError unless `value` survives JSON (tuples become lists)."""
    if value is None or isinstance(value, bool | int | str):
        return
    if isinstance(value, float):
        if math.isfinite(value):
            return
        raise FunctionSerializationError(f"{where}: {value!r} is not valid JSON")
    if isinstance(value, list | tuple):
        for i, item in enumerate(value):
            _check_json(item, f"{where}[{i}]")
        return
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise FunctionSerializationError(f"{where}: dict key {k!r} is not a string")
            _check_json(v, f"{where}[{k!r}]")
        return
    raise FunctionSerializationError(
        f"{where} is a {type(value).__name__}, which is not JSON-serializable"
    )


def _capturable(value: Any) -> bool:
    """Data worth capturing; modules, classes and callables are left out."""
    return not (isinstance(value, types.ModuleType | type) or callable(value))


def captured_variables(fn: Callable[..., Any]) -> dict[str, Any]:
    """The JSON-safe data the function reads from closures and module globals."""
    fn = inspect.unwrap(fn)
    code: types.CodeType = fn.__code__
    captured: dict[str, Any] = {}
    for name in sorted(_global_names(code)):
        if name in fn.__globals__:
            value = fn.__globals__[name]
            if _capturable(value):
                _check_json(value, f"global variable {name!r} used by {fn.__qualname__}")
                captured[name] = value
    for name, cell in zip(code.co_freevars, fn.__closure__ or (), strict=False):
        try:
            value = cell.cell_contents
        except ValueError:  # empty cell
            continue
        if _capturable(value):
            _check_json(value, f"closure variable {name!r} used by {fn.__qualname__}")
            captured[name] = value
    return captured


# --- the function -----------------------------------------------------------------------------


class RemoteFunction(Generic[P, R]):
    """A Python function that runs in sandboxes of a `Session` (made by ``@session.function()``).

    - ``f.remote(*args, **kwargs) -> OperationRef[R]``: one call, started at once;
    - ``f.map(items, max_concurrency=8) -> list[OperationRef[R]]``: one call per item (a tuple
      item is unpacked into positional arguments, anything else is the single argument), at most
      `max_concurrency` running at a time;
    - ``f.local(*args, **kwargs) -> R``: the original function, in this process.

    Options (decorator arguments): the options of its sandboxes as `Session.sandbox` takes them
    (`container_image`, `resources`, `mounted_files`, `network`, `max_lifetime_seconds`, `tags`,
    ...; not a command, nor ``image_command=True``: a function runs in a kept-alive sandbox),
    except that `environment_variables` is held by reference and applied per call (changing
    the dict affects later calls); and `temp_dir` (payload directory in the sandbox; default:
    the session's, ``/tmp``), `timeout_seconds` (per call; default no limit) and
    `reuse_sandboxes`. Only JSON serialization exists.

    How a call runs: the function's source (``@x.function`` decorators removed, line numbers
    kept) and the JSON-safe data it reads from closures and module globals are written into the
    sandbox with the arguments, ``python3 -c <runner>`` calls it in a fresh interpreter, and the
    JSON result is read back. Modules, classes and helper functions are not captured: import and
    define them inside the function. Arguments and results must be JSON-safe (tuples arrive as
    lists). A remote exception raises `RemoteFunctionError` with ``exception_type``,
    ``exception_message`` and ``remote_traceback``.

    Sandbox reuse (``reuse_sandboxes=True``, the default): up to 8 idle sandboxes are kept per
    function and reused by later calls. Each call is a fresh interpreter, so Python state never
    leaks between calls; files the function writes and background processes it leaves do
    persist for later calls of the same function. Pass ``reuse_sandboxes=False`` for a fresh
    sandbox per call. Idle sandboxes belong to the session and stop when it closes.
    """

    def __init__(
        self, fn: Callable[P, R], session: FunctionHost, **options: Unpack[FunctionOptions]
    ) -> None:
        if inspect.iscoroutinefunction(fn) or inspect.isasyncgenfunction(fn):
            raise AsyncFunctionError(
                f"{getattr(fn, '__qualname__', fn)} is an async function; remote functions "
                "must be plain `def` functions"
            )
        check_keys(options, FunctionOptions.__optional_keys__, "@session.function")
        serialization = options.get("serialization", Serialization.JSON)
        temp_dir = options.get("temp_dir")
        timeout_seconds = options.get("timeout_seconds")
        reuse_sandboxes = options.get("reuse_sandboxes", True)
        environment_variables = options.get("environment_variables")
        own: dict[str, object] = {
            key: value
            for key, value in options.items()
            if key not in _OWN_OPTIONS and key != "environment_variables"
        }
        if own.get("image_command"):
            raise ValueError("a remote function runs in a kept-alive sandbox: no image_command")
        if Serialization(serialization) != Serialization.JSON:
            raise FunctionSerializationError(
                "only Serialization.JSON is supported: unpickling results produced by "
                "untrusted code would let it run code in your process"
            )
        functools.update_wrapper(self, fn)  # type: ignore[arg-type]
        self._fn = fn
        self._session = session
        sandbox_options = cast(SandboxOptions, own)  # the settings: a subset of its keys
        sandbox_options["image_command"] = False  # functions exec into a kept-alive sandbox
        self._sandbox_options = sandbox_options
        self.environment_variables = environment_variables
        self._temp_dir = (temp_dir or session.defaults.temp_dir).rstrip("/") or "/"
        self._timeout = timeout_seconds
        self._reuse = reuse_sandboxes
        self._source: tuple[str, str] | None = None
        self._idle: list[Sandbox] = []  # loop-side

    def __repr__(self) -> str:
        return f"<RemoteFunction {getattr(self._fn, '__qualname__', self._fn)}>"

    # -- public --------------------------------------------------------------------------------

    def local(self, *args: P.args, **kwargs: P.kwargs) -> R:
        """Calls the original function in this process."""
        return self._fn(*args, **kwargs)

    def remote(self, *args: P.args, **kwargs: P.kwargs) -> OperationRef[R]:
        """Runs the function in a sandbox; returns at once. Non-JSON arguments or captured
        values raise `FunctionSerializationError` here."""
        payload = self._payload(args, kwargs)
        return OperationRef._of(self._call(payload, None))

    def map(
        self, items: Iterable[Any], *, max_concurrency: int = DEFAULT_MAX_CONCURRENCY
    ) -> list[OperationRef[R]]:
        """One call per item (tuples are unpacked as positional arguments), at most
        `max_concurrency` at a time; returns the refs in the order of `items`."""
        if max_concurrency < 1:
            raise ValueError("max_concurrency must be at least 1")
        payloads = [
            self._payload(tuple(item) if isinstance(item, tuple) else (item,), {}) for item in items
        ]
        limit = asyncio.Semaphore(max_concurrency)
        return [OperationRef._of(self._call(p, limit)) for p in payloads]

    # -- internals -----------------------------------------------------------------------------

    def _payload(self, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> bytes:
        if self._source is None:
            self._source = function_source(self._fn)
        source, filename = self._source
        captured = captured_variables(self._fn)
        _check_json(list(args), "arguments")
        _check_json(dict(kwargs), "keyword arguments")
        return json.dumps(
            {
                "source": source,
                "filename": filename,
                "name": self._fn.__name__,
                "captured": captured,
                "args": list(args),
                "kwargs": dict(kwargs),
            }
        ).encode()

    async def _call(self, payload: bytes, limit: asyncio.Semaphore | None) -> R:
        async with limit if limit is not None else contextlib.nullcontext():
            for attempt in range(2):
                sandbox, reused = await self._acquire()
                healthy = False
                try:
                    value = await self._run_in(sandbox, payload)
                    healthy = True
                    return value
                except RemoteFunctionError:
                    healthy = True  # the function raised; the sandbox is fine
                    raise
                except (SandboxNotRunningError, SandboxNotFoundError, SandboxTerminatedError):
                    # A reused sandbox may have ended meanwhile (lifetime, lease): retry once.
                    if reused and attempt == 0:
                        continue
                    raise
                finally:
                    self._release(sandbox, healthy)
        raise AssertionError("unreachable")  # pragma: no cover

    async def _acquire(self) -> tuple[Sandbox, bool]:
        while self._idle:
            sandbox = self._idle.pop()
            if sandbox.status is not None and not sandbox.status.is_terminal:
                return sandbox, True
            self._release(sandbox, healthy=False)
        sandbox = self._session.sandbox(**self._sandbox_options)
        await sandbox._ensure_started()
        return sandbox, False

    def _release(self, sandbox: Sandbox, healthy: bool) -> None:
        if (
            healthy
            and self._reuse
            and not self._session.closed
            and len(self._idle) < MAX_IDLE_SANDBOXES
        ):
            self._idle.append(sandbox)
        else:
            task = asyncio.ensure_future(sandbox._stop(0.5, True))
            task.add_done_callback(lambda t: t.cancelled() or t.exception())

    async def _run_in(self, sandbox: Sandbox, payload: bytes) -> R:
        """Runs one call in `sandbox`; returns the value or raises."""
        base = f"{self._temp_dir}/aviato-fn-{uuid.uuid4().hex}"
        inp, out = f"{base}.in.json", f"{base}.out.json"
        await sandbox._write_file(inp, memoryview(payload), None, True, None)
        argv = ["python3", "-c", RUNNER, inp, out]
        state = ExecState(argv, stdin=False)
        init = pb.ExecInit(
            argv=argv,
            env=dict(self.environment_variables or {}),
            timeout_seconds=float(self._timeout or 0.0),
        )
        result = await sandbox._exec(state, init, False)
        try:
            raw = await sandbox._read_file(out, None)
        except SandboxFileError:
            raise SandboxExecutionError(
                f"remote function {self._fn.__name__} exited with code {result.returncode} "
                f"without a result; stderr: {result.stderr.strip()[-2000:]}",
                sandbox_id=sandbox.sandbox_id,
                exec_result=result,
            ) from None
        outcome = json.loads(raw)
        if outcome.get("ok"):
            value: R = outcome["value"]
            return value
        exc_type = str(outcome.get("type", "Exception"))
        message = str(outcome.get("message", ""))
        raise RemoteFunctionError(
            f"remote function {self._fn.__name__} raised {exc_type}: {message}",
            sandbox_id=sandbox.sandbox_id,
            exec_result=result,
            exception_type=exc_type,
            exception_message=message,
            remote_traceback=outcome.get("traceback") or None,
        )
