"""The model's dataclasses <-> plain values (dicts, lists, strings, numbers, booleans, None) that
`json` can write, derived field by field from the dataclasses themselves.

Two boundaries keep the model this way: the registry (a row's `model` column) and the cluster's
node protocol (a `SandboxConfig` or `ExecSpec` crossing to a node). Neither names a field, so a
field added to the model costs neither of them a line.

What converts: dataclasses, `str`, `int`, `float`, `bool`, None, `bytes` (as base64 text),
tuples (fixed or `tuple[X, ...]`), frozensets (as sorted lists), dicts with string keys, and
`X | None`. Anything else is refused with a TypeError naming the type, on either side, rather
than travelling as something the other side cannot rebuild; tests/cluster/test_codec.py relies
on that to fail when a field of a new kind is added.

`from_plain` checks the plain value's kind against the type it is to become (a string where an
int is expected is a ModelDecodeError, never a coercion), and with `exact` also that every
dataclass has exactly its fields: no unknown one dropped, no missing one defaulted. The registry
reads leniently (a row written before a field existed takes the field's default); the node
protocol reads exactly, since both of its sides run the same release.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import types
import typing
from typing import Any

__all__ = ["ModelDecodeError", "from_plain", "to_plain"]


class ModelDecodeError(ValueError):
    """A plain value that does not fit the model type it was read as."""


def to_plain(value: object) -> object:
    """`value` (a model dataclass, or any value a field of one holds) as plain values."""
    if value is None or isinstance(value, str | int | float):  # bool is an int
        return value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, bytes):
        return base64.b64encode(value).decode("ascii")
    if isinstance(value, tuple):
        return [to_plain(v) for v in value]
    if isinstance(value, frozenset):
        return sorted(to_plain(v) for v in value)  # type: ignore[type-var]
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise TypeError("a dict of the model has a key that is not a string")
        return {k: to_plain(v) for k, v in value.items()}
    raise TypeError(
        f"the model has a value of type {type(value).__name__}, which has no plain form"
    )


_SCALARS: dict[Any, tuple[type, ...]] = {
    str: (str,),
    int: (int,),
    float: (float, int),
    bool: (bool,),
}


def from_plain(hint: Any, value: object, *, exact: bool = False) -> Any:
    """`value` (plain, e.g. from `json.loads`) as the type `hint` of a model field or a model
    dataclass. Raises ModelDecodeError when it does not fit, TypeError for a hint this module
    cannot build."""
    kinds = _SCALARS.get(hint)
    if kinds is not None:
        if not isinstance(value, kinds) or (hint is not bool and isinstance(value, bool)):
            raise _mismatch(hint, value)
        return hint(value)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (types.UnionType, typing.Union):
        others = [a for a in args if a is not type(None)]
        if len(others) != 1 or len(args) != 2:
            raise TypeError(f"the model has a field of type {hint}, which has no plain form")
        return None if value is None else from_plain(others[0], value, exact=exact)
    if origin is tuple:
        items = _list(value, hint)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(from_plain(args[0], v, exact=exact) for v in items)
        if len(items) != len(args):
            raise ModelDecodeError(f"{len(items)} items where {hint} has {len(args)}")
        return tuple(from_plain(a, v, exact=exact) for a, v in zip(args, items, strict=True))
    if origin is frozenset:
        return frozenset(from_plain(args[0], v, exact=exact) for v in _list(value, hint))
    if origin is dict:
        if args[0] is not str or not isinstance(value, dict):
            raise _mismatch(hint, value)
        return {_str(k, hint): from_plain(args[1], v, exact=exact) for k, v in value.items()}
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return _dataclass(hint, value, exact=exact)
    if hint is bytes:
        try:
            return base64.b64decode(_str(value, hint), validate=True)
        except binascii.Error as e:
            raise ModelDecodeError(f"bytes that are not base64: {e}") from None
    raise TypeError(f"the model has a field of type {hint}, which has no plain form")


def _dataclass(cls: type[Any], value: object, *, exact: bool) -> Any:
    if not isinstance(value, dict):
        raise _mismatch(cls, value)
    names, hints = _fields_of(cls)
    if exact and set(value) != names:
        unknown, missing = sorted(set(value) - names), sorted(names - set(value))
        raise ModelDecodeError(
            f"{cls.__name__} with unknown fields {unknown} and missing fields {missing}"
        )
    fields = {k: from_plain(hints[k], v, exact=exact) for k, v in value.items() if k in names}
    try:
        return cls(**fields)
    except TypeError as e:  # a field without a default is missing
        raise ModelDecodeError(f"{cls.__name__}: {e}") from None


# Per dataclass: its field names and their resolved types. Resolving them costs tens of
# microseconds, more than the rest of a decode; the model has a handful of dataclasses.
_FIELDS: dict[type[Any], tuple[frozenset[str], dict[str, Any]]] = {}


def _fields_of(cls: type[Any]) -> tuple[frozenset[str], dict[str, Any]]:
    known = _FIELDS.get(cls)
    if known is None:
        hints = typing.get_type_hints(cls)
        names = frozenset(f.name for f in dataclasses.fields(cls))
        known = _FIELDS[cls] = (names, {name: hints[name] for name in names})
    return known


def _list(value: object, hint: Any) -> list[object]:
    if not isinstance(value, list):
        raise _mismatch(hint, value)
    return value


def _str(value: object, hint: Any) -> str:
    if not isinstance(value, str):
        raise _mismatch(hint, value)
    return value


def _mismatch(hint: Any, value: object) -> ModelDecodeError:
    return ModelDecodeError(f"a {type(value).__name__} where the model has {hint}")
