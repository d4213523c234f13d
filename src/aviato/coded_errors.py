"""The root of the errors a node's insides raise with the gRPC status the service answers with.

It lives outside both `aviato.runtime` and `aviato.images` because both raise such errors and
`images` must not import `runtime` (the runtime uses the image store, never the reverse):
`runtime.base` re-exports `SandboxRuntimeError` as the runtime interface's error root, and
`images.errors.ImageError` derives from it, so that the service maps both in one place.
"""

from __future__ import annotations

__all__ = ["SandboxRuntimeError"]


class SandboxRuntimeError(Exception):
    """Base of the runtime's errors. `code` is a grpc.StatusCode name such as "NOT_FOUND"."""

    code = "INTERNAL"
