"""A sandbox record's `model` column: its resolved `SandboxConfig` (every field but those a
record never keeps, so that a new field of the model needs nothing here), its tags and its
lifetime, as versioned JSON (`registry` stores it; `records.kept_config` is what it keeps).

A reader refuses a version it does not know, and gives a field missing from the JSON (added to
the model after the row was written) the model's default. Key order carries nothing.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from collections.abc import Sequence
from typing import Any

from aviato.runtime.model import SandboxConfig
from aviato.runtime.model_codec import from_plain, to_plain

__all__ = ["MODEL_VERSION", "config_json", "model_json", "model_of"]

# The version of the JSON in the `model` column; a reader refuses versions it does not know.
MODEL_VERSION = 1


# Fields of a config that a record never keeps (`records.kept_config`); mounted files are kept
# as their paths only.
_NOT_KEPT = frozenset({"sandbox_id", "registry_credentials", "secret_env"})


# The config's fields a row keeps, in the model's order (mounted files: their paths only).
_KEPT_FIELDS = tuple(
    f.name
    for f in dataclasses.fields(SandboxConfig)
    if f.name not in _NOT_KEPT and f.name != "mounted_files"
)
_PLAIN_SCALARS = (str, int, float, bool, type(None))


def config_json(config: SandboxConfig) -> str:
    """The config's part of a record's `model` column: every field but those a record never
    keeps (so that a new field of the model needs nothing here), as a JSON object. A warm
    pool member's is made while the member waits (`WarmPool`), not at its claim."""
    data: dict[str, object] = {"mounted_paths": [path for path, _ in config.mounted_files]}
    for name in _KEPT_FIELDS:
        value = getattr(config, name)
        # Most fields are scalars: they are their own plain form (one call less each).
        data[name] = value if type(value) in _PLAIN_SCALARS else to_plain(value)
    return _ENCODER.encode(data)


def model_json(
    config: SandboxConfig, tags: Sequence[str], lifetime: float, config_text: str = ""
) -> str:
    """The `model` column: a record's resolved config (`config_json`; `config_text` when the
    caller has it), its tags and its lifetime, in one JSON object."""
    text = config_text or config_json(config)
    head = (
        f'{{"max_lifetime_seconds":{_ENCODER.encode(lifetime)},'
        f'"tags":{_ENCODER.encode(list(tags))},"version":{MODEL_VERSION},'
    )
    return head + text[1:]


_ENCODER = json.JSONEncoder(separators=(",", ":"), sort_keys=True)


def model_of(text: str, sandbox_id: str) -> tuple[SandboxConfig, tuple[str, ...], float]:
    """The inverse of `model_json`. A field missing from the JSON (added to the model after
    the row was written) takes the model's default."""
    data: dict[str, Any] = json.loads(text)
    if data.get("version") != MODEL_VERSION:
        raise ValueError(f"sandbox {sandbox_id}: model version {data.get('version')!r} unknown")
    hints = typing.get_type_hints(SandboxConfig)
    fields: dict[str, Any] = {
        f.name: from_plain(hints[f.name], data[f.name])
        for f in dataclasses.fields(SandboxConfig)
        if f.name in data and f.name not in _NOT_KEPT
    }
    fields["mounted_files"] = tuple((str(p), b"") for p in data.get("mounted_paths", ()))
    config = SandboxConfig(sandbox_id=sandbox_id, **fields)
    return config, tuple(str(t) for t in data["tags"]), float(data["max_lifetime_seconds"])
