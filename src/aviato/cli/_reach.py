"""`preflight()`: fail at once, with one clear line, when a remote AVIATO_BASE_URL does not
answer.

It exists because the SDK rides out an unreachable service for 20 s before it gives up: right for
a training loop riding out a restart, too long for a person at a prompt who mistyped
AVIATO_BASE_URL. One `aviato.server_info` call (one attempt, a short deadline) decides: a refused
connection, a failed TLS handshake or no answer in time fails; anything else (an answer, or an
error the command itself will report, such as a rejected API key) passes. Nothing is checked for
the local service: the SDK starts it when it is not running.
"""

from __future__ import annotations

import os

from aviato import AviatoConnectionError, AviatoError, server_info
from aviato.cli._output import CliError

ENV_BASE_URL = "AVIATO_BASE_URL"
ENV_TLS_CA = "AVIATO_TLS_CA"
PREFLIGHT_SECONDS = 5.0
_UNREACHABLE_CODES = ("UNAVAILABLE", "DEADLINE_EXCEEDED")


def base_url() -> str | None:
    """AVIATO_BASE_URL, or None for the local service."""
    return (os.environ.get(ENV_BASE_URL) or "").strip().rstrip("/") or None


def preflight() -> None:
    """See the module docstring."""
    url = base_url()
    if url is None:
        return
    try:
        server_info(url, timeout_seconds=PREFLIGHT_SECONDS)
    except ValueError as exc:  # not an address at all
        raise CliError(f"{ENV_BASE_URL}: {exc}") from None
    except AviatoError as exc:
        if not (isinstance(exc, AviatoConnectionError) or exc.code in _UNREACHABLE_CODES):
            return
        hint = "is it running?"
        if url.startswith("https:"):
            hint += f" Is its certificate trusted (set {ENV_TLS_CA} to its CA)?"
        raise CliError(
            f"cannot reach the aviato service at {url} (set by {ENV_BASE_URL}); {hint}"
        ) from None
