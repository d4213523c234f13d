"""Fixtures of the image tests: a real registry on 127.0.0.1 and a supervisor binary.

Tests that need `docker-registry` or busybox-static (Debian packages; .ci/run installs them)
are skipped when they are missing, with the reason.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from oci_helpers import Pusher, Registry, require_image_tools, run_registry


@pytest.fixture
def workdir() -> Iterator[Path]:
    """A short private directory (unix socket paths are limited to 107 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="avimg-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def registry(workdir: Path) -> Iterator[Registry]:
    require_image_tools()
    with run_registry(workdir / "registry") as reg:
        yield reg


@pytest.fixture
def pusher(registry: Registry) -> Iterator[Pusher]:
    p = Pusher(registry)
    yield p
    p.http.close()
