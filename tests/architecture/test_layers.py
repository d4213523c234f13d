"""The house's boundaries, read from the code's own imports (docs/internals/architecture.md).

Every rule here is one that a change could quietly break: an import that runs back up from the
runtime to the service, a circle that a function-level import papers over, a module that grew
past the size where one reader can hold it. Each failure names the files and the rule.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src"
PACKAGE = SRC / "aviato"
MAX_LINES = 600
# Generated code is not written by us; compiled-in C is held to the same size as Python.
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


@dataclass(frozen=True)
class Import:
    importer: str  # dotted module name, e.g. "aviato.server.api"
    imported: str  # dotted name of the aviato module imported
    written: str  # the name as the import statement spells it (generated modules resolve to
    # their package, since they are not ours to measure)
    line: int
    in_function: bool  # deferred: inside a function body
    type_only: bool  # under `if TYPE_CHECKING:`: read by the type checker, never executed


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _sources() -> Iterator[Path]:
    for path in sorted(PACKAGE.rglob("*.py")):
        if not path.name.endswith(GENERATED_SUFFIXES):
            yield path


MODULES = {_module_name(path): path for path in _sources()}


def _resolve(name: str) -> str | None:
    """The longest known module that `name` (a module or a name inside one) denotes."""
    while name:
        if name in MODULES:
            return name
        if "." not in name:
            return None
        name = name.rsplit(".", 1)[0]
    return None


def _is_type_checking_block(node: ast.AST) -> bool:
    return (
        isinstance(node, ast.If)
        and isinstance(node.test, ast.Name | ast.Attribute)
        and ast.unparse(node.test).endswith("TYPE_CHECKING")
    )


def _imports_of(module: str, path: Path) -> Iterator[Import]:
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]

    def visit(node: ast.AST, in_function: bool, type_only: bool) -> Iterator[Import]:
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(
                child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda
            )
            checking = type_only or _is_type_checking_block(child)
            if isinstance(child, ast.Import):
                for alias in child.names:
                    target = _resolve(alias.name)
                    if target:
                        yield Import(
                            module, target, alias.name, child.lineno, in_function, type_only
                        )
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = package.split(".")
                    anchor = anchor[: len(anchor) - (child.level - 1)]
                    base = ".".join([*anchor, base] if base else anchor)
                for alias in child.names:
                    written = f"{base}.{alias.name}"
                    target = _resolve(written) or _resolve(base)
                    if target and target != module:
                        yield Import(module, target, written, child.lineno, in_function, type_only)
            yield from visit(child, nested, checking)

    yield from visit(tree, False, False)


IMPORTS = [imp for module, path in MODULES.items() for imp in _imports_of(module, path)]


def _layer(module: str) -> str:
    """The part of the house a module belongs to."""
    parts = module.split(".")
    if parts[1:2] == ["__main__"]:
        return "entry"  # `python -m aviato`: the command line's door
    if len(parts) == 1 or parts[1] == "exceptions" or parts[1].startswith("_"):
        # The helpers both sides share: `aviato._private` (file modes of the state dir) and
        # `aviato._fd_passing` (descriptors received on a unix socket).
        return "shared" if parts[1:2] in (["_private"], ["_fd_passing"]) else "sdk"
    if parts[1] in ("v1", "node"):
        return "protocol"
    return parts[1]  # server, runtime, images, cluster, cli, egress


# (importer part, imported part, why): no module of the first may import one of the second.
NEVER = [
    ("sdk", "server", "the SDK reaches the service through the protocol only"),
    ("sdk", "runtime", "the SDK reaches the service through the protocol only"),
    ("sdk", "cluster", "the SDK reaches the service through the protocol only"),
    ("sdk", "images", "the SDK reaches the service through the protocol only"),
    ("sdk", "cli", "the CLI is a client of the SDK, not the other way round"),
    ("cli", "server", "the CLI is a client: it talks to the service, never runs its code"),
    ("cli", "runtime", "the CLI is a client: it talks to the service, never runs its code"),
    ("cli", "cluster", "the CLI is a client: it talks to the service, never runs its code"),
    ("cli", "images", "the CLI is a client: it talks to the service, never runs its code"),
    ("server", "sdk", "the service never imports the SDK; they share only the protocol"),
    ("server", "cli", "the service knows no command line but its own"),
    ("runtime", "server", "a node's runtime knows nothing of the control plane"),
    ("runtime", "cluster", "a node's runtime knows nothing of placement"),
    ("runtime", "sdk", "a node's runtime knows nothing of clients"),
    ("images", "runtime", "the image store is used by runtimes, never the reverse"),
    ("images", "server", "the image store knows nothing of the control plane"),
    ("images", "cluster", "the image store knows nothing of placement"),
    ("images", "sdk", "the image store knows nothing of clients"),
    ("cluster", "sdk", "node traffic is service-internal"),
    (
        "cluster",
        "server",
        "the cluster is the node side of the Ray placement (server/ray_placement)",
    ),
    ("cluster", "cli", "node traffic is service-internal"),
    ("egress", "server", "the egress gateway is a library of the service, not a part of it"),
    ("egress", "cluster", "the egress gateway is a library of the service and the node hosts"),
    ("egress", "sdk", "the egress gateway knows nothing of clients"),
    ("egress", "cli", "the egress gateway knows nothing of clients"),
    ("egress", "images", "the egress gateway knows nothing of images"),
    ("sdk", "egress", "the SDK reaches the service through the protocol only"),
    ("cli", "egress", "the CLI is a client: it talks to the service, never runs its code"),
    ("runtime", "egress", "the runtime is below the egress gateway (which reads its model)"),
    ("images", "egress", "the image store knows nothing of networking"),
]

# What the egress gateway may take from the runtime: its model (EgressPolicy), nothing else.
EGRESS_MAY_IMPORT_FROM_RUNTIME = {"aviato.runtime.model"}


def test_egress_reads_only_the_runtime_model() -> None:
    crossings = [
        f"{imp.importer}:{imp.line} imports {imp.imported}"
        for imp in IMPORTS
        if _layer(imp.importer) == "egress"
        and _layer(imp.imported) == "runtime"
        and imp.imported not in EGRESS_MAY_IMPORT_FROM_RUNTIME
    ]
    assert not crossings, "egress may import only aviato.runtime.model:\n" + "\n".join(crossings)


@pytest.mark.parametrize(("importer", "imported", "why"), NEVER)
def test_no_import_crosses_a_boundary(importer: str, imported: str, why: str) -> None:
    crossings = [
        f"{imp.importer}:{imp.line} imports {imp.imported}"
        for imp in IMPORTS
        if _layer(imp.importer) == importer and _layer(imp.imported) == imported
    ]
    assert not crossings, f"{importer} -> {imported} is forbidden ({why}):\n" + "\n".join(crossings)


def test_node_traffic_has_a_protocol_of_its_own() -> None:
    """The cluster's messages are `aviato.node.v1`, so the public API can change freely. (The
    public protocol's shared grammar, such as `aviato.v1.quantities`, is not a message.)"""
    public = [
        f"{imp.importer}:{imp.line} imports {imp.written}"
        for imp in IMPORTS
        if _layer(imp.importer) == "cluster"
        and imp.written.startswith("aviato.v1")
        and "_pb2" in imp.written
    ]
    assert not public, "\n".join(public)


# What the command line may import from outside `aviato.cli`: the public SDK and the shared
# contracts of the public protocol, nothing private, nothing generated, no wire library.
CLI_MAY_IMPORT = {
    "aviato",
    "aviato.exceptions",
    "aviato.v1.quantities",
    "aviato.v1.durations",
    "aviato.v1.endpoint",
}
CLI_FORBIDDEN_LIBRARIES = ("grpc", "google.protobuf")
# CLI modules allowed past the public SDK for now; each entry would be work left, and the test
# below fails when an entry is no longer needed, so the list can only shrink. (Issue 15 moved
# the last ten; keep it empty.)
CLI_NOT_YET_ON_THE_SDK: set[str] = set()


def _cli_private_uses() -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for module, path in MODULES.items():
        if _layer(module) != "cli":
            continue
        uses = [
            f"{module}:{imp.line} imports {imp.written}"
            for imp in IMPORTS
            if imp.importer == module
            and _layer(imp.imported) != "cli"
            and (imp.imported not in CLI_MAY_IMPORT or "_pb2" in imp.written)
        ]
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            names = (
                [alias.name for alias in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom) and not node.level
                else []
            )
            uses += [
                f"{module}:{node.lineno} imports {name}"
                for name in names
                if name.split(".")[0] in CLI_FORBIDDEN_LIBRARIES
                or name.startswith(CLI_FORBIDDEN_LIBRARIES)
            ]
        if uses:
            found[module] = uses
    return found


def test_the_cli_is_a_client_of_the_public_sdk() -> None:
    """The command line imports `aviato` and `aviato.exceptions` (the SDK's public surface),
    `aviato.v1.quantities` and `aviato.v1.endpoint` (shared contracts), and its own modules:
    no `aviato._*` private, no generated `*_pb2` message, no grpc. What it needs from the
    service, the SDK offers every user (docs/internals/parts/cli.md)."""
    found = _cli_private_uses()
    crossing = [
        use
        for module, uses in found.items()
        if module not in CLI_NOT_YET_ON_THE_SDK
        for use in uses
    ]
    assert not crossing, "the CLI reaches past the public SDK:\n" + "\n".join(crossing)
    stale = sorted(CLI_NOT_YET_ON_THE_SDK - set(found))
    assert not stale, f"no longer reach past the SDK, remove from CLI_NOT_YET_ON_THE_SDK: {stale}"


def test_no_import_circle() -> None:
    """Imports inside functions count: deferring an import hides a circle, it does not open it.
    Imports under `if TYPE_CHECKING:` do not
    count: nothing runs them, so they order nothing at import time; they are how two types
    that name each other (an error carrying a result that raises it) stay typed.
    Deferred imports stay allowed for what is heavy and optional, such as the Ray backend."""
    graph: dict[str, set[str]] = {module: set() for module in MODULES}
    for imp in IMPORTS:
        if not imp.type_only:
            graph[imp.importer].add(imp.imported)
    circles = _strongly_connected(graph)
    assert not circles, "import circles:\n" + "\n".join(" <-> ".join(c) for c in circles)


def test_no_module_is_too_long_to_read() -> None:
    paths = [*_sources(), *sorted((PACKAGE / "runtime" / "native").glob("*.[ch]"))]
    long = [
        f"{path.relative_to(SRC)}: {count} lines"
        for path in paths
        if (count := len(path.read_text().splitlines())) > MAX_LINES
    ]
    assert not long, f"modules over {MAX_LINES} lines (split them by concept):\n" + "\n".join(long)


def _strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm, iteratively; returns the components of more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work: list[tuple[str, Iterator[str]]] = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found
