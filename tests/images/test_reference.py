"""Image references with Docker Hub's conventions."""

from __future__ import annotations

import pytest

from aviato.images.reference import InvalidReference, parse_reference

D = "sha256:" + "a" * 64


@pytest.mark.parametrize(
    ("text", "canonical", "api_host"),
    [
        ("python:3.11", "docker.io/library/python:3.11", "registry-1.docker.io"),
        ("python", "docker.io/library/python:latest", "registry-1.docker.io"),
        ("user/app:v1", "docker.io/user/app:v1", "registry-1.docker.io"),
        ("index.docker.io/library/busybox", "docker.io/library/busybox:latest",
         "registry-1.docker.io"),
        ("ghcr.io/org/team/app:1.0", "ghcr.io/org/team/app:1.0", "ghcr.io"),
        ("127.0.0.1:5000/test/bb:v1", "127.0.0.1:5000/test/bb:v1", "127.0.0.1:5000"),
        ("localhost/bb", "localhost/bb:latest", "localhost"),
        (f"python@{D}", f"docker.io/library/python@{D}", "registry-1.docker.io"),
        (f"python:3.11@{D}", f"docker.io/library/python:3.11@{D}", "registry-1.docker.io"),
    ],
)  # fmt: skip
def test_parse(text: str, canonical: str, api_host: str) -> None:
    ref = parse_reference(text)
    assert str(ref) == canonical
    assert ref.api_host == api_host


def test_digest_wins_and_loopback() -> None:
    ref = parse_reference(f"127.0.0.1:5000/a:t@{D}")
    assert ref.reference == D and ref.loopback
    assert not parse_reference("ghcr.io/a").loopback


@pytest.mark.parametrize(
    "text", ["", "Python", "a//b", "a:", "a@sha256:123", "-a", "a:" + "x" * 200, "a b"]
)
def test_invalid(text: str) -> None:
    with pytest.raises(InvalidReference):
        parse_reference(text)
