#!/usr/bin/env python3
# ruff: noqa: E501  (the markdown tables below are wider than code lines)
"""Generates docs/api.md, the reference of the `aviato` SDK, from its docstrings.

    python scripts/gen_api_docs.py          # write docs/api.md
    python scripts/gen_api_docs.py --check  # exit 1 if docs/api.md is out of date

Every name in `aviato.__all__` must be documented here (the script fails otherwise), so a new
public name cannot ship without its reference entry.
"""

from __future__ import annotations

import argparse
import enum
import inspect
import re
import sys
import textwrap
import typing
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import aviato  # noqa: E402
from aviato import exceptions  # noqa: E402

OUTPUT = ROOT / "docs" / "api.md"

INTRO = """\
# aviato SDK reference

Generated from the docstrings by `scripts/gen_api_docs.py`; do not edit by hand.

```python
from aviato import Sandbox

with Sandbox.run() as sandbox:
    print(sandbox.exec(["echo", "hello"]).result().stdout)
```

## Conventions

**Every operation starts at once and returns a handle.** Nothing blocks until you ask for the
value:

| call | returns | blocks? |
|---|---|---|
| `Sandbox.run(*command, **options)` | `Sandbox` | briefly: until the service accepted the create (not until RUNNING) |
| `Sandbox(...)`, `session.sandbox(...)` | `Sandbox` | no: nothing is sent until first use |
| `sandbox.start()`, `.stop()`, `.read_file()`, `.write_file()`, `.download_file()`, `.wait_until_complete()` | `OperationRef[...]` | no |
| `sandbox.exec(argv, ...)`, `sandbox.shell()`, `sandbox.attach(exec_id)` | `Process` | no |
| `sandbox.processes()` | `OperationRef[list[ProcessInfo]]` | no |
| `sandbox.read_file_streaming(path)` | `FileStream` | no |
| `sandbox.upload_file(source, path)` | `OperationRef[int]` | no |
| `sandbox.list_dir(path)`, `.stat(path)`, `.remove(path)`, `.make_dir(path)`, `.rename(a, b)` | `OperationRef[DirListing]`, `OperationRef[FileEntry]`, `OperationRef[None]` | no |
| `sandbox.upload_dir(local, remote)`, `.download_dir(remote, local)` | `OperationRef[int]` | no |
| `sandbox.stream_logs(follow=..., tail=..., since=...)` | `LogStream` (of `LogRecord`; resumes by itself after a lost connection) | no |
| `sandbox.forward_port(port, local_port=0)` | `PortForward` (`.address` blocks until it listens) | no |
| `sandbox.code_context()`; `ctx.run(code)`, `ctx.interrupt()`, `ctx.close()` | `CodeContext`; `OperationRef[Execution]`, `OperationRef[None]` | no |
| `Images.pull()`, `.list()`, `.remove()`, `.prune()`, `aviato.server_info()`, `Admin().create_key()` ... | `Image`, `list[Image]`, `ServerInfo`, `CreatedKey` ... | yes |
| `Sandbox.list()`, `Sandbox.from_id()`, `Sandbox.delete()` | `OperationRef[...]` | no |
| `session.list()`, `session.from_id()`, `session.close()` | `OperationRef[...]` | no |
| `fn.remote(...)`, `fn.map(...)` | `OperationRef[R]`, `list[OperationRef[R]]` | no |
| `sandbox.wait()`, `sandbox.get_status()` | `Sandbox`, `SandboxStatus` | yes (use `await sandbox` in async code) |
| `ref.result()` / `ref.get()`, `aviato.wait()`, `aviato.results()` | the value(s) | yes |
| `await ref`, `await process`, `await sandbox` | the value | async, from any event loop |

- **One async implementation.** All network work runs on one background event loop in a daemon
  thread (`aviato-loop`). Sync calls block the calling thread only; `await` bridges with
  `asyncio.wrap_future`, so handles can be awaited from any loop, and `async for` over a stream
  works from any thread or loop. Jupyter needs no `nest_asyncio`; top-level `await` works.
- **Thread safety.** Sandboxes, sessions and handles may be shared between threads: all mutable
  state is changed only on the background loop.
- **Waiting for RUNNING is automatic.** `exec`, `read_file` and `write_file` on a sandbox that is
  not running yet are sent at once; the service holds them until the sandbox runs.
- **Exact results.** `ProcessResult.returncode` is the real exit code (128+N for signal N). A
  command stream that ends without an exit status raises `SandboxExecutionError`; it never reports
  0. Every failure of the service is one of the typed `aviato.exceptions`.
- **Timeouts.** `request_timeout_seconds` (default 300 s) bounds each request to the service and
  is the default of `wait()`/`wait_until_complete()` (pass `float("inf")` to wait without limit).
  `exec(timeout_seconds=...)` is enforced by the service (default: none). `ref.result(timeout)`
  raises `TimeoutError` and leaves the operation running.
- **Retries.** UNAVAILABLE is retried for up to 20 s on requests that are safe to repeat
  (creates carry a request id, so a retried create never makes two sandboxes). A command is never
  sent twice: a broken command stream is reported, not replayed, and a command cut off because
  its sandbox ended under it (stopped, its supervisor died) raises `SandboxTerminatedError`.
- **Bounded memory.** Nothing a sandbox writes can make the client grow without limit. A
  `ProcessResult` keeps the first `max_output_bytes` (64 MiB) of each stream and says when it cut
  (`stdout_truncated`/`stderr_truncated`); streaming `process.stdout` holds a 4 MiB window, and a
  reader that falls behind holds the command back. `read_file` refuses a file over `max_bytes`
  (64 MiB) before it moves; `read_file_streaming` and `download_file` read any size in chunks.

## Configuration

| variable | meaning |
|---|---|
| `AVIATO_BASE_URL` | `unix:///abs/path.sock`, `http://host:port` or `https://host:port`. Unset: the local service in the state directory, started (detached) on first use. Wins over `SandboxDefaults.base_url`. |
| `AVIATO_API_KEY` | sent as `authorization: Bearer <key>` on every call |
| `AVIATO_TLS_CA` | CA bundle for `https://` (default: system roots) |
| `AVIATO_IMAGE` | image when none is given (default `host`) |
| `AVIATO_LEASE_TTL` | a Session's lease time-to-live, seconds (default 30) |
| `AVIATO_STATE_DIR` | the local service's state directory (default `$XDG_STATE_HOME/aviato` or `~/.local/state/aviato`) |

## Cleanup

- `with Sandbox.run() as sb:` / `async with` stops the sandbox at the end of the block.
- A `Session` stops its sandboxes when closed, at interpreter exit, on SIGTERM (and on SIGINT
  when it ends the program), and — if the process is killed with SIGKILL — the service stops them
  when the session's lease is no longer renewed (after `AVIATO_LEASE_TTL` seconds).
- A bare `Sandbox.run()` outside any session is not tied to your process: it runs until stopped
  or until its `max_lifetime_seconds` (service default: 1 hour).
- A `stop()`, `Sandbox.delete()`, `write_file()` or `session.close()` still in flight when the
  interpreter exits is waited for (up to 10 s), so ``for sb in sandboxes: sb.stop()`` as a
  script's last lines does stop them; commands, reads and waits still running are cancelled.
- Clean-up at exit or on a signal never starts the local service: if it was stopped meanwhile,
  a session's sandboxes end by themselves when their lease expires.

## Code written for the original aviato SDK

- `ports=`, `s3_mount=` and `max_timeout_seconds=` raise `SandboxValidationError` naming the
  argument and what to use instead; empty `runway_ids` / `tower_ids` are accepted and ignored
  (others are refused the same way); an unknown keyword stays a `TypeError`.
- `Sandbox.list(show_terminated=True)` is `include_stopped=True`.
- `SandboxFileError.reason` says why a file operation failed (`"FILE_NOT_FOUND"`, ...).
- Remote functions serialize with JSON only: unpickling a sandbox's answer would run its code
  in your process.
- `AVIATO_API_KEY` is read at each call: a key set or changed after the first call is used
  from the next one (a `Sandbox` object keeps the key it was made with).
"""

SECTIONS: list[tuple[str, list[str]]] = [
    ("Sandboxes", ["Sandbox", "SandboxStatus"]),
    ("Snapshots", ["Snapshot"]),
    ("Secrets", ["Secret"]),
    (
        "Handles",
        [
            "OperationRef",
            "Process",
            "ProcessResult",
            "ProcessInfo",
            "ResourceUsage",
            "NetworkUsage",
            "SandboxUsage",
            "UsageSample",
            "StreamReader",
            "StreamWriter",
            "FileStream",
            "FileEntry",
            "DirListing",
            "LogStream",
            "LogRecord",
            "PortForward",
        ],
    ),
    (
        "The service, its images and its administration",
        [
            "server_info",
            "ServerInfo",
            "start_local_service",
            "Images",
            "Image",
            "PullProgress",
            "Volume",
            "HostMount",
            "Volumes",
            "VolumeInfo",
            "Admin",
            "ApiKey",
            "CreatedKey",
            "OwnerQuota",
        ],
    ),
    ("Sessions and remote functions", ["Session", "RemoteFunction"]),
    ("Code contexts", ["CodeContext", "Execution", "RichOutput", "CodeError"]),
    (
        "Configuration objects",
        ["SandboxDefaults", "ImagePullCredentials", "NetworkOptions", "EgressRule", "Serialization"],
    ),
    ("Module functions", ["wait", "results", "Waitable"]),
]

SKIP_MEMBERS = {"from_proto", "to_proto"}


def _annotation(value: Any) -> str:
    if value is inspect.Parameter.empty:
        return ""
    text = value if isinstance(value, str) else inspect.formatannotation(value)
    return text.replace("builtins.", "")


def unpacked_options(obj: Any) -> type | None:
    """The TypedDict of a ``**options: Unpack[X]`` parameter of `obj` (PEP 692), if it has one."""
    try:
        hints = typing.get_type_hints(obj, include_extras=True)
    except Exception:
        return None
    try:
        params = inspect.signature(obj).parameters.values()
    except (TypeError, ValueError):
        return None
    for p in params:
        if p.kind is p.VAR_KEYWORD and typing.get_origin(hints.get(p.name)) is typing.Unpack:
            (options,) = typing.get_args(hints[p.name])
            return options  # type: ignore[no-any-return]
    return None


def _expanded(params: list[inspect.Parameter], options: type) -> list[inspect.Parameter]:
    """`params` with ``**options: Unpack[X]`` replaced by X's keys, keyword-only, default None."""
    out = [p for p in params if p.kind is not p.VAR_KEYWORD]
    for key, annotation in options.__annotations__.items():  # every key, base classes' first
        text = getattr(annotation, "__forward_arg__", annotation)
        # a TypedDict has no defaults: None where None is allowed, else the docstring's
        default = None if "None" in str(text) else inspect.Parameter.empty
        out.append(
            inspect.Parameter(key, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=text)
        )
    return out


def signature(obj: Any, *, drop_self: bool = True) -> str:
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return "(...)"
    parts: list[str] = []
    seen_kw_only = False
    params = list(sig.parameters.values())
    if drop_self and params and params[0].name in ("self", "cls"):
        params = params[1:]
    options = unpacked_options(obj)
    if options is not None:
        params = _expanded(params, options)
    for i, p in enumerate(params):
        if p.name.startswith("_"):
            continue
        if p.kind is p.KEYWORD_ONLY and not seen_kw_only:
            if not any(q.kind is q.VAR_POSITIONAL for q in params):
                parts.append("*")
            seen_kw_only = True
        text = p.name
        if p.kind is p.VAR_POSITIONAL:
            text = "*" + text
        elif p.kind is p.VAR_KEYWORD:
            text = "**" + text
        ann = _annotation(p.annotation)
        if ann:
            text += f": {ann}"
        if p.default is not inspect.Parameter.empty:
            default = p.default
            rendered = (
                f"{type(default).__name__}.{default.name}"
                if isinstance(default, enum.Enum)
                else repr(default)
            )
            text += f" = {rendered}" if ann else f"={rendered}"
        parts.append(text)
        if p.kind is p.POSITIONAL_ONLY and (
            i + 1 == len(params) or params[i + 1].kind is not p.POSITIONAL_ONLY
        ):
            parts.append("/")
    ret = _annotation(sig.return_annotation)
    return f"({', '.join(parts)})" + (f" -> {ret}" if ret else "")


def doc(obj: Any) -> str:
    text = inspect.getdoc(obj) or ""
    return textwrap.dedent(text).strip()


def own_members(cls: type) -> list[tuple[str, Any]]:
    """The members defined by `cls` and by its private base classes (the parts a public class
    is assembled from, such as `Sandbox`'s `SandboxIO`), in definition order."""
    members = []
    namespace: dict[str, Any] = {}
    parts = [
        b
        for b in reversed(cls.__mro__[1:])
        if b.__module__.startswith("aviato._") and b.__name__ not in aviato.__all__
    ]
    for part in [cls, *parts]:
        for name, value in part.__dict__.items():
            namespace.setdefault(name, value)
    for name, value in namespace.items():
        if name.startswith("_") and name not in (
            "__await__",
            "__enter__",
            "__aenter__",
            "__iter__",
            "__aiter__",
        ):
            continue
        if name in SKIP_MEMBERS:
            continue
        members.append((name, value))
    return members


def type_arguments(cls: type) -> dict[str, str]:
    """The type variables of `cls`'s generic private bases, bound to what `cls` gives them
    (`FileStream(BridgedStream[_Reading, bytes])`: T -> bytes), so that inherited members read
    in the public class's own types."""
    bound: dict[str, str] = {}
    for klass in cls.__mro__:
        for base in getattr(klass, "__orig_bases__", ()):
            origin = typing.get_origin(base)
            params = getattr(origin, "__parameters__", ())
            for param, arg in zip(params, typing.get_args(base), strict=False):
                shown = arg.__name__ if isinstance(arg, type) else _annotation(arg)
                bound.setdefault(param.__name__, shown)
    return bound


def in_own_types(cls: type, text: str) -> str:
    for name, arg in type_arguments(cls).items():
        text = re.sub(rf"\b{re.escape(name)}\b", arg, text)
    return text


def render_member(cls: type, name: str, value: Any) -> list[str]:
    out = [in_own_types(cls, line) for line in _render_member(cls, name, value)]
    return out


def _render_member(cls: type, name: str, value: Any) -> list[str]:
    out: list[str] = []
    if isinstance(value, property):
        ann = _annotation(inspect.signature(value.fget).return_annotation) if value.fget else ""
        out.append(f"#### `{cls.__name__}.{name}` *(property)*" + (f" → `{ann}`" if ann else ""))
        body = doc(value)
    elif isinstance(value, classmethod | staticmethod):
        func = value.__func__
        kind = "classmethod" if isinstance(value, classmethod) else "staticmethod"
        sig = re.sub(r"\bSelf\b", cls.__name__, signature(func))
        out.append(f"#### `{cls.__name__}.{name}{sig}` *({kind})*")
        body = doc(func)
    elif inspect.isfunction(value):
        out.append(f"#### `{cls.__name__}.{name}{signature(value)}`")
        body = doc(value)
    else:
        return []
    if body:
        out += ["", body]
    out.append("")
    return out


def render_class(cls: type) -> list[str]:
    out = [f"### `{cls.__name__}`", ""]
    if issubclass(cls, enum.Enum):
        out += [doc(cls), "", "| member | value |", "|---|---|"]
        out += [f"| `{m.name}` | `{m.value!r}` |" for m in cls]  # type: ignore[var-annotated]
        out.append("")
        for name, value in own_members(cls):
            if isinstance(value, property | classmethod) or inspect.isfunction(value):
                out += render_member(cls, name, value)
        return out
    bases = [
        b.__name__
        for b in cls.__bases__
        if b is not object
        and not b.__name__.startswith("Generic")
        and (b.__name__ in aviato.__all__ or not b.__module__.startswith("aviato._"))
    ]
    ctor = in_own_types(cls, signature(cls.__init__))
    out.append(f"```python\n{cls.__name__}{ctor.split(' -> ')[0]}\n```")
    if bases:
        out.append(f"\nSubclass of {', '.join(f'`{b}`' for b in bases)}.")
    out += ["", doc(cls), ""]
    options = unpacked_options(cls.__init__)
    if options is not None and options.__doc__:
        out += [f"**Options** (`{options.__name__}`):", "", doc(options), ""]
    if hasattr(cls, "__dataclass_fields__"):
        fields = cls.__dataclass_fields__  # type: ignore[attr-defined]
        out += ["| field | type |", "|---|---|"]
        out += [f"| `{n}` | `{_annotation(f.type)}` |" for n, f in fields.items()]
        out.append("")
    for name, value in own_members(cls):
        out += render_member(cls, name, value)
    return out


def render_exceptions() -> list[str]:
    out = ["## Exceptions (`aviato.exceptions`)", "", doc(exceptions), ""]
    for name in exceptions.__all__:
        cls = getattr(exceptions, name)
        bases = ", ".join(f"`{b.__name__}`" for b in cls.__bases__)
        out += [f"### `{name}`", "", f"Bases: {bases}.", ""]
        body = doc(cls)
        if body and (cls.__doc__ or "").strip():
            out += [body, ""]
        init = cls.__dict__.get("__init__")
        if init is not None:
            out += [f"```python\n{name}{signature(init).split(' -> ')[0]}\n```", ""]
    return out


def build() -> str:
    documented: set[str] = {"__version__", "exceptions"} | set(exceptions.__all__)
    out = [INTRO]
    for title, names in SECTIONS:
        out += [f"## {title}", ""]
        for name in names:
            obj = getattr(aviato, name)
            documented.add(name)
            if inspect.isclass(obj):
                out += render_class(obj)
            elif inspect.isfunction(obj):
                out += [f"### `aviato.{name}{signature(obj, drop_self=False)}`", "", doc(obj), ""]
            else:  # the Waitable type alias
                out += [
                    f"### `aviato.{name}`",
                    "",
                    "`Waitable = Sandbox | OperationRef[Any] | Process`: what `aviato.wait` "
                    "accepts. A Sandbox is ready when RUNNING (or ended), a handle when finished.",
                    "",
                ]
    out += render_exceptions()
    out += ["## Version", "", "`aviato.__version__`: the installed package version.", ""]
    missing = sorted(set(aviato.__all__) - documented)
    if missing:
        raise SystemExit(f"public names without a reference entry: {missing}")
    text = "\n".join(out)
    while "\n\n\n" in text:
        text = text.replace("\n\n\n", "\n\n")
    return text.rstrip() + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if docs/api.md is stale")
    args = parser.parse_args()
    text = build()
    if args.check:
        current = OUTPUT.read_text() if OUTPUT.exists() else ""
        if current != text:
            raise SystemExit(f"{OUTPUT} is out of date: run python scripts/gen_api_docs.py")
        return
    OUTPUT.parent.mkdir(parents=True, exist_ok=True)
    OUTPUT.write_text(text)
    print(f"wrote {OUTPUT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
