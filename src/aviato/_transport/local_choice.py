"""Which channel a `GrpcTransport` uses: the one place where the transport is chosen.

A ``unix://`` address is served by the lean local channel (`lean_channel.LeanChannel`) when the
service offers it: its lean socket, ``<socket>.lean`` beside the gRPC socket
(`aviato.v1.local_frames.local_socket_path`), exists when the transport is made. Otherwise
(an older service, a socket path too long for the second name, a TCP or TLS address), and
whenever `AVIATO_TRANSPORT` is ``grpc``, it is gRPC. Both carry the same calls with the same
statuses; the lean one costs a fraction of gRPC's thread hand-offs per call
(docs/internals/transport.md).
"""

from __future__ import annotations

import os

from aviato._defaults import ENV_TRANSPORT
from aviato._transport.address import Target
from aviato.v1.local_frames import local_socket_path

__all__ = ["FORCE_GRPC", "lean_socket_for"]

FORCE_GRPC = "grpc"


def lean_socket_for(target: Target) -> str | None:
    """The lean socket to use for `target`, or None for gRPC."""
    if not target.target.startswith("unix://"):
        return None
    if os.environ.get(ENV_TRANSPORT, "").strip().lower() == FORCE_GRPC:
        return None
    path = local_socket_path(target.target[len("unix://") :])
    return path if os.path.exists(path) else None
