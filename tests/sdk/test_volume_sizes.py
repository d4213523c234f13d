"""`Volume(size=...)`: sizes in the user's words, refused before anything is sent."""

from __future__ import annotations

import pytest

from aviato import Volume
from aviato._volumes import mounts_to_proto
from aviato.exceptions import SandboxValidationError


def test_sizes_are_bytes_or_quantities() -> None:
    assert Volume("c").size_bytes == 0  # the service's default
    assert Volume("c", size="10Gi").size_bytes == 10 << 30
    assert Volume("c", size="1G").size_bytes == 10**9
    assert Volume("c", size=4096).size_bytes == 4096
    assert Volume.from_name("c", size="512Mi").size_bytes == 512 << 20
    [mount] = mounts_to_proto({"/c": Volume("c", read_only=True, size="1Mi")})
    assert (mount.volume, mount.read_only, mount.size_bytes) == ("c", True, 1 << 20)


@pytest.mark.parametrize(
    ("size", "words"),
    [
        ("ten", "size 'ten' is not a size; give bytes or a quantity such as '512Mi'"),
        ("10 Gi", "is not a size"),
        ("-1Gi", "is not a size"),
        (0, "size must be positive, not 0"),
        (-5, "size must be positive, not -5"),
    ],
)
def test_nonsense_sizes_are_refused_in_words(size: object, words: str) -> None:
    with pytest.raises(SandboxValidationError) as refused:
        Volume("cache", size=size)  # type: ignore[arg-type]
    assert words in str(refused.value) and "Volume('cache')" in str(refused.value)


@pytest.mark.parametrize("size", [True, 1.5, b"1Gi"])
def test_sizes_of_another_type_are_refused(size: object) -> None:
    with pytest.raises(TypeError, match="size must be bytes"):
        Volume("cache", size=size)  # type: ignore[arg-type]
