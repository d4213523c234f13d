"""The gateway's resolver against the small internet's DNS (run in the host namespace)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from small_internet import SmallInternet

RESOLVE = """
import asyncio, json, sys
from aviato.egress.resolver import ResolveError, Resolver

async def main():
    resolver = Resolver([sys.argv[1]], timeout=1)
    answers = {}
    for name in sys.argv[2:]:
        try:
            answers[name] = [str(ip) for ip in await resolver.resolve(name)]
        except ResolveError as e:
            answers[name] = {"error": str(e), "timed_out": e.timed_out}
    print(json.dumps(answers))

asyncio.run(main())
"""


@pytest.mark.slow  # a DNS timeout of 1 s
def test_the_resolver_answers_bounded_and_in_words(small_internet: SmallInternet) -> None:
    names = ["pypi.test", "PyPI.test", "mapped.test", "many.test", "nosuch.test", "blackhole.test"]
    done = subprocess.run(
        [*small_internet.enter("host"), sys.executable, "-c", RESOLVE, small_internet.dns, *names],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    answers = json.loads(done.stdout or done.stderr)
    assert answers["pypi.test"] == answers["PyPI.test"] == ["198.51.100.10"]
    assert answers["mapped.test"] == ["198.51.100.10", "::ffff:7f00:1"]  # IPv4 first, then AAAA
    many = answers["many.test"]  # 40 in the table; at most 16, distinct, in the answer's order
    assert len(many) == len(set(many)) == 16
    assert set(many) <= {f"203.0.113.{100 + i}" for i in range(40)}
    assert answers["nosuch.test"] == {"error": "nosuch.test: no such name", "timed_out": False}
    assert answers["blackhole.test"]["timed_out"] is True
    assert "blackhole.test: no nameserver answered" in answers["blackhole.test"]["error"]
