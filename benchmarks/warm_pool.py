"""Figure `warm_pool`: create → first exec result when the service keeps a warm pool (issue 19:
"<= 3 ms when the service keeps a pool of ready sandboxes").

For aviato, a second local service of its own (`python -m aviato.server --warm-pool 4`, in a
state directory of its own) serves the creates, so that the `create` figure keeps measuring
creates without a pool; a create names no image, limits or anything else, which is the shape the
pool keeps (server/warm_pool.py). Every system gets the same untimed pause before each timed
create (`REFILL_GAP_SECONDS`), which is what lets the pool refill: creates that come faster than
the pool refills (about one per 0.2 s + a sandbox's start, in the background) find it empty and
are created fresh, as the `create` figure measures. The result says how many creates the pool
served (`pool_served`), read from the service's status. Other systems do exactly what `create`
does (their create has no pool), so the ratio to raw bwrap reads as in that figure.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks._plan import Plan
from benchmarks._stats import latency_summary
from benchmarks._system import Skip, System
from benchmarks.scenarios import Figure, State

POOL_SIZE = 4
REFILL_GAP_SECONDS = 0.3
READY_SECONDS = 60.0


class PooledService:
    """`python -m aviato.server --warm-pool N` on a state directory of its own."""

    def __init__(self, size: int) -> None:
        self.state_dir = tempfile.mkdtemp(prefix="avw", dir="/tmp")
        self.url = f"unix://{self.state_dir}/aviato.sock"
        log = open(Path(self.state_dir) / "server.log", "ab")  # noqa: SIM115 - handed over
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "aviato.server", "--state-dir", self.state_dir,
             "--warm-pool", str(size)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        log.close()
        self.size = size

    def pool_text(self) -> str:
        import aviato

        info = aviato.server_info(self.url, start_local=False, timeout_seconds=10)
        return str(info.warm_pool)

    def wait_ready(self) -> None:
        deadline = time.monotonic() + READY_SECONDS
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise Skip(f"the pooled service exited {self._proc.returncode}")
            if os.path.exists(self.url[len("unix://") :]):
                try:
                    if self.pool_text().startswith(f"{self.size} of {self.size} ready"):
                        return
                except Exception:  # not answering yet
                    pass
            time.sleep(0.1)
        raise Skip(f"the pooled service's pool was not ready within {READY_SECONDS:g} s")

    def served(self) -> int | None:
        match = re.search(r"(\d+) creates served", self.pool_text())
        return int(match.group(1)) if match else None

    def close(self) -> None:
        if self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)  # its members end with it
            try:
                self._proc.wait(30)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        shutil.rmtree(self.state_dir, ignore_errors=True)


def _share(total: int, index: int, parts: int) -> int:
    return total * (index + 1) // parts - total * index // parts


class WarmPoolCreate(Figure):
    """The figure (registered in benchmarks/figures.py)."""

    name = "warm_pool"
    title = (
        f"create → first exec result with a warm pool of {POOL_SIZE} (aviato `--warm-pool "
        f"{POOL_SIZE}`), {REFILL_GAP_SECONDS:g} s untimed between creates"
    )

    def rounds(self, plan: Plan) -> int:
        return plan.rounds

    def _create(self, system: System, state: State) -> Any:
        service: PooledService | None = state.data.get("service")
        if service is None:
            return system.create()
        from aviato import Sandbox

        return Sandbox.run(base_url=service.url)

    def _one(self, system: System, state: State) -> float | None:
        box = None
        t0 = time.perf_counter()
        try:
            box = self._create(system, state)
            out = system.exec(box, ["true"])
            elapsed = time.perf_counter() - t0
            if out.code != 0:
                state.errors.add(f"`true` exited {out.code}: {out.stderr[-200:]!r}")
                return None
            return elapsed
        except Exception as exc:
            state.errors.add(exc)
            return None
        finally:
            if box is not None:
                try:
                    system.stop(box)
                except Exception as exc:
                    state.stop_errors.add(exc)

    def setup(self, system: System, plan: Plan, state: State) -> None:
        state.data.update(times=[], runs=0)
        if system.name == "aviato":
            if getattr(system, "base_url", ""):
                raise Skip("the warm pool figure needs the local service")
            service = PooledService(POOL_SIZE)
            state.data["service"] = service
            service.wait_ready()
        for _ in range(plan.warmup):
            self._refill_gap(state)
            self._one(system, state)

    def round(self, system: System, plan: Plan, state: State, index: int, rounds: int) -> None:
        deadline = time.monotonic() + plan.series_seconds - state.spent
        for _ in range(_share(plan.create_runs, index, rounds)):
            if time.monotonic() > deadline:
                state.truncated = True
                return
            self._refill_gap(state)
            state.data["runs"] += 1
            elapsed = self._one(system, state)
            if elapsed is not None:
                state.data["times"].append(elapsed)

    @staticmethod
    def _refill_gap(state: State) -> None:
        """The untimed pause that lets the pool refill (the references have no pool)."""
        if state.data.get("service") is not None:
            time.sleep(REFILL_GAP_SECONDS)

    def teardown(self, system: System, state: State) -> None:
        service: PooledService | None = state.data.get("service")
        if service is not None:
            try:
                state.data["pool_served"] = service.served()
            finally:
                service.close()

    def summarize(self, plan: Plan, state: State) -> dict[str, Any]:
        result: dict[str, Any] = {
            **latency_summary(state.data["times"]),
            "runs": state.data["runs"],
            "truncated": state.truncated,
            "refill_gap_seconds": REFILL_GAP_SECONDS,
        }
        if "pool_served" in state.data:
            result["pool_size"] = POOL_SIZE
            result["pool_served"] = state.data["pool_served"]
        return result
