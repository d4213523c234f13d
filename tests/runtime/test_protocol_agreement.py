"""The supervisor protocol's numbers agree between C and Python.

`src/aviato/runtime/native/protocol.h` is the single source; `aviato.runtime.supervisor.frames`
mirrors it. These tests read the header as text (its `#define`s and enum members) and fail when
either side changes alone: a value that differs, a name on one side only.
"""

from __future__ import annotations

import ast
import operator
import re
import struct
from collections.abc import Callable
from pathlib import Path

import pytest

from aviato.runtime.supervisor import frames

HEADER = Path(__file__).resolve().parents[2] / "src/aviato/runtime/native/protocol.h"

_DEFINE = re.compile(r"^\s*#\s*define\s+([A-Z][A-Z0-9_]*)\s+(.+?)\s*$")
_ENUM = re.compile(r"\benum\s*\{([^}]*)\}", re.S)
_MEMBER = re.compile(r"^\s*([A-Z][A-Z0-9_]*)\s*=\s*([^,]+?)\s*$")
_SUFFIX = re.compile(r"\b(\d+)(?:[uU]?[lL]{0,2}|[lL]{1,2}[uU])\b")
_OPS: dict[type[ast.operator], Callable[[int, int], int]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.LShift: operator.lshift,
    ast.BitOr: operator.or_,
}


def _strip_comments(text: str) -> str:
    return re.sub(r"//[^\n]*", "", re.sub(r"/\*.*?\*/", "", text, flags=re.S))


def c_integer(expr: str) -> int:
    """The value of a C integer constant expression of literals, + - * << | and parentheses."""

    def value(node: ast.expr) -> int:
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](value(node.left), value(node.right))
        raise ValueError(f"not an integer constant expression this test reads: {expr!r}")

    return value(ast.parse(_SUFFIX.sub(r"\1", expr), mode="eval").body)


def header_constants(text: str) -> dict[str, int]:
    """Every `#define NAME value` and every enum member `NAME = value` of a C header (the guard
    macro, which has no value, is skipped). An enum member without `= value` is refused: its
    value would depend on its position, which this test does not model."""
    text = _strip_comments(text)
    found: dict[str, int] = {}

    def add(name: str, expr: str) -> None:
        if name in found:
            raise ValueError(f"{name} is defined twice")
        found[name] = c_integer(expr)

    for line in text.splitlines():
        m = _DEFINE.match(line)
        if m:
            add(m[1], m[2])
    for body in _ENUM.findall(text):
        for item in body.split(","):
            if not item.strip():
                continue
            m = _MEMBER.match(item)
            if m is None:
                raise ValueError(f"enum member without an explicit value: {item.strip()!r}")
            add(m[1], m[2])
    return found


def python_constants() -> dict[str, int]:
    """The public integer constants of `frames`: by its own rule, exactly protocol.h's."""
    return {
        name: value
        for name, value in vars(frames).items()
        if re.fullmatch(r"[A-Z][A-Z0-9_]*", name) and type(value) is int
    }


def test_c_and_python_define_the_same_protocol_numbers() -> None:
    c = header_constants(HEADER.read_text())
    py = python_constants()
    assert "F_EXEC" in c and "PROTOCOL_VERSION" in c  # the parser saw the header's forms
    only_c = sorted(set(c) - set(py))
    only_py = sorted(set(py) - set(c))
    assert not only_c, f"in protocol.h but not in frames.py: {only_c}"
    assert not only_py, f"in frames.py but not in protocol.h: {only_py}"
    differ = {name: (c[name], py[name]) for name in c if c[name] != py[name]}
    assert not differ, f"protocol.h and frames.py disagree (C, Python): {differ}"


def test_python_layouts_have_the_sizes_the_header_gives() -> None:
    assert len(frames.header(frames.F_PING, 0, 0)) == frames.HDR
    assert frames.LOG_RECORD_HEAD.size == frames.LOG_HDR
    exit_payload = memoryview(bytes(frames.EXIT_SIZE))
    assert frames.decode_exit(exit_payload).exit_code == 0
    with pytest.raises(struct.error):  # one byte short
        frames.decode_exit(exit_payload[:-1])
    assert frames.decode_file_info(memoryview(bytes(frames.FILE_INFO_SIZE))) == (0, 0)
    assert frames.decode_hello(memoryview(bytes(frames.HELLO_SIZE))) == (0, 0)
    assert len(frames.encode_connect_port(1)) == frames.CONNECT_PORT_SIZE
    listener = memoryview(bytes([0x39, 0x30]))  # u16 little endian
    assert len(listener) == frames.EGRESS_LISTENER_SIZE
    assert frames.decode_egress_listener(listener) == 0x3039
    with pytest.raises(struct.error):
        frames.decode_egress_listener(listener[:-1])


def test_the_parser_reads_the_forms_and_refuses_others() -> None:
    text = """
    #ifndef GUARD_H
    #define GUARD_H
    #define A (1024 * 1024 + 64)   /* a comment */
    #define B (4u << 20)
    #define C (64ull << 20)
    enum { X = 1, Y = 2 };
    enum {
        Z = 64,  /* trailing comma */
    };
    #endif
    """
    assert header_constants(text) == {
        "A": 1048640,
        "B": 4 << 20,
        "C": 64 << 20,
        "X": 1,
        "Y": 2,
        "Z": 64,
    }
    with pytest.raises(ValueError, match="explicit value"):
        header_constants("enum { P = 1, Q };")
    with pytest.raises(ValueError, match="twice"):
        header_constants("#define P 1\nenum { P = 2 };")
    with pytest.raises(ValueError, match="not an integer"):
        header_constants("#define P sizeof(int)")
