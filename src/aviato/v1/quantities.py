"""Kubernetes resource quantities ("500m", "2", "256Mi", "1.5G", "1e3"): parsed as exact numbers,
and numbers written back as quantities (exactly, for answers; rounded, for messages).

Part of the public protocol's contract (`SandboxSpec.resources` and quotas speak quantities), so
it lives beside the protos: the service, the cluster and the CLI share this one grammar.

The grammar is Kubernetes' (`k8s.io/apimachinery/pkg/api/resource`): a signed decimal number,
then a binary suffix (Ki Mi Gi Ti Pi Ei), a decimal suffix (m, k, M, G, T, P, E) or a decimal
exponent (e3, E-2). Values are computed exactly with `fractions.Fraction` and rounded *up* to the
unit asked for, as Kubernetes does ("0.5m" of cpu is 1 millicore, "1.5" bytes is 2 bytes).

What this module cannot do: it does not know what a *sensible* amount is. Bounds (a minimum
memory, a maximum cpu) belong to `validation`. Exponents beyond ±30 are refused rather than
computed, so that "1e999999999" cannot make the service compute a gigantic integer.
"""

from __future__ import annotations

import math
import re
from fractions import Fraction

__all__ = [
    "QuantityError",
    "bytes_quantity",
    "cpu_quantity",
    "format_bytes",
    "format_cpu",
    "parse_bytes",
    "parse_cpu_millis",
    "parse_quantity",
]

_MAX_TEXT = 64
_MAX_EXPONENT = 30

_BINARY = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}
_DECIMAL = {
    "m": Fraction(1, 1000),
    "": Fraction(1),
    "k": Fraction(10**3),
    "M": Fraction(10**6),
    "G": Fraction(10**9),
    "T": Fraction(10**12),
    "P": Fraction(10**15),
    "E": Fraction(10**18),
}

_PATTERN = re.compile(
    r"""
    (?P<sign>[+-]?)
    (?P<number>[0-9]+(?:\.[0-9]*)?|\.[0-9]+)
    (?:
        (?P<binary>Ki|Mi|Gi|Ti|Pi|Ei)
      | [eE](?P<exponent>[+-]?[0-9]+)
      | (?P<decimal>[mkMGTPE]?)
    )
    """,
    re.VERBOSE,
)


# What a user may write, for messages that refuse a value (the SDK, the service and the
# command line say the same).
SIZE_FORMS = "a size such as 512Mi or 2G (bytes, or a number with Ki, Mi, Gi, Ti, k, M, G or T)"
CPU_FORMS = "a number of CPUs such as 0.5, 500m or 2"


class QuantityError(ValueError):
    """The text is not a Kubernetes quantity, or not one allowed where it was given."""


def parse_quantity(text: str) -> Fraction:
    """Returns the exact value of a quantity; raises QuantityError when `text` is not one.

    Whitespace is not allowed anywhere (Kubernetes refuses it too).
    """
    if not isinstance(text, str) or not text or len(text) > _MAX_TEXT:
        raise QuantityError(f"{text!r} is not a Kubernetes quantity")
    match = _PATTERN.fullmatch(text)
    if match is None:
        raise QuantityError(f"{text!r} is not a Kubernetes quantity")
    value = Fraction(match["number"])
    if match["binary"]:
        value *= _BINARY[match["binary"]]
    elif match["exponent"] is not None:
        exponent = int(match["exponent"])
        if abs(exponent) > _MAX_EXPONENT:
            raise QuantityError(f"{text!r}: exponent out of range")
        value *= Fraction(10) ** exponent
    else:
        value *= _DECIMAL[match["decimal"] or ""]
    return -value if match["sign"] == "-" else value


def _non_negative(text: str) -> Fraction:
    value = parse_quantity(text)
    if value < 0:
        raise QuantityError(f"{text!r} is negative")
    return value


def parse_bytes(text: str) -> int:
    """A memory or disk quantity in bytes, rounded up. Negative values are refused; the error
    says what a size looks like (`SIZE_FORMS`)."""
    try:
        return math.ceil(_non_negative(text))
    except QuantityError:
        raise QuantityError(f"{text!r} is not {SIZE_FORMS}") from None


def parse_cpu_millis(text: str) -> int:
    """A cpu quantity in millicores ("500m" → 500, "2" → 2000), rounded up. Negative refused;
    the error says what a cpu value looks like (`CPU_FORMS`)."""
    try:
        return math.ceil(_non_negative(text) * 1000)
    except QuantityError:
        raise QuantityError(f"{text!r} is not {CPU_FORMS}") from None


def bytes_quantity(n: int) -> str:
    """The exact quantity of `n` bytes, in the largest binary unit that divides it ("256Mi")."""
    for unit, size in (("Ei", 2**60), ("Pi", 2**50), ("Ti", 2**40), ("Gi", 2**30), ("Mi", 2**20),
                       ("Ki", 2**10)):  # fmt: skip
        if n and n % size == 0:
            return f"{n // size}{unit}"
    return str(n)


def cpu_quantity(millis: int) -> str:
    """The exact quantity of `millis` millicores: "2" for whole cores, else "500m"."""
    return str(millis // 1000) if millis % 1000 == 0 else f"{millis}m"


def format_bytes(n: int) -> str:
    """Bytes for a message, rounded to 4 digits: "1.5Gi", "300Mi", "12 bytes"."""
    for unit, size in (("Ti", 1 << 40), ("Gi", 1 << 30), ("Mi", 1 << 20), ("Ki", 1 << 10)):
        if n >= size:
            return f"{n / size:.4g}{unit}"
    return f"{n} bytes"


def format_cpu(millis: int) -> str:
    """Cores, as a user writes them: "2", "0.5", "1.25"."""
    return f"{millis / 1000:.3f}".rstrip("0").rstrip(".")
