"""Service memory: the aviato service's resident size after `Plan.memory_warmup` sandboxes, and
again after `Plan.memory_sandboxes` more, each created, given one command and stopped
(`Plan.memory_parallel` at a time, through the async SDK). The figure is the ratio of the two
sizes (the goal: within 10%); the sizes themselves are reported beside it.

Only a system with a service of its own has this figure (`service_rss`: aviato on this
machine); for the others, and for a remote service, it says why it has none.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from benchmarks._plan import Plan
from benchmarks._stats import MiB
from benchmarks._system import System
from benchmarks.scenarios import Figure, State


class ServiceMemory(Figure):
    name = "memory"
    title = "the service's resident memory after a warm-up, then after many sandboxes"

    def rounds(self, plan: Plan) -> int:
        return 1

    def setup(self, system: System, plan: Plan, state: State) -> None:
        rss: Callable[[], int | None] | None = getattr(system, "service_rss", None)
        state.data["rss"] = rss if rss is not None and rss() is not None else None
        if state.data["rss"] is None:
            return
        self._wave(system, plan, plan.memory_warmup, state)
        time.sleep(plan.memory_settle_seconds)
        state.data["warm"] = state.data["rss"]()

    def round(self, system: System, plan: Plan, state: State, index: int, rounds: int) -> None:
        if state.data["rss"] is None:
            return
        t0 = time.perf_counter()
        state.data["made"] = self._wave(system, plan, plan.memory_sandboxes, state)
        state.data["seconds"] = time.perf_counter() - t0
        time.sleep(plan.memory_settle_seconds)
        state.data["after"] = state.data["rss"]()

    @staticmethod
    def _wave(system: System, plan: Plan, count: int, state: State) -> int:
        """`count` sandboxes, each created, given `true` and stopped; how many ran it."""
        made = 0
        deadline = time.monotonic() + plan.memory_seconds

        async def one() -> None:
            nonlocal made
            box = await system.acreate()
            try:
                out = await system.aexec(box, ["true"])
                if out.code != 0:
                    raise RuntimeError(f"`true` exited {out.code}")
                made += 1
            finally:
                await system.astop(box)

        async def run() -> None:
            left = count

            async def worker() -> None:
                nonlocal left
                while left > 0:
                    if time.monotonic() > deadline:
                        state.truncated = True
                        return
                    left -= 1
                    try:
                        await one()
                    except Exception as exc:
                        state.errors.add(exc)

            await asyncio.gather(*(worker() for _ in range(plan.memory_parallel)))

        asyncio.run(run())
        return made

    def summarize(self, plan: Plan, state: State) -> dict[str, Any]:
        if state.data.get("rss") is None:
            return {"not_measured": "no service of its own on this machine"}
        warm, after = state.data.get("warm"), state.data.get("after")
        return {
            "warmup_sandboxes": plan.memory_warmup,
            "sandboxes": state.data.get("made", 0),
            "seconds": round(state.data.get("seconds", 0.0), 1),
            "warm_mib": round(warm / MiB, 1) if warm else None,
            "after_mib": round(after / MiB, 1) if after else None,
            "growth": round(after / warm, 3) if warm and after else None,
            "truncated": state.truncated,
        }
