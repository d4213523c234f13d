"""Manifests and indexes: the platform an index offers for this machine, a manifest's blobs.

Only what a pull needs is read: an index's `manifests` (with their `platform`), a manifest's
`config` and `layers` descriptors and their media types. Anything a registry sent is named in
errors only when it is a known platform name or has the shape of a media type.
"""

from __future__ import annotations

import json

from aviato.images.errors import ImageNotPresent, PullFailed
from aviato.images.registry_client import Descriptor, host_platform, shown

__all__ = ["LAYER_TYPES", "choose_platform", "parse_manifest"]

LAYER_TYPES = (
    "application/vnd.oci.image.layer.v1.tar",
    "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
)


_PLATFORM_WORDS = frozenset({
    "linux", "windows", "darwin", "freebsd", "netbsd", "openbsd", "solaris", "illumos", "aix",
    "plan9", "js", "wasip1", "amd64", "arm64", "arm", "386", "ppc64le", "ppc64", "s390x",
    "riscv64", "mips", "mipsle", "mips64", "mips64le", "loong64", "wasm", "v5", "v6", "v7",
    "v8", "v8.1", "v9",
})  # fmt: skip


def _platform_word(value: object) -> str:
    """A platform field of an index, when it is a name we know (else not repeated)."""
    return value if isinstance(value, str) and value in _PLATFORM_WORDS else "(other)"


def choose_platform(body: bytes, key: str) -> Descriptor:
    """The entry of an index for linux on this machine's architecture (and variant)."""
    want_os, want_arch, want_variant = host_platform()
    doc = json.loads(body)
    entries = doc.get("manifests") if isinstance(doc, dict) else None
    if not isinstance(entries, list):
        raise PullFailed(f"{key}: the index has no manifests list")
    offered: list[str] = []
    fallback: Descriptor | None = None
    for i, entry in enumerate(entries):
        plat = entry.get("platform") if isinstance(entry, dict) else None
        if not isinstance(plat, dict):
            continue
        os_name, arch, variant = plat.get("os"), plat.get("architecture"), plat.get("variant", "")
        offered.append("/".join(_platform_word(p) for p in (os_name, arch, variant) if p))
        if os_name != want_os or arch != want_arch:
            continue
        desc = Descriptor.parse(entry, f"{key}: index entry {i}")
        if not want_variant or not variant or variant == want_variant:
            return desc
        fallback = fallback or desc
    if fallback is not None:
        return fallback
    raise ImageNotPresent(
        f"{key} has no image for {want_os}/{want_arch}"
        + (f"/{want_variant}" if want_variant else "")
        + f" (it offers: {', '.join(offered[:10]) or 'nothing'}"
        + (", ...)" if len(offered) > 10 else ")")
    )


def parse_manifest(body: bytes, key: str) -> tuple[Descriptor, list[Descriptor]]:
    doc = json.loads(body)
    if not isinstance(doc, dict):
        raise PullFailed(f"{key}: the manifest is not an object")
    config = Descriptor.parse(doc.get("config"), f"{key}: manifest config")
    raw_layers = doc.get("layers")
    if not isinstance(raw_layers, list):
        raise PullFailed(f"{key}: the manifest has no layers list")
    layers = [Descriptor.parse(item, f"{key}: layer {i}") for i, item in enumerate(raw_layers)]
    for layer in layers:
        if layer.media_type and layer.media_type not in LAYER_TYPES:
            raise PullFailed(
                f"{key}: layer {layer.digest} has unsupported type {shown(layer.media_type)}"
            )
    return config, layers
