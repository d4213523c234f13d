"""The six figures, written once against `System` so that every system does the same work.

A figure has a setup per system (sandboxes it keeps, warm-up runs), timed rounds, a teardown and
a summary. `run_figure` gives the systems turns, round by round, in a rotating order (see
`Plan.rounds`). Every series is bounded twice: by its count (the plan) and by each system's wall
time in the figure (`Plan.series_seconds`; a series cut short says ``"truncated": true`` and how
many runs it made). Failures never stop a series: they are counted in ``errors`` (the first
messages in ``error_examples``); a figure that cannot run at all for a system says ``"failed"``.
"""

from __future__ import annotations

import abc
import asyncio
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from benchmarks._plan import HARNESS, Plan, rl_programs
from benchmarks._stats import (
    Errors,
    MiB,
    latency_summary,
    settle_mem_available,
    tree_pss_bytes,
)
from benchmarks._system import System


def share(total: int, index: int, parts: int) -> int:
    """The size of part `index` when `total` is cut into `parts` near-equal parts."""
    return total * (index + 1) // parts - total * index // parts


@dataclass
class State:
    """One system's progress through one figure."""

    errors: Errors = field(default_factory=Errors)
    stop_errors: Errors = field(default_factory=Errors)
    spent: float = 0.0  # wall time in rounds
    truncated: bool = False
    data: dict[str, Any] = field(default_factory=dict)

    def out_of_time(self, plan: Plan) -> bool:
        return self.spent >= plan.series_seconds


class Figure(abc.ABC):
    name = ""
    title = ""

    def rounds(self, plan: Plan) -> int:
        return plan.rounds

    def setup(self, system: System, plan: Plan, state: State) -> None:  # noqa: B027
        """Untimed preparation (sandboxes to keep, warm-up)."""

    @abc.abstractmethod
    def round(self, system: System, plan: Plan, state: State, index: int, rounds: int) -> None:
        """One timed round: this system's share `index` of `rounds`."""

    def teardown(self, system: System, state: State) -> None:  # noqa: B027
        """Releases what setup kept (untimed)."""

    @abc.abstractmethod
    def summarize(self, plan: Plan, state: State) -> dict[str, Any]: ...


def run_figure(
    figure: Figure, systems: list[System], plan: Plan, log: Callable[[str], None]
) -> dict[str, dict[str, Any]]:
    """Runs `figure` on every system, in rounds; returns each system's summary."""
    states: dict[str, State] = {}
    failed: dict[str, str] = {}
    for system in systems:
        state = State()
        try:
            figure.setup(system, plan, state)
        except Exception as exc:
            failed[system.name] = f"setup: {type(exc).__name__}: {exc}"[:400]
        states[system.name] = state
    rounds = figure.rounds(plan)
    for index in range(rounds):
        order = systems[index % len(systems) :] + systems[: index % len(systems)]
        for system in order:
            state = states[system.name]
            if system.name in failed:
                continue
            if state.out_of_time(plan):
                state.truncated = True
                continue
            time.sleep(plan.pause_seconds)  # let the previous system's background work finish
            t0 = time.perf_counter()
            try:
                figure.round(system, plan, state, index, rounds)
            except Exception as exc:
                failed[system.name] = f"{type(exc).__name__}: {exc}"[:400]
            state.spent += time.perf_counter() - t0
    results: dict[str, dict[str, Any]] = {}
    for system in systems:
        state = states[system.name]
        try:
            figure.teardown(system, state)
        except Exception as exc:
            state.stop_errors.add(exc)
        if system.name in failed:
            result: dict[str, Any] = {"failed": failed[system.name], "errors": 1}
        else:
            result = figure.summarize(plan, state)
            result.setdefault("errors", state.errors.count)
            if state.errors.examples:
                result.setdefault("error_examples", state.errors.examples)
        result["stop_errors"] = state.stop_errors.count
        result["seconds_in_rounds"] = round(state.spent, 2)
        results[system.name] = result
        log(f"  {system.name:<7} {state.spent:6.1f}s  {_brief(result)}")
    return results


def _brief(result: dict[str, Any]) -> str:
    keep = ("p50_ms", "p99_ms", "seconds", "programs_per_s", "per_sandbox_mib", "stop_seconds",
            "warm_mib", "after_mib", "growth", "errors", "failed")  # fmt: skip
    parts = [f"{k}={result[k]}" for k in keep if k in result]
    for sub in ("sync", "async", "small", "large", "many", "one"):
        if isinstance(result.get(sub), dict):
            inner = result[sub]
            picked = {k: inner[k] for k in ("p50_ms", "p99_ms", "write_mb_s", "read_mb_s",
                                            "execs_per_s") if k in inner}  # fmt: skip
            parts.append(f"{sub}={picked}")
    return " ".join(parts)


def _stop_quietly(system: System, box: Any, errors: Errors) -> None:
    if box is None:
        return
    try:
        system.stop(box)
    except Exception as exc:
        errors.add(f"stop: {type(exc).__name__}: {exc}")


async def _astop_all(system: System, boxes: list[Any], errors: Errors) -> float:
    t0 = time.perf_counter()
    done = await asyncio.gather(*(system.astop(b) for b in boxes if b is not None),
                                return_exceptions=True)  # fmt: skip
    for item in done:
        if isinstance(item, BaseException):
            errors.add(f"stop: {type(item).__name__}: {item}")
    return time.perf_counter() - t0


# --- 1. create → first exec -------------------------------------------------------------------


class CreateFirstExec(Figure):
    name = "create"
    title = "create → first exec result, one after another (the stop is not timed)"

    def setup(self, system: System, plan: Plan, state: State) -> None:
        state.data["times"] = []
        state.data["runs"] = 0
        for _ in range(plan.warmup):
            box = None
            try:
                box = system.create()
                system.exec(box, ["true"])
            finally:
                _stop_quietly(system, box, state.stop_errors)

    def round(self, system: System, plan: Plan, state: State, index: int, rounds: int) -> None:
        deadline = time.monotonic() + plan.series_seconds - state.spent
        for _ in range(share(plan.create_runs, index, rounds)):
            if time.monotonic() > deadline:
                state.truncated = True
                return
            state.data["runs"] += 1
            box = None
            t0 = time.perf_counter()
            try:
                box = system.create()
                out = system.exec(box, ["true"])
                elapsed = time.perf_counter() - t0
                if out.code == 0:
                    state.data["times"].append(elapsed)
                else:
                    state.errors.add(f"`true` exited {out.code}: {out.stderr[-200:]!r}")
            except Exception as exc:
                state.errors.add(exc)
            finally:
                _stop_quietly(system, box, state.stop_errors)

    def summarize(self, plan: Plan, state: State) -> dict[str, Any]:
        return {
            **latency_summary(state.data["times"]),
            "runs": state.data["runs"],
            "truncated": state.truncated,
        }


# --- 2. burst ---------------------------------------------------------------------------------


class Burst(Figure):
    name = "burst"
    title = "sandboxes created at once, each running one command, until all results"

    def rounds(self, plan: Plan) -> int:
        return plan.burst_rounds

    def setup(self, system: System, plan: Plan, state: State) -> None:
        state.data["rounds"] = []

    def round(self, system: System, plan: Plan, state: State, index: int, rounds: int) -> None:
        state.data["rounds"].append(asyncio.run(self._burst(system, plan, state)))

    async def _burst(self, system: System, plan: Plan, state: State) -> dict[str, Any]:
        boxes: list[Any] = []
        each: list[float] = []

        async def one(i: int) -> None:
            t0 = time.perf_counter()
            box = await system.acreate()
            boxes.append(box)
            out = await system.aexec(box, ["echo", f"burst-{i}"])
            if out.code != 0 or out.stdout.strip() != f"burst-{i}".encode():
                raise RuntimeError(f"exit {out.code}, stdout {out.stdout[:80]!r}")
            each.append(time.perf_counter() - t0)

        t0 = time.perf_counter()
        tasks = [asyncio.ensure_future(one(i)) for i in range(plan.burst)]
        done, pending = await asyncio.wait(tasks, timeout=plan.series_seconds)
        elapsed = time.perf_counter() - t0
        errors = 0
        for task in pending:
            task.cancel()
            state.errors.add("did not finish within the time bound")
            errors += 1
        for task in done:
            exc = task.exception()
            if exc is not None:
                state.errors.add(exc)
                errors += 1
        await asyncio.gather(*pending, return_exceptions=True)
        stop_seconds = await _astop_all(system, boxes, state.stop_errors)
        return {
            "seconds": round(elapsed, 4),
            "ok": len(each),
            "errors": errors,
            "per_sandbox": latency_summary(each),
            "stop_seconds": round(stop_seconds, 3),
        }

    def summarize(self, plan: Plan, state: State) -> dict[str, Any]:
        rounds = state.data["rounds"]
        seconds = [r["seconds"] for r in rounds]
        return {
            "n": plan.burst,
            "seconds": round(statistics.median(seconds), 4) if seconds else None,
            "rounds_seconds": seconds,
            "ok": sum(r["ok"] for r in rounds),
            "per_sandbox_last_round": rounds[-1]["per_sandbox"] if rounds else None,
            "stop_seconds": rounds[-1]["stop_seconds"] if rounds else None,
            "truncated": state.truncated,
        }


# --- 3. warm exec -----------------------------------------------------------------------------


class WarmExec(Figure):
    name = "exec"
    title = 'warm `exec(["true"])` round trips in one running sandbox, sync API and async API'

    def setup(self, system: System, plan: Plan, state: State) -> None:
        state.data.update(box=None, sync=[], asyn=[], async_errors=Errors())
        state.data["box"] = system.create()
        for _ in range(plan.warmup * 2):
            system.exec(state.data["box"], ["true"])

    def round(self, system: System, plan: Plan, state: State, index: int, rounds: int) -> None:
        box = state.data["box"]
        count = share(plan.exec_runs, index, rounds)
        deadline = time.monotonic() + (plan.series_seconds - state.spent) / 2
        for _ in range(count):
            if time.monotonic() > deadline:
                state.truncated = True
                break
            t0 = time.perf_counter()
            try:
                out = system.exec(box, ["true"])
            except Exception as exc:
                state.errors.add(exc)
                continue
            elapsed = time.perf_counter() - t0
            if out.code == 0:
                state.data["sync"].append(elapsed)
            else:
                state.errors.add(f"`true` exited {out.code}")
        asyncio.run(self._async(system, plan, state, count))

    async def _async(self, system: System, plan: Plan, state: State, count: int) -> None:
        box = state.data["box"]
        errors: Errors = state.data["async_errors"]
        deadline = time.monotonic() + plan.series_seconds - state.spent
        for _ in range(2):  # a new event loop: its first calls are not representative
            await system.aexec(box, ["true"])
        for _ in range(count):
            if time.monotonic() > deadline:
                state.truncated = True
                return
            t0 = time.perf_counter()
            try:
                out = await system.aexec(box, ["true"])
            except Exception as exc:
                errors.add(exc)
                continue
            elapsed = time.perf_counter() - t0
            if out.code == 0:
                state.data["asyn"].append(elapsed)
            else:
                errors.add(f"`true` exited {out.code}")

    def teardown(self, system: System, state: State) -> None:
        _stop_quietly(system, state.data.get("box"), state.stop_errors)

    def summarize(self, plan: Plan, state: State) -> dict[str, Any]:
        async_errors: Errors = state.data["async_errors"]
        return {
            "sync": {**latency_summary(state.data["sync"]), **state.errors.as_dict()},
            "async": {**latency_summary(state.data["asyn"]), **async_errors.as_dict()},
            "errors": state.errors.count + async_errors.count,
            "truncated": state.truncated,
        }


# --- 4. RL reward workload --------------------------------------------------------------------


class RLReward(Figure):
    name = "rl"
    title = "RL reward: sandboxes at once, each scoring short programs fed on stdin"

    def setup(self, system: System, plan: Plan, state: State) -> None:
        async def make() -> list[Any]:
            made = await asyncio.gather(*(system.acreate() for _ in range(plan.rl_sandboxes)),
                                        return_exceptions=True)  # fmt: skip
            boxes = [b for b in made if not isinstance(b, BaseException)]
            for b in made:
                if isinstance(b, BaseException):
                    state.errors.add(f"create: {type(b).__name__}: {b}")
            await asyncio.gather(*(system.aexec(b, ["true"]) for b in boxes))
            return boxes

        state.data["boxes"] = asyncio.run(make())
        state.data["programs"] = [
            rl_programs(i, plan.rl_programs) for i in range(plan.rl_sandboxes)
        ]
        state.data.update(scored=0, attempted=0, seconds=0.0, latencies=[])

    def round(self, system: System, plan: Plan, state: State, index: int, rounds: int) -> None:
        lo = plan.rl_programs * index // rounds
        hi = plan.rl_programs * (index + 1) // rounds
        scored = state.data["scored"]
        t0 = time.perf_counter()
        asyncio.run(self._round(system, plan, state, lo, hi))
        elapsed = time.perf_counter() - t0
        state.data["seconds"] += elapsed
        state.data.setdefault("rounds", []).append(
            round((state.data["scored"] - scored) / elapsed, 1) if elapsed > 0 else None
        )

    async def _round(self, system: System, plan: Plan, state: State, lo: int, hi: int) -> None:
        argv = ["python3", "-c", HARNESS]
        deadline = time.monotonic() + plan.series_seconds - state.spent
        data = state.data

        async def worker(box: Any, programs: list[tuple[bytes, str]]) -> None:
            for src, want in programs[lo:hi]:
                if time.monotonic() > deadline:
                    state.truncated = True
                    return
                data["attempted"] += 1
                t0 = time.perf_counter()
                try:
                    out = await system.aexec(box, argv, stdin=src)
                except Exception as exc:
                    state.errors.add(exc)
                    continue
                data["latencies"].append(time.perf_counter() - t0)
                got = out.stdout.decode(errors="replace").strip()
                if out.code != 0 or got != want:
                    state.errors.add(f"exit {out.code}, score {got!r} (want {want}), "
                                     f"{out.stderr[-200:]!r}")  # fmt: skip
                else:
                    data["scored"] += 1

        await asyncio.gather(*(worker(b, p) for b, p in zip(data["boxes"], data["programs"],
                                                             strict=False)))  # fmt: skip

    def teardown(self, system: System, state: State) -> None:
        asyncio.run(_astop_all(system, state.data.get("boxes", []), state.stop_errors))

    def summarize(self, plan: Plan, state: State) -> dict[str, Any]:
        data = state.data
        seconds = data["seconds"]
        return {
            "sandboxes": len(data["boxes"]),
            "programs": data["scored"],
            "planned": plan.rl_sandboxes * plan.rl_programs,
            "seconds": round(seconds, 3),
            "programs_per_s": round(data["scored"] / seconds, 2) if seconds > 0 else None,
            "rounds_programs_per_s": data.get("rounds", []),
            "per_program": latency_summary(data["latencies"]),
            "truncated": state.truncated,
        }


# --- 5. files ---------------------------------------------------------------------------------


class Files(Figure):
    name = "files"
    title = "file write, then read back, of each size (MB/s of the median run, MB = 10^6 B)"

    def rounds(self, plan: Plan) -> int:
        return plan.file_repeats

    def setup(self, system: System, plan: Plan, state: State) -> None:
        state.data["box"] = system.create()
        system.exec(state.data["box"], ["true"])  # running: measure the transfer only
        for key in ("small", "large"):
            state.data[key] = {"writes": [], "reads": []}

    def round(self, system: System, plan: Plan, state: State, index: int, rounds: int) -> None:
        box = state.data["box"]
        for key, size in (("small", plan.file_small), ("large", plan.file_large)):
            data = os.urandom(size)
            path = f"{system.files_dir()}/blob-{key}"
            try:
                t0 = time.perf_counter()
                system.write_file(box, path, data)
                t1 = time.perf_counter()
                back = system.read_file(box, path)
                t2 = time.perf_counter()
            except Exception as exc:
                state.errors.add(exc)
                continue
            if back != data:
                state.errors.add(f"read back {len(back)} bytes that differ from the {size} written")
                continue
            state.data[key]["writes"].append(t1 - t0)
            state.data[key]["reads"].append(t2 - t1)

    def teardown(self, system: System, state: State) -> None:
        _stop_quietly(system, state.data.get("box"), state.stop_errors)

    def summarize(self, plan: Plan, state: State) -> dict[str, Any]:
        out: dict[str, Any] = {"truncated": state.truncated}
        for key, size in (("small", plan.file_small), ("large", plan.file_large)):
            writes, reads = state.data[key]["writes"], state.data[key]["reads"]
            out[key] = {
                "bytes": size,
                "runs": len(writes),
                "write_mb_s": _mb_s(size, writes),
                "read_mb_s": _mb_s(size, reads),
                "write_ms": round(statistics.median(writes) * 1000, 2) if writes else None,
                "read_ms": round(statistics.median(reads) * 1000, 2) if reads else None,
            }
        return out


def _mb_s(size: int, times: list[float]) -> float | None:
    if not times:
        return None
    return round(size / 1e6 / statistics.median(times), 1)


# --- 6. density -------------------------------------------------------------------------------


class Density(Figure):
    name = "density"
    title = "idle sandboxes: MemAvailable's fall per sandbox, then the time to stop them all"

    def rounds(self, plan: Plan) -> int:
        return 1

    def round(self, system: System, plan: Plan, state: State, index: int, rounds: int) -> None:
        """Whatever the system runs besides its sandboxes (aviato's service, dockerd) was
        started before the first reading, so only its growth counts. MemAvailable is read after
        `sync` and a pause, before, with the sandboxes, and after stopping them: the rise at the
        stop is a second estimate, which tells how much other work on the machine moved it."""
        service_rss = getattr(system, "service_rss", None)
        rss_before = service_rss() if service_rss else None
        before, spread_before = settle_mem_available(
            plan.settle_seconds, plan.settle_limit_seconds, plan.settle_reads, plan.settle_interval
        )
        t0 = time.perf_counter()
        boxes, start_errors = system.start_idle(plan.idle, plan.density_seconds)
        start_seconds = time.perf_counter() - t0
        with_boxes, spread_with = settle_mem_available(
            plan.settle_seconds, plan.settle_limit_seconds, plan.settle_reads, plan.settle_interval
        )
        rss_after = service_rss() if service_rss else None
        pss, processes = tree_pss_bytes(system.idle_pids(boxes))
        t1 = time.perf_counter()
        stop_errors = system.stop_idle(boxes)
        stop_seconds = time.perf_counter() - t1
        after, spread_after = settle_mem_available(
            plan.settle_seconds, plan.settle_limit_seconds, plan.settle_reads, plan.settle_interval
        )
        n = len(boxes)
        for _ in range(start_errors):
            state.errors.add("an idle sandbox did not start")
        for _ in range(stop_errors):
            state.stop_errors.add("an idle sandbox did not stop")
        state.data = {
            "n": n,
            "planned": plan.idle,
            "per_sandbox_mib": round((before - with_boxes) / n / MiB, 3) if n else None,
            "rise_at_stop_per_sandbox_mib": round((after - with_boxes) / n / MiB, 3) if n else None,
            "mem_available_fall_mib": round((before - with_boxes) / MiB, 1),
            "pss_per_sandbox_mib": round(pss / n / MiB, 3) if n and pss else None,
            "processes_per_sandbox": round(processes / n, 2) if n and processes else None,
            "start_seconds": round(start_seconds, 2),
            "stop_seconds": round(stop_seconds, 3),
            "mem_spread_mib": [spread_before, spread_with, spread_after],
            "truncated": n < plan.idle,
        }
        if rss_before is not None and rss_after is not None and n:
            growth = (rss_after - rss_before) / n / 1024
            state.data["service_rss_growth_per_sandbox_kib"] = round(growth, 1)

    def summarize(self, plan: Plan, state: State) -> dict[str, Any]:
        return dict(state.data)


FIGURES: dict[str, Figure] = {
    f.name: f for f in (CreateFirstExec(), Burst(), WarmExec(), RLReward(), Files(), Density())
}
