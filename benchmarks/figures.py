"""Every figure `python -m benchmarks` runs, in order: the six of `scenarios.py`, then create
from a warm pool (`warm_pool.py`), peak throughput (`throughput.py`) and the service's memory
(`service_memory.py`, last: it makes 10,000 sandboxes)."""

from __future__ import annotations

from benchmarks.scenarios import FIGURES as SCENARIOS
from benchmarks.scenarios import Figure
from benchmarks.service_memory import ServiceMemory
from benchmarks.throughput import Throughput
from benchmarks.warm_pool import WarmPoolCreate

FIGURES: dict[str, Figure] = {
    **SCENARIOS,
    **{f.name: f for f in (WarmPoolCreate(), Throughput(), ServiceMemory())},
}
