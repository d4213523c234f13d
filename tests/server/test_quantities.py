"""Kubernetes quantity parsing (pure)."""

from __future__ import annotations

from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

from aviato.v1.quantities import QuantityError, parse_bytes, parse_cpu_millis, parse_quantity

BINARY = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}
DECIMAL = {"": 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18}


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("0", 0),
        ("1", 1),
        ("256Mi", 256 * 2**20),
        ("1G", 10**9),
        ("1.5Gi", 3 * 2**29),
        ("1073741824", 2**30),
        ("1e3", 1000),
        ("1E3", 1000),
        ("1E", 10**18),
        (".5k", 500),
        ("1.", 1),
        ("+2k", 2000),
        ("500m", Fraction(1, 2)),
    ],
)
def test_examples(text: str, value: Fraction | int) -> None:
    assert parse_quantity(text) == value


@pytest.mark.parametrize(
    "text",
    [
        "",
        "12Qi",
        "1 Gi",
        " 1",
        "Gi",
        "1GiB",
        "1e",
        "1.2.3",
        "0x10",
        "1e999999999",
        "-",
        "1ki",
        "x" * 65,
    ],
)
def test_rejects(text: str) -> None:
    with pytest.raises(QuantityError):
        parse_quantity(text)


def test_cpu_and_bytes_round_up() -> None:
    assert parse_cpu_millis("500m") == 500
    assert parse_cpu_millis("2") == 2000
    assert parse_cpu_millis("0.1") == 100
    assert parse_cpu_millis("0.5m") == 1
    assert parse_bytes("1.5") == 2
    assert parse_bytes("1k") == 1000
    with pytest.raises(QuantityError):
        parse_bytes("-1Mi")
    with pytest.raises(QuantityError):
        parse_cpu_millis("-1")


@given(st.integers(min_value=0, max_value=10**6), st.sampled_from(sorted(BINARY)))
def test_binary_suffixes(n: int, suffix: str) -> None:
    assert parse_bytes(f"{n}{suffix}") == n * BINARY[suffix]


@given(st.integers(min_value=0, max_value=10**6), st.sampled_from(sorted(DECIMAL)))
def test_decimal_suffixes(n: int, suffix: str) -> None:
    assert parse_bytes(f"{n}{suffix}") == n * DECIMAL[suffix]


@given(st.integers(min_value=0, max_value=10**9))
def test_millicores(n: int) -> None:
    assert parse_cpu_millis(f"{n}m") == n


@given(st.decimals(min_value=0, max_value=10**6, places=3, allow_nan=False))
def test_decimal_numbers_are_exact(d: object) -> None:
    assert parse_quantity(str(d)) == Fraction(str(d))


@pytest.mark.slow
@given(st.text(max_size=20))
def test_any_text_parses_or_raises_quantity_error(text: str) -> None:
    try:
        value = parse_quantity(text)
    except QuantityError:
        return
    assert isinstance(value, Fraction)
