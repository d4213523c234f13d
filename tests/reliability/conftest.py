"""Fixtures of the reliability tests: real services on private state directories.

`svc` is one service shared by a module; `make_service(*args)` starts a private one for a test
that kills, restarts or configures it. At teardown every sandbox is removed and the test fails if
any sandbox process or cgroup of that service remains (`harness.Service.finish`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from .harness import Service, service


@pytest.fixture(scope="module")
def svc() -> Iterator[Service]:
    with service() as running:
        yield running


@pytest.fixture
def make_service() -> Iterator[Callable[..., Service]]:
    made: list[Service] = []

    def make(*args: str, start: bool = True, **kw: object) -> Service:
        service = Service(*args, **kw)  # type: ignore[arg-type]
        made.append(service)
        return service.start() if start else service

    try:
        yield make
    finally:
        errors = []
        for service in made:
            try:
                service.finish()
            except AssertionError as e:
                errors.append(e)
        if errors:
            raise errors[0]
