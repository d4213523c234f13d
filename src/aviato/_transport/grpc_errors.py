"""Where gRPC failures become `aviato.exceptions`: the status code and the `ErrorDetail` of
the trailing metadata, through `aviato._transport.errors.from_status` (never message text,
except gRPC's own words for a failed TLS handshake, which has no code of its own)."""

from __future__ import annotations

import grpc

from aviato._defaults import ENV_TLS_CA
from aviato._transport.errors import from_status
from aviato.exceptions import AviatoConnectionError
from aviato.v1 import error_detail

__all__ = ["mapped", "translate_error"]


def translate_error(
    err: BaseException,
    *,
    op: str,
    sandbox_id: str | None = None,
    filepath: str | None = None,
) -> BaseException:
    """A gRPC failure as an `AviatoError` (other exceptions are returned unchanged). Also used
    by the CLI's blocking calls, so both print the same message."""
    if not isinstance(err, grpc.RpcError):
        return err
    code_fn = getattr(err, "code", None)
    details_fn = getattr(err, "details", None)
    trailers_fn = getattr(err, "trailing_metadata", None)
    code = code_fn() if callable(code_fn) else None
    details = (details_fn() if callable(details_fn) else None) or ""
    trailers = trailers_fn() if callable(trailers_fn) else None
    name = code.name if isinstance(code, grpc.StatusCode) else "UNKNOWN"
    if name == "UNAVAILABLE" and _is_tls_failure(details):
        # not transient (no code, so never retried): the certificate will not change
        return AviatoConnectionError(
            f"{op} failed: the TLS handshake failed ({details}); if the service uses a "
            f"private CA, set {ENV_TLS_CA} to its certificate bundle"
        )
    detail = error_detail.from_metadata(trailers)
    return from_status(name, details, detail, op=op, sandbox_id=sandbox_id, filepath=filepath)


def _is_tls_failure(details: str) -> bool:
    """gRPC's own words for a failed handshake (the service never got to answer)."""
    return "handshake failed" in details.lower() or "CERTIFICATE_VERIFY_FAILED" in details


def mapped(
    err: grpc.RpcError, op: str, sandbox_id: str | None = None, filepath: str | None = None
) -> BaseException:
    return translate_error(err, op=op, sandbox_id=sandbox_id, filepath=filepath)
