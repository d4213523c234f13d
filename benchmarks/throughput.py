"""Peak exec throughput: `true` run as fast as the system can, `Plan.in_flight` at once, spread
over `Plan.throughput_sandboxes` boxes ("many") and then all in one box ("one").

aviato is driven through the async SDK (`in_flight` tasks on one event loop, as an async
training loop would); the floor is the machine's own fork+exec rate (`FloorSystem.exec_rate`:
posix_spawn and pidfds, no event loop); raw bwrap is one `bwrap` per command, spawned the same
way. The figure is the number of commands that exited 0 per second of the series. Raw bwrap
(a new sandbox per command, `persistent_boxes = False`) is not measured: 64 `bwrap`s at once
spend their time making network namespaces (~14/s here), which is the create figure's matter.
"""

from __future__ import annotations

from typing import Any

from benchmarks._plan import Plan
from benchmarks._system import System
from benchmarks.scenarios import Figure, State, share

SERIES = ("many", "one")


class Throughput(Figure):
    name = "throughput"
    title = "peak execs/s: `true` with many in flight, over many sandboxes, then in one"

    def setup(self, system: System, plan: Plan, state: State) -> None:
        state.data["boxes"] = []
        state.data["measured"] = system.persistent_boxes
        if not system.persistent_boxes:
            return
        for _ in range(plan.throughput_sandboxes):
            state.data["boxes"].append(system.create())
        for key in SERIES:
            state.data[key] = {"ok": 0, "seconds": 0.0, "rounds": []}
        boxes = state.data["boxes"]  # warm: every box has run a command
        system.exec_rate(boxes, ["true"], plan.in_flight, 2 * len(boxes), plan.series_seconds)

    def round(self, system: System, plan: Plan, state: State, index: int, rounds: int) -> None:
        boxes = state.data["boxes"]
        if not boxes:
            return
        count = share(plan.throughput_execs, index, rounds)
        for key, used in (("many", boxes), ("one", boxes[:1])):
            left = plan.series_seconds - state.spent
            if left <= 0:
                state.truncated = True
                return
            rate = system.exec_rate(used, ["true"], plan.in_flight, count, left / 2)
            for error in rate.errors:
                state.errors.add(error)
            series = state.data[key]
            series["ok"] += rate.ok
            series["seconds"] += rate.seconds
            if rate.seconds > 0:
                series["rounds"].append(round(rate.ok / rate.seconds, 1))
            if rate.ok + len(rate.errors) < count:
                state.truncated = True

    def teardown(self, system: System, state: State) -> None:
        for box in state.data.get("boxes", []):
            try:
                system.stop(box)
            except Exception as exc:
                state.stop_errors.add(f"stop: {type(exc).__name__}: {exc}")

    def summarize(self, plan: Plan, state: State) -> dict[str, Any]:
        if not state.data["measured"]:
            return {"not_measured": "a new sandbox per command"}
        out: dict[str, Any] = {
            "in_flight": plan.in_flight,
            "sandboxes": len(state.data["boxes"]),
            "truncated": state.truncated,
        }
        for key in SERIES:
            series = state.data[key]
            seconds = series["seconds"]
            out[key] = {
                "execs": series["ok"],
                "seconds": round(seconds, 3),
                "execs_per_s": round(series["ok"] / seconds, 1) if seconds > 0 else None,
                "rounds_execs_per_s": series["rounds"],
            }
        return out
