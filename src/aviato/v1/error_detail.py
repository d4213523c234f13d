"""How an `ErrorDetail` (errors.proto) travels beside a gRPC status: shared by service and SDK.

The detail is serialized into binary trailing metadata under `METADATA_KEY` (gRPC base64-encodes
keys ending in ``-bin`` on the wire). Both sides use these two functions, so the key and the
encoding are defined once.
"""

from __future__ import annotations

from collections.abc import Iterable

from aviato.v1 import errors_pb2

__all__ = ["METADATA_KEY", "from_metadata", "to_metadata"]

METADATA_KEY = "aviato-error-detail-bin"

# A detail is a few short strings; anything longer is not one of ours.
_MAX_DETAIL_BYTES = 16 * 1024


def to_metadata(detail: errors_pb2.ErrorDetail) -> tuple[tuple[str, bytes], ...]:
    """The trailing metadata that carries `detail`."""
    return ((METADATA_KEY, detail.SerializeToString()),)


def from_metadata(
    metadata: Iterable[tuple[str, str | bytes]] | None,
) -> errors_pb2.ErrorDetail | None:
    """The detail in `metadata`, or None when there is none (an older service) or it does not
    parse (never raises)."""
    for key, value in metadata or ():
        if key != METADATA_KEY or not isinstance(value, bytes) or len(value) > _MAX_DETAIL_BYTES:
            continue
        detail = errors_pb2.ErrorDetail()
        try:
            detail.ParseFromString(value)
        except Exception:
            return None
        return detail
    return None
