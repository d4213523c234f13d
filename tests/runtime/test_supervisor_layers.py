"""The supervisor's C modules depend on each other one way only.

Each `native/*.c` is compiled on its own (`-c`); `nm --defined-only` tells which global symbols
(functions and variables) a module defines, `nm -u` which it uses without defining. A module
depends on another when it uses a symbol that the other alone defines. That graph must have no
cycle, and the frame handlers (one per concern) must not use each other: what two of them
share lives in a module below them. The layers are described in
docs/internals/parts/native.md.
"""

from __future__ import annotations

import itertools
import os
import subprocess
from collections import defaultdict
from pathlib import Path

import pytest
from _system_tools import require_tools

ROOT = Path(__file__).resolve().parents[2]
NATIVE = ROOT / "src/aviato/runtime/native"
HANDLERS = ("exec.c", "files.c", "main_process.c", "ports.c", "egress.c")

# module -> module it uses -> the symbols it uses there
Graph = dict[str, dict[str, list[str]]]


def _symbols(obj: Path, *options: str) -> list[tuple[str, str]]:
    """(type letter, name) of each symbol `nm` lists for `obj` with `options`."""
    out = subprocess.run(["nm", *options, str(obj)], capture_output=True, text=True, check=True)
    pairs = []
    for line in out.stdout.splitlines():
        fields = line.split()
        if len(fields) >= 2:
            pairs.append((fields[-2], fields[-1]))
    return pairs


def module_graph(out_dir: Path) -> Graph:
    """Compiles every module of the supervisor and returns who uses whose symbols."""
    cc = os.environ.get("CC") or "cc"
    defined_by: dict[str, set[str]] = defaultdict(set)
    used: dict[str, set[str]] = {}
    for source in sorted(NATIVE.glob("*.c")):
        obj = out_dir / f"{source.stem}.o"
        flags = ["-std=c11", "-O2", "-Wall", "-Wextra", "-Werror"]
        proc = subprocess.run(
            [cc, *flags, "-c", "-o", str(obj), str(source)], capture_output=True, text=True
        )
        assert proc.returncode == 0, proc.stderr
        for kind, name in _symbols(obj, "--defined-only"):
            if kind.isupper():  # global: visible to the other modules
                defined_by[name].add(source.name)
        used[source.name] = {name for _, name in _symbols(obj, "-u")}
    graph: Graph = {module: defaultdict(list) for module in used}
    for module, names in used.items():
        for name in sorted(names):
            owners = defined_by.get(name, set())
            if len(owners) == 1 and module not in owners:
                graph[module][next(iter(owners))].append(name)
    return {module: dict(edges) for module, edges in graph.items()}


def find_cycle(graph: Graph) -> list[str] | None:
    """A cycle of modules (first module repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = 1
        path.append(module)
        for other in sorted(graph.get(module, {})):
            if state.get(other) == 1:
                return [*path[path.index(other) :], other]
            if other not in state and (cycle := visit(other)) is not None:
                return cycle
        path.pop()
        state[module] = 2
        return None

    for module in sorted(graph):
        if module not in state and (cycle := visit(module)) is not None:
            return cycle
    return None


def describe(graph: Graph, modules: list[str]) -> str:
    steps = itertools.pairwise(modules)
    return "\n".join(f"  {a} -> {b}: {', '.join(graph[a][b])}" for a, b in steps)


@pytest.fixture(scope="module")
def graph(tmp_path_factory: pytest.TempPathFactory) -> Graph:
    if not os.environ.get("CC"):
        require_tools("cc", "nm")
    else:
        require_tools("nm")
    return module_graph(tmp_path_factory.mktemp("objects"))


def test_modules_depend_on_each_other_one_way(graph: Graph) -> None:
    cycle = find_cycle(graph)
    assert cycle is None, "the supervisor's modules use each other in a circle:\n" + describe(
        graph, cycle
    )


def test_frame_handlers_do_not_use_each_other(graph: Graph) -> None:
    ties = [
        f"  {a} -> {b}: {', '.join(graph[a][b])}"
        for a in HANDLERS
        for b in HANDLERS
        if b in graph.get(a, {})
    ]
    assert not ties, (
        "frame handlers use each other (move what they share below them):\n" + "\n".join(ties)
    )


def test_the_graph_sees_a_circle() -> None:
    """The check itself: a circle of three modules is found, a layering is not."""
    circle: Graph = {"a.c": {"b.c": ["f"]}, "b.c": {"c.c": ["g"]}, "c.c": {"a.c": ["h"]}}
    assert find_cycle(circle) == ["a.c", "b.c", "c.c", "a.c"]
    layered: Graph = {"a.c": {"b.c": ["f"], "c.c": ["h"]}, "b.c": {"c.c": ["g"]}, "c.c": {}}
    assert find_cycle(layered) is None
