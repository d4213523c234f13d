"""The image errors. Each is a runtime error with the gRPC code the service answers with."""

from __future__ import annotations

from aviato.coded_errors import SandboxRuntimeError

__all__ = ["DigestMismatch", "ImageError", "ImageNotPresent", "PullFailed", "RegistryDenied"]


class ImageError(SandboxRuntimeError):
    """Base of image errors: the image cannot be pulled, stored or used."""

    code = "FAILED_PRECONDITION"


class PullFailed(ImageError):
    """The registry could not be reached, or answered with something unusable."""

    code = "UNAVAILABLE"


class RegistryDenied(ImageError):
    """The registry refused our credentials (or asked for some and we had none)."""

    code = "PERMISSION_DENIED"


class ImageNotPresent(ImageError):
    """The registry has no such repository, tag or digest; or the store has no such image."""

    code = "NOT_FOUND"


class DigestMismatch(ImageError):
    """A blob or manifest's content does not hash to the digest it was asked for. Nothing of it
    is kept."""

    code = "DATA_LOSS"
