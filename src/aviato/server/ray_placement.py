"""`RayPlacement`: sandboxes on the nodes of an existing Ray cluster.

The control plane joins the cluster as a driver (`ray.init(address=...)`) and watches
`ray.nodes()` every `POLL_SECONDS`:
- a live node that offers CPUs (`Resources["CPU"] > 0`; give the head `--num-cpus=0` to keep
  sandboxes off it) gets a node-host actor: detached, named `aviato-nodehost-<node id>` in the
  Ray namespace of the service, pinned with `NodeAffinitySchedulingStrategy(soft=False)`,
  `num_cpus=0`, restarted by Ray on its node. An existing one (after a restart of the control
  plane) is reused (`get_if_exists`), and reports the sandboxes and reservations it holds;
- a node the GCS declares dead is marked lost: its sandboxes end FAILED "node lost";
- a live node whose node host is gone for good (Ray reports the actor DEAD: killed, or out of
  restarts; or it has not answered for longer than the node lease plus NODE_HOST_MARGIN_SECONDS)
  has its node host marked lost: its sandboxes end FAILED "node host lost", and a new node host
  is started there, which kills what those sandboxes left running (so that none runs unseen).

Accounting (why not placement groups): the placement keeps per node the cpu and memory its own
sandboxes reserved and places a sandbox on the live node with the most memory left among those
whose Ray totals (`CPU`, `memory`) minus these reservations fit the request. That is a dict
lookup on the create path, where a placement group costs a GCS round trip (2 ms measured) and a
second object to clean up. The price: the placement does not see other Ray workloads on the same
nodes; a cluster shared with other jobs should leave aviato's nodes alone (or set their Ray
resources to what aviato may use). A sandbox without a memory limit reserves the service's default
limit, one without a cpu limit reserves no cpu.

A sandbox that fits nowhere stays PENDING, its reason saying what it needs and what the nodes
have; it is placed as soon as room frees or a node joins, and fails after `placement_timeout`.
`node_selector` pairs must all be among the node's Ray labels, where "aviato.node" also matches
the node id or hostname.

Snapshots (docs/state.md, "Under Ray"): a sandbox started from a snapshot goes, when one of the
nodes that hold it (the node it was taken on, or one it was copied to) matches and has room,
to that node (the same choice, asked first with `aviato.node=<holder>` added to its selector);
else to any node, which first copies the snapshot from a holder (`bring_snapshot`,
cluster/remote_snapshots.py) and keeps the copy.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from aviato._private import private_dir
from aviato.cluster import codec
from aviato.cluster.remote import NODE_HOST_LOST, NodeRuntime
from aviato.cluster.remote_snapshots import copy_snapshot
from aviato.egress.host import EgressHost
from aviato.runtime.base import MainExit, Runtime, SandboxConfig, SandboxHandle, SandboxRuntimeError
from aviato.runtime.volume_store import VolumeHost
from aviato.server.config import ServerConfig
from aviato.server.placement import NodeHealth, Placement, UnknownNode
from aviato.v1.quantities import format_bytes

__all__ = ["PlacementTimeout", "RayPlacement", "RayUnavailable"]

log = logging.getLogger("aviato.cluster")

POLL_SECONDS = 0.5
NODE_HOST_START_SECONDS = 60.0
# A node host that has not answered for the node lease plus this long is given up on.
NODE_HOST_MARGIN_SECONDS = 5.0
PROBE_SECONDS = 2.0
NODE_KEY = "aviato.node"


class PlacementTimeout(SandboxRuntimeError):
    code = "RESOURCE_EXHAUSTED"


class RayUnavailable(RuntimeError):
    """Ray is not installed or the cluster cannot be joined."""


@dataclass
class _Node:
    id: str
    hostname: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    cpu: float = 0.0
    memory: float = 0.0
    alive: bool = True
    runtime: NodeRuntime | None = None
    held: dict[str, tuple[float, float]] = field(default_factory=dict)
    starting: asyncio.Task[None] | None = None
    # Sandboxes of a node host given up on: the next node host kills what is left of them.
    orphans: set[str] = field(default_factory=set)
    checking: bool = False
    # Why the node is not used although it lives (its node host speaks another protocol).
    refused: str = ""

    def free(self) -> tuple[float, float]:
        cpu = self.cpu - sum(c for c, _ in self.held.values())
        memory = self.memory - sum(m for _, m in self.held.values())
        return cpu, memory

    def matches(self, selector: tuple[tuple[str, str], ...]) -> bool:
        for key, value in selector:
            if key == NODE_KEY and value in (self.id, self.hostname):
                continue
            if self.labels.get(key) != value:
                return False
        return True


class _Unplaced(Runtime):
    """The runtime of a sandbox not placed yet: nothing to create, attach or clean."""

    async def create(self, config: SandboxConfig) -> SandboxHandle:
        raise SandboxRuntimeError("the sandbox has no node yet")

    async def attach(self, sandbox_id: str) -> SandboxHandle | MainExit:
        return MainExit(-1, 0, time.time_ns(), "lost")

    async def cleanup(self, sandbox_id: str) -> None:
        return None

    def list_present(self) -> list[str]:
        return []

    def describe(self) -> dict[str, str]:
        return {}

    async def close(self) -> None:
        return None


def node_host_args(config: ServerConfig, node_id: str) -> tuple[Any, ...]:
    """The arguments of the node host on `node_id`: where its state lives, its lease, its
    bounds, what its image pulls may do (the operator's insecure registries and pull
    limits hold on every node, as on a local service), the bound on all of its sandboxes
    together (the operator's values, or where none was given, each node's own default).

    A node host that already runs keeps the arguments it was started with; what must follow
    the control plane's options at each of its starts is sent after `start` (the host
    directories sandboxes may mount and the shared volume directory: `configure_mounts`)."""
    return (
        os.path.join(config.ray_node_state_dir, node_id[:16]),
        config.ray_node_lease_seconds,
        config.max_sandboxes or 1_000_000,
        config.default_memory_bytes,
        config.insecure_registries,
        config.image_limits(),
        config.cgroup_parent,
        config.cgroup_memory_bytes,
        config.cgroup_pids,
        config.egress_dns,
    )


class RayPlacement(Placement):
    name = "ray"

    def __init__(self, config: ServerConfig) -> None:
        self._config = config
        self._address = config.ray_address
        self._namespace = config.ray_namespace
        self._node_state_dir = config.ray_node_state_dir
        self._log_dir = config.state_dir / "cluster-logs"
        self._nodes: dict[str, _Node] = {}
        self._unplaced = _Unplaced()
        self._room = asyncio.Event()
        self._watcher: asyncio.Task[None] | None = None
        self._ray: Any = None

    # --- joining the cluster ---

    async def start(self) -> None:
        try:
            import ray
        except ImportError as e:
            raise RayUnavailable("the ray placement needs Ray: pip install 'aviato[ray]'") from e
        self._ray = ray
        private_dir(self._log_dir)
        try:
            await asyncio.to_thread(
                ray.init,
                address=self._address or None,
                namespace=self._namespace,
                log_to_driver=False,
                logging_level=logging.WARNING,
                configure_logging=False,
            )
        except Exception as e:
            raise RayUnavailable(f"cannot join the Ray cluster at {self._address!r}: {e}") from e
        await self._refresh()
        starting = [n.starting for n in self._nodes.values() if n.starting is not None]
        if starting:
            await asyncio.wait(starting, timeout=NODE_HOST_START_SECONDS)
        log.info(
            "joined the Ray cluster at %s: %d nodes with a node host",
            self._address, sum(1 for n in self._nodes.values() if n.runtime is not None),
        )  # fmt: skip
        self._watcher = asyncio.create_task(self._watch_forever(), name="aviato-ray-nodes")

    async def _watch_forever(self) -> None:
        while True:
            await asyncio.sleep(POLL_SECONDS)
            try:
                await self._refresh()
            except Exception:
                log.exception("reading the Ray cluster's nodes failed")

    async def _refresh(self) -> None:
        infos: list[dict[str, Any]] = await asyncio.to_thread(self._ray.nodes)
        for info in infos:
            node_id = str(info.get("NodeID", ""))
            resources = info.get("Resources") or {}
            alive = bool(info.get("Alive"))
            node = self._nodes.get(node_id)
            if node is None:
                if not alive or float(resources.get("CPU", 0)) <= 0:
                    continue
                node = self._nodes[node_id] = _Node(node_id)
            node.hostname = str(info.get("NodeManagerHostname", ""))
            node.labels = {str(k): str(v) for k, v in (info.get("Labels") or {}).items()}
            if alive:
                node.cpu = float(resources.get("CPU", 0))
                node.memory = float(resources.get("memory", 0))
            if node.alive and not alive:
                self._lose(node)
            elif alive and node.runtime is None and node.starting is None:
                node.starting = asyncio.create_task(self._start_host(node))
            elif alive and node.runtime is not None and not node.checking:
                since = node.runtime.link.unanswered_since
                if since is not None and not node.runtime.link.lost:
                    node.checking = True
                    try:
                        await self._check_host(node, node.runtime, since)
                    finally:
                        node.checking = False

    async def _check_host(self, node: _Node, runtime: NodeRuntime, since: float) -> None:
        """A node host that failed a call: given up on when Ray says it is dead for good (it
        restarts a crashed one by itself) or when it has been silent for too long."""
        state = await asyncio.to_thread(self._actor_state, runtime.link.actor)
        silent = time.monotonic() - since
        bound = self._config.ray_node_lease_seconds + NODE_HOST_MARGIN_SECONDS
        if state == "DEAD":
            if not await asyncio.to_thread(self._node_alive, node.id):
                return  # the node itself died: the next poll marks it lost ("node lost")
            why = "Ray reports its actor dead and will not restart it"
        elif silent > bound and not await runtime.link.probe(PROBE_SECONDS):
            # (a call pending since the failure, such as wait_exit, cannot tell that the host
            # answers again: the probe does)
            why = f"it has not answered for {silent:.0f} s (state {state or 'unknown'})"
        else:
            return
        if (
            node.runtime is not runtime
            or runtime.link.lost
            or runtime.link.unanswered_since is None
        ):
            return  # it answered meanwhile, or was replaced
        log.warning(
            "node host on %s (%s) is lost: %s; its sandboxes fail, a new node host starts",
            node.id, node.hostname, why,
        )  # fmt: skip
        node.orphans.update(runtime.sandbox_ids())
        runtime.link.mark_lost(NODE_HOST_LOST)
        node.runtime = None  # the next poll starts a new node host (same name, new actor)
        self._room.set()

    def _node_alive(self, node_id: str) -> bool:
        infos: list[dict[str, Any]] = self._ray.nodes()
        return any(str(i.get("NodeID")) == node_id and i.get("Alive") for i in infos)

    def _actor_state(self, actor: Any) -> str:
        """The GCS's state of an actor (ALIVE, RESTARTING, DEAD, ...), '' when unknown.
        Ray has no public call for this without the dashboard; this is the GCS actor table."""
        try:
            from ray._private import state

            info = state.actors(actor_id=actor._actor_id.hex())
            return str(info.get("State", "")) if info else ""
        except Exception as e:
            log.debug("reading an actor's state failed: %s", e)
            return ""

    def _lose(self, node: _Node) -> None:
        log.warning("node %s (%s) left the cluster: its sandboxes are lost", node.id, node.hostname)
        node.alive = False
        if node.runtime is not None:
            node.runtime.link.mark_lost()
        if node.starting is not None:
            node.starting.cancel()
        self._room.set()

    async def _start_host(self, node: _Node) -> None:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        from aviato.cluster.nodehost import NodeHost

        try:
            actor = (
                self._ray.remote(NodeHost)
                .options(
                    name=f"aviato-nodehost-{node.id}",
                    namespace=self._namespace,
                    lifetime="detached",
                    get_if_exists=True,
                    num_cpus=0,
                    max_restarts=-1,
                    max_task_retries=0,
                    max_concurrency=10_000,
                    scheduling_strategy=NodeAffinitySchedulingStrategy(node.id, soft=False),
                )
                .remote(*node_host_args(self._config, node.id))
            )
            facts: dict[str, Any] = await asyncio.wait_for(
                _await(actor.start.remote()), NODE_HOST_START_SECONDS
            )
            codec.check_version(facts.get("protocol"), node.id)
            await _await(
                actor.configure_mounts.remote(
                    list(self._config.allow_host_mounts), self._config.ray_volume_dir
                )
            )
            if node.orphans:
                await self._kill_orphans(node, actor, facts)
        except asyncio.CancelledError:
            raise
        except codec.ProtocolMismatch as e:
            if not node.refused:
                log.error("node %s is not used: %s", node.id, e)
            node.refused = str(e)
            await asyncio.sleep(NODE_HOST_START_SECONDS)  # asked again now and then
            node.starting = None
            return
        except Exception as e:
            log.warning("node host on %s did not start: %s", node.id, e)
            await asyncio.sleep(POLL_SECONDS * 4)
            node.starting = None
            return
        for sandbox_id, (cpu, memory) in facts.get("holdings", {}).items():
            if str(sandbox_id) not in node.orphans:
                node.held[str(sandbox_id)] = (float(cpu), float(memory))
        node.orphans.clear()
        node.refused = ""
        node.runtime = NodeRuntime(
            node.id,
            actor,
            facts,
            self._log_dir,
            holding=lambda sid: node.held.get(sid, (0.0, 0.0)),
            release=lambda sid: self._release(node, sid),
            bring_snapshot=self._bring_snapshot,
        )
        node.starting = None
        self._room.set()
        log.info(
            "node host ready on %s (%s), pid %s, exec channel %s",
            node.id, node.hostname, facts.get("pid"), facts.get("exec_address") or "none (Ray)",
        )  # fmt: skip

    async def _kill_orphans(self, node: _Node, actor: Any, facts: dict[str, Any]) -> None:
        """Kills and removes, through a new node host, the sandboxes the lost one left here
        (they run in their own sessions and outlived it; the service has marked them FAILED)."""
        left = [str(s) for s in facts.get("present", []) if str(s) in node.orphans]
        for sandbox_id in left:
            with contextlib.suppress(Exception):
                await actor.kill.remote(sandbox_id)
            with contextlib.suppress(Exception):
                await actor.cleanup.remote(sandbox_id)
        if left:
            log.info("node host on %s killed %d sandboxes of the lost one", node.id, len(left))
        facts["present"] = [s for s in facts.get("present", []) if str(s) not in node.orphans]

    async def _bring_snapshot(self, snapshot_id: str, target: NodeRuntime) -> None:
        """Copies a snapshot to `target`'s node from a live node that holds it (the first that
        succeeds, most free memory first)."""
        holders = sorted(
            (n for n in self._nodes.values()
             if n.alive and n.runtime is not None and n.runtime is not target
             and n.runtime.holds_snapshot(snapshot_id)),
            key=lambda n: -n.free()[1],
        )  # fmt: skip
        if not holders:
            raise SandboxRuntimeError(
                f"snapshot {snapshot_id} is on no node of the cluster that answers (its node "
                "left or is restarting); try again once it is back"
            )
        failure: SandboxRuntimeError | None = None
        for holder in holders:
            assert holder.runtime is not None
            try:
                await copy_snapshot(holder.runtime.link, target.link, snapshot_id)
                return
            except SandboxRuntimeError as e:
                log.warning("copying snapshot %s from %s failed: %s", snapshot_id, holder.id, e)
                failure = e
        assert failure is not None
        raise failure

    def _choose_near_snapshot(self, config: SandboxConfig) -> _Node | str:
        """`choose`, asked first for a node that holds the sandbox's snapshot."""
        if config.snapshot_id:
            for node in self._nodes.values():
                if node.runtime is None or not node.runtime.holds_snapshot(config.snapshot_id):
                    continue
                pinned = (*config.node_selector, (NODE_KEY, node.id))
                chosen = self.choose(replace(config, node_selector=pinned))
                if isinstance(chosen, _Node):
                    return chosen
        return self.choose(config)

    def _release(self, node: _Node, sandbox_id: str) -> None:
        if node.held.pop(sandbox_id, None) is not None:
            self._room.set()

    # --- placing ---

    def runtime_for_new(self, config: SandboxConfig) -> tuple[str, Runtime]:
        return "", self._unplaced  # chosen in place(), while the sandbox is PENDING

    def request_of(self, config: SandboxConfig) -> tuple[float, float]:
        """(cpu, memory bytes) a sandbox reserves on its node."""
        cpu = (config.cpu_millis or 0) / 1000  # no cpu limit reserves no cpu
        memory = float(config.memory_bytes)
        return cpu, memory

    def choose(self, config: SandboxConfig) -> _Node | str:
        """The node for the sandbox (its resources then held), or why there is none."""
        cpu, memory = self.request_of(config)
        ready = [n for n in self._nodes.values() if n.alive and n.runtime is not None]
        matching = [n for n in ready if n.matches(config.node_selector)]
        if not matching:
            wanted = ", ".join(f"{k}={v}" for k, v in config.node_selector)
            return f"no ready node matches node_selector {{{wanted}}} ({len(ready)} ready nodes)"
        fitting = [n for n in matching if _fits(n.free(), cpu, memory)]
        if fitting:
            best = max(fitting, key=lambda n: n.free()[1])
            best.held[config.sandbox_id] = (cpu, memory)
            return best
        room = "; ".join(
            f"{n.id[:12]}: cpu {n.free()[0]:g} memory {format_bytes(int(max(n.free()[1], 0)))}"
            for n in sorted(matching, key=lambda n: -n.free()[1])[:4]
        )
        return (
            f"waiting for room: needs cpu {cpu:g} memory {format_bytes(int(memory))}, "
            f"free on {len(matching)} matching nodes: {room}"
        )

    async def place(
        self,
        config: SandboxConfig,
        waiting: Callable[[str], None],
        stopped: Callable[[], bool],
    ) -> tuple[str, Runtime] | None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._config.placement_timeout_seconds
        while True:
            if stopped():
                return None
            self._room.clear()
            chosen = self._choose_near_snapshot(config)
            if isinstance(chosen, _Node):
                assert chosen.runtime is not None
                return chosen.id, chosen.runtime
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise PlacementTimeout(
                    f"not placed within {self._config.placement_timeout_seconds:g} s: {chosen}"
                )
            waiting(chosen)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._room.wait(), min(remaining, POLL_SECONDS))

    # --- the Placement interface ---

    def runtime_of(self, node: str) -> Runtime:
        if not node:  # a sandbox that was still waiting for a node
            return self._unplaced
        found = self._nodes.get(node)
        if found is None or found.runtime is None:
            raise UnknownNode(node)
        return found.runtime

    def egress(self, node: str) -> EgressHost:
        found = self._nodes.get(node)
        if found is None or found.runtime is None:
            raise UnknownNode(node)
        return found.runtime.egress

    def nodes(self) -> dict[str, Runtime]:
        return {n.id: n.runtime for n in self._nodes.values() if n.runtime is not None}

    def volume_host(self, node: str) -> VolumeHost | None:
        found = self._nodes.get(node)
        if found is None or found.runtime is None or not found.alive:
            return None
        return found.runtime.volumes

    async def refresh_usage(self) -> None:
        """Every live node's sandboxes' readings, one call per node, all nodes at once."""
        readers = [
            n.runtime.usage.refresh(n.runtime.sandbox_ids())
            for n in self._nodes.values()
            if n.alive and n.runtime is not None
        ]
        await asyncio.gather(*readers)

    def health(self) -> list[NodeHealth]:
        return [
            NodeHealth(
                n.id,
                n.hostname,
                "refused"
                if n.refused
                else "lost"
                if not n.alive or (n.runtime is not None and n.runtime.link.lost)
                else "ready"
                if n.runtime is not None
                else "starting",
                n.cpu,
                n.memory,
                sum(c for c, _ in n.held.values()),
                sum(m for _, m in n.held.values()),
                len(n.held),
                n.refused,
            )
            for n in self._nodes.values()
        ]

    def keep_log(self, node: str, sandbox_id: str, into: Path) -> None:
        # The control plane's copy of the node's log (remote.py), kept whatever became of the
        # node.
        with contextlib.suppress(FileNotFoundError):
            os.replace(self._log_dir / f"{sandbox_id}.log", into)

    async def close(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(BaseException):
                await self._watcher
        for node in self._nodes.values():
            if node.starting is not None:
                node.starting.cancel()
        await super().close()
        if self._ray is not None:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(self._ray.shutdown)


async def _await(ref: Any) -> Any:
    return await ref


def _fits(free: tuple[float, float], cpu: float, memory: float) -> bool:
    return free[0] + 1e-9 >= cpu and free[1] + 1e-9 >= memory
