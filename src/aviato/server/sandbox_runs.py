"""Running sandboxes: the live map, driving a new sandbox to RUNNING, watching its end, stops,
and the deadline each running sandbox is given (the lifecycle's core; see `lifecycle`).

A new sandbox's task goes PENDING (placed, its image pulled) → CREATING (`runtime.create`) →
RUNNING (its deadline given first) and then waits for its end; `_finish` makes it terminal
exactly once: record, waiters, log kept aside, runtime cleanup.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from aviato._private import private_dir
from aviato.egress.host import EgressHost
from aviato.runtime.base import (
    MainExit,
    Runtime,
    SandboxGone,
    SandboxHandle,
    SandboxRuntimeError,
)
from aviato.runtime.host_mounts import HostMounts
from aviato.server import metrics
from aviato.server.admission import Admission
from aviato.server.config import ServerConfig
from aviato.server.errors import SandboxNotFound, ServiceError
from aviato.server.placement import Placement, UnknownNode
from aviato.server.port_forward import FLUSH_SECONDS, PortForwarder
from aviato.server.records import (
    SandboxRecord,
    SandboxStatus,
)
from aviato.server.registry import Registry
from aviato.server.sandbox_states import (
    LeaseState,
    LiveSandbox,
    classify_exit,
    status_name,
)
from aviato.server.secret_store import KEY_FILE, SecretStore
from aviato.server.volumes import Volumes
from aviato.server.warm_pool import WarmPool

__all__ = ["SandboxRuns"]

log = logging.getLogger("aviato.server.lifecycle")

PENDING = SandboxStatus.PENDING
CREATING = SandboxStatus.CREATING
RUNNING = SandboxStatus.RUNNING
FAILED = SandboxStatus.FAILED
TERMINATED = SandboxStatus.TERMINATED
# How long an ended sandbox's egress may take to close (a remote node's answer).
EGRESS_CLOSE_SECONDS = 10.0


class SandboxRuns:
    """The sandboxes of the service from creation to their end (the lifecycle's core state)."""

    def __init__(self, registry: Registry, placement: Placement, config: ServerConfig) -> None:
        self._registry = registry
        self._placement = placement
        self._config = config
        self._live: dict[str, LiveSandbox] = {}
        self._by_request: dict[tuple[str, str], LiveSandbox] = {}
        self._leases: dict[tuple[str, str], LeaseState] = {}
        self._admission = Admission(config, registry)
        self._background: set[asyncio.Task[None]] = set()
        self._cleanups: dict[str, asyncio.Task[None]] = {}  # at most one per sandbox
        self._deleted_listeners: list[Callable[[str], None]] = []  # see Lifecycle.when_deleted
        self._reaper: asyncio.Task[None] | None = None
        self._closing = False
        self._ports = PortForwarder()
        self._network_change = asyncio.Lock()  # one SetNetwork at a time
        self.pool: WarmPool | None = None  # `--warm-pool N` (lifecycle.start makes it)
        self._creates_starting = 0  # `runtime.create`s of user creates in progress
        private_dir(config.logs_dir)
        self.volumes = Volumes(
            config.state_dir,
            registry.volumes,
            max_bytes=config.volume_max_bytes,
            owner_max_volumes=config.owner_max_volumes,
            host_mounts=HostMounts(config.allow_host_mounts),
            placement=placement.name,
            volume_host=placement.volume_host,
            shared_dir=config.ray_volume_dir,
        )
        self.volumes.clear_trash()
        self.secrets = SecretStore(registry.connection, config.state_dir / KEY_FILE)

    @property
    def registry(self) -> Registry:
        return self._registry

    def _adopt(self, live: LiveSandbox) -> None:
        self._live[live.rec.id] = live
        self._admission.take(live.rec.owner, live.charge)
        self._by_request[(live.rec.owner, live.rec.request_id)] = live
        if live.rec.lease_id:
            lease = self._leases.get((live.rec.owner, live.rec.lease_id))
            if lease is not None:
                lease.sandbox_count += 1

    def _forget(self, live: LiveSandbox) -> None:
        rec = live.rec
        if self._live.get(rec.id) is live:
            del self._live[rec.id]
            self._admission.give_back(rec.owner, live.charge)
        self._by_request.pop((rec.owner, rec.request_id), None)
        if rec.lease_id:
            lease = self._leases.get((rec.owner, rec.lease_id))
            if lease is not None and lease.sandbox_count > 0:
                lease.sandbox_count -= 1

    def _record(self, owner: str, sandbox_id: str) -> SandboxRecord:
        live = self._live.get(sandbox_id)
        if live is not None and live.rec.owner == owner:
            return live.rec
        rec = self._registry.get_sandbox(sandbox_id) if sandbox_id else None
        if rec is None or rec.owner != owner:
            raise SandboxNotFound(sandbox_id)
        live = self._live.get(sandbox_id)
        return live.rec if live is not None else rec

    def _set_status(self, live: LiveSandbox, status: SandboxStatus) -> None:
        rec = live.rec
        rec.status = status
        if status == RUNNING:
            first = rec.started_ns is None
            rec.started_ns = time.time_ns()
            if first:
                metrics.sandbox_started(rec)
        self._registry.update_sandbox(rec)
        live.notify()

    async def _drive(self, live: LiveSandbox) -> None:
        """The task of a sandbox just recorded by its create: a new one (`_run_new`), or a warm
        pool member claimed with its handle (`_run_started`). It says "created" in the log
        first: as the task's first step, that runs once the create has been answered."""
        claimed = live.handle is not None
        log.info("sandbox created id=%s owner=%s image=%s%s", live.rec.id, live.rec.owner,
                 live.rec.config.image, " (from the warm pool)" if claimed else "")  # fmt: skip
        if claimed:
            await self._run_started(live)
        else:
            await self._run_new(live)

    async def _run_new(self, live: LiveSandbox) -> None:
        """Drives a new sandbox: CREATING, runtime.create, RUNNING, then watches its end."""
        if await self._create_in_runtime(live):
            await self._run_started(live)

    async def _create_in_runtime(self, live: LiveSandbox) -> bool:
        """Places the sandbox, pulls its image and has the runtime start it; False when it
        ended instead (recorded)."""
        if live.stop_reason:  # stopped before it was created: nothing to create
            self._finish(live, TERMINATED, live.stop_reason, None, time.time_ns())
            return False
        if not live.rec.node and not await self._place(live):
            return False
        if not await self._pull_image(live):
            return False
        if live.rec.status != CREATING:  # a create placed with its image ready starts so
            self._set_status(live, CREATING)
        assert live.config is not None
        self._creates_starting += 1
        try:
            handle = await live.runtime.create(live.config)
        except asyncio.CancelledError:
            raise
        except SandboxRuntimeError as e:
            self._finish(live, FAILED, f"create failed: {e}", None, time.time_ns())
            return False
        except Exception as e:
            log.exception("runtime.create crashed for %s", live.rec.id)
            self._finish(live, FAILED, f"create failed: internal error: {e}", None, time.time_ns())
            return False
        finally:
            self._creates_starting -= 1
        live.handle = handle
        return True

    async def _run_started(self, live: LiveSandbox) -> None:
        """Drives a sandbox whose runtime has started it (created just now, or a warm pool
        member claimed by its create): its deadline, its network, RUNNING, then its end."""
        handle = live.handle
        assert handle is not None
        if live.stop_reason:
            try:
                exit = await handle.kill()
            except SandboxRuntimeError:
                exit = MainExit(137, 9, time.time_ns(), "killed")
            self._finish(live, TERMINATED, live.stop_reason, exit.exit_code, exit.ended_at_ns)
            return
        await self._send_deadline(live)  # before RUNNING: a crash before it leaves CREATING
        if not await self._open_network(live):
            return
        self._set_status(live, RUNNING)
        await self._watch(live)

    async def _open_network(self, live: LiveSandbox) -> bool:
        """Opens the sandbox's exposed ports and serves its egress proxy; False when that
        failed and the sandbox was ended for it."""
        return await self._expose_ports(live) and await self._serve_egress(live)

    def _egress_of(self, rec: SandboxRecord) -> EgressHost | None:
        """Where the sandbox's egress proxy runs; None when its node is unknown (lost)."""
        try:
            return self._placement.egress(rec.node)
        except UnknownNode:
            return None

    async def _serve_egress(self, live: LiveSandbox) -> bool:
        rec = live.rec
        if live.handle is None or (rec.config.egress.isolated and not rec.egress_listener):
            return True
        try:
            host = self._placement.egress(rec.node)
            await host.open(rec.id, live.handle, rec.config.egress, rec.network_usage)
        except UnknownNode as e:  # the node left since the sandbox was placed
            log.warning("sandbox %s: cannot serve its egress: node %s is unknown", rec.id, e)
            with contextlib.suppress(SandboxRuntimeError):
                await live.handle.kill()
            self._finish(live, FAILED, f"egress failed: node {e} is unknown", None, time.time_ns())
            return False
        except (SandboxRuntimeError, OSError) as e:
            log.warning("sandbox %s: cannot serve its egress: %s", rec.id, e)
            with contextlib.suppress(SandboxRuntimeError):
                await live.handle.kill()
            self._finish(live, FAILED, f"egress failed: {e}", None, time.time_ns())
            return False
        except Exception as e:
            log.exception("serving the egress of %s crashed", rec.id)
            with contextlib.suppress(SandboxRuntimeError):
                await live.handle.kill()
            self._finish(live, FAILED, f"egress failed: internal error: {e}", None,
                         time.time_ns())  # fmt: skip
            return False
        if not rec.egress_listener:
            rec.egress_listener = True
            self._registry.update_sandbox(rec)
        return True

    async def _expose_ports(self, live: LiveSandbox) -> bool:
        """Opens the listeners of the sandbox's exposed ports and records their addresses
        (again at the addresses of `previous` when free); False when that failed and the
        sandbox was ended for it."""
        rec = live.rec
        if not rec.config.exposed_ports or live.handle is None:
            return True
        previous = self._registry.port_addresses(rec.id)
        try:
            pairs = await self._ports.open(rec.id, live.handle, rec.config.exposed_ports, previous)
        except OSError as e:
            log.warning("sandbox %s: cannot listen for its exposed ports: %s", rec.id, e)
            with contextlib.suppress(SandboxRuntimeError):
                await live.handle.kill()
            self._finish(live, FAILED, f"exposing ports failed: {e}", None, time.time_ns())
            return False
        rec.port_addresses = pairs
        self._registry.set_port_addresses(rec.id, pairs)
        log.info("sandbox %s exposes %s", rec.id,
                 ", ".join(f"{port} at {address}" for port, address in pairs))  # fmt: skip
        return True

    async def _place(self, live: LiveSandbox) -> bool:
        """Waits, PENDING with the placement's reason, until a node takes the sandbox.

        Only for placements that defer the choice (`runtime_for_new` gave no node). False when
        the sandbox ended meanwhile (stopped, or the placement gave up: FAILED with its reason).
        """
        assert live.config is not None

        def waiting(reason: str) -> None:
            if live.rec.reason != reason:
                live.rec.reason = reason
                self._registry.update_sandbox(live.rec)
                live.notify()

        try:
            placed = await self._placement.place(
                live.config, waiting, lambda: bool(live.stop_reason)
            )
        except SandboxRuntimeError as e:
            self._finish(live, FAILED, str(e), None, time.time_ns())
            return False
        if placed is None:
            self._finish(live, TERMINATED, live.stop_reason or "stopped", None, time.time_ns())
            return False
        live.rec.node, live.runtime = placed
        live.rec.reason = ""
        try:  # a volume's first use makes this node its home
            self.volumes.settle_homes(live.rec.owner, live.config, live.rec.node)
        except ServiceError as e:
            self._finish(live, FAILED, str(e), None, time.time_ns())
            return False
        return True

    async def _pull_image(self, live: LiveSandbox) -> bool:
        """Waits, PENDING with reason "pulling image X", while the node pulls the sandbox's image.

        False when the sandbox ended meanwhile (the pull failed: FAILED naming the image; or it
        was stopped: the pull goes on for other users of the image, the sandbox does not wait).
        """
        config = live.config
        assert config is not None
        if live.runtime.image_ready(config.image):
            return True
        rec = live.rec
        rec.reason = f"pulling image {config.image}"
        self._registry.update_sandbox(rec)
        live.notify()
        pull = asyncio.ensure_future(
            live.runtime.prepare_image(config.image, config.registry_credentials)
        )
        try:
            while not pull.done():
                await asyncio.wait({pull}, timeout=0.2)
                if live.stop_reason and not pull.done():
                    pull.cancel()
                    self._finish(live, TERMINATED, live.stop_reason, None, time.time_ns())
                    return False
            pull.result()
            metrics.IMAGE_PULLS.labels("ok").inc()
        except asyncio.CancelledError:
            pull.cancel()
            raise
        except SandboxRuntimeError as e:
            metrics.IMAGE_PULLS.labels("failed").inc()
            self._finish(live, FAILED, f"pulling image {config.image} failed: {e}", None,
                         time.time_ns())  # fmt: skip
            return False
        except Exception as e:
            log.exception("pulling image %s crashed for %s", config.image, rec.id)
            self._finish(live, FAILED, f"pulling image {config.image} failed: internal error: {e}",
                         None, time.time_ns())  # fmt: skip
            return False
        rec.reason = ""
        return True

    async def _watch(self, live: LiveSandbox) -> None:
        assert live.handle is not None
        try:
            exit = await live.handle.wait_exit()
        except asyncio.CancelledError:
            raise
        except SandboxRuntimeError as e:
            exit = MainExit(-1, 0, time.time_ns(), f"lost: {e}")
        except Exception as e:
            log.exception("wait_exit crashed for %s", live.rec.id)
            exit = MainExit(-1, 0, time.time_ns(), f"lost: internal error: {e}")
        status, reason = classify_exit(exit, live.stop_reason)
        code = exit.exit_code if exit.exit_code >= 0 else None
        self._finish(live, status, reason, code, exit.ended_at_ns)

    def _finish(
        self,
        live: LiveSandbox,
        status: SandboxStatus,
        reason: str,
        exit_code: int | None,
        ended_ns: int,
    ) -> None:
        """Makes the sandbox terminal: record, waiters, log kept aside, runtime cleanup."""
        rec = live.rec
        if rec.terminal:
            return
        rec.status, rec.reason, rec.exit_code = status, reason, exit_code
        rec.ended_ns = ended_ns or time.time_ns()
        egress = self._egress_of(rec)
        if egress is not None and egress.serving(rec.id):
            usage = egress.known_usage(rec.id)  # at once; the final ones once it is closed
            if usage is not None:
                rec.network_usage = usage
            self._spawn(self._close_egress(egress, rec))
        self._registry.update_sandbox(rec)
        if rec.config.exposed_ports:  # nothing to close or forget for most sandboxes
            rec.port_addresses = ()
            self._registry.set_port_addresses(rec.id, ())
            self._spawn(self._ports.close(rec.id, grace_seconds=FLUSH_SECONDS))
        self._forget(live)
        live.notify()
        log.info(
            "sandbox ended id=%s status=%s reason=%r exit_code=%s",
            rec.id, status_name(status), reason, exit_code,
        )  # fmt: skip
        self._keep_log(rec)
        self._start_cleanup(live.runtime, rec.id)

    async def _close_egress(self, egress: EgressHost, rec: SandboxRecord) -> None:
        """Stops serving an ended sandbox's egress and records its final figures (a remote
        node's answer can come after the end was recorded with the last figures known)."""
        try:
            usage = await asyncio.wait_for(egress.close(rec.id), EGRESS_CLOSE_SECONDS)
        except (SandboxRuntimeError, TimeoutError) as e:
            log.info("sandbox %s: its egress did not close cleanly: %s", rec.id, e)
            return
        if usage is not None and usage != rec.network_usage:
            rec.network_usage = usage
            self._registry.update_sandbox(rec)

    def _finish_record(
        self,
        rec: SandboxRecord,
        status: SandboxStatus,
        reason: str,
        code: int | None,
        ended_ns: int = 0,
    ) -> None:
        rec.status, rec.reason, rec.exit_code = status, reason, code
        rec.ended_ns = ended_ns or time.time_ns()
        self._registry.update_sandbox(rec)
        if rec.config.exposed_ports:
            self._registry.set_port_addresses(rec.id, ())
        log.info("sandbox id=%s marked %s: %s", rec.id, status_name(status), reason)

    def _kept_log(self, sandbox_id: str) -> Path:
        return self._config.logs_dir / f"{sandbox_id}.log"

    def _keep_log(self, rec: SandboxRecord) -> None:
        """Moves the main log out of the runtime's directory so that cleanup cannot remove it."""
        try:
            self._placement.keep_log(rec.node, rec.id, self._kept_log(rec.id))
        except UnknownNode:
            pass
        except (OSError, SandboxRuntimeError) as e:
            log.warning("could not keep the log of %s: %s", rec.id, e)

    async def _cleanup(self, runtime: Runtime, sandbox_id: str) -> None:
        """Removes the sandbox's state from its runtime. A second call while one runs (a delete
        right after the stop that spawned one) waits for the first: two at once raced, and the
        loser returned while the winner was still removing (a disk layer's image outlived the
        delete that the user saw finish)."""
        await asyncio.shield(self._start_cleanup(runtime, sandbox_id))

    def _start_cleanup(self, runtime: Runtime, sandbox_id: str) -> asyncio.Task[None]:
        """The sandbox's cleanup, started now unless one runs. A closing service lets those
        that run finish (`Lifecycle.close`): one cut off halfway leaves a disk layer mounted."""
        running = self._cleanups.get(sandbox_id)
        if running is None:
            running = asyncio.create_task(self._cleanup_once(runtime, sandbox_id))
            self._cleanups[sandbox_id] = running
            self._background.add(running)  # a closing service cancels and awaits it
            running.add_done_callback(self._background.discard)
            running.add_done_callback(lambda _: self._cleanups.pop(sandbox_id, None))
        return running

    async def _cleanup_once(self, runtime: Runtime, sandbox_id: str) -> None:
        try:
            await runtime.cleanup(sandbox_id)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("runtime.cleanup failed for %s", sandbox_id)

    def _spawn(self, coro: Awaitable[None]) -> None:
        async def run() -> None:
            await coro

        task = asyncio.create_task(run())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    @staticmethod
    async def _wait_until(
        live: LiveSandbox, predicate: Callable[[], bool], limit_seconds: float
    ) -> bool:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + limit_seconds
        while not predicate():
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(live.changed.wait(), remaining)
        return True

    async def _stop_live(self, live: LiveSandbox, grace: float, reason: str) -> None:
        if live.stop_task is None:
            live.stop_reason = reason
            live.stop_task = asyncio.create_task(self._do_stop(live, grace))
        await asyncio.shield(live.stop_task)

    async def _do_stop(self, live: LiveSandbox, grace: float) -> None:
        """Ends the sandbox; returns once its end is recorded.

        The end is recorded by the watcher (or by _run_new, for a sandbox still being created),
        not by the terminate call: once the record is terminal the stop is complete even if
        that call has not returned (a remote node host's answer can come after the watcher's,
        or not at all), and the call is then abandoned.
        """
        rec = live.rec
        log.info("stopping sandbox id=%s reason=%r grace=%.1fs", rec.id, live.stop_reason, grace)
        ending = None
        if live.handle is not None:
            ending = asyncio.create_task(self._terminate(live.handle, rec.id, grace))
        try:
            await self._wait_until(live, lambda: live.rec.terminal, math.inf)
        finally:
            if ending is not None and not ending.done():
                ending.cancel()

    @staticmethod
    async def _terminate(handle: SandboxHandle, sandbox_id: str, grace: float) -> None:
        try:
            await handle.terminate(grace)
        except SandboxGone:
            pass
        except SandboxRuntimeError as e:
            log.warning("terminate failed for %s: %s; killing", sandbox_id, e)
            with contextlib.suppress(SandboxRuntimeError):
                await handle.kill()
        except Exception:
            log.exception("terminate crashed for %s", sandbox_id)

    def _deadline_of(self, live: LiveSandbox) -> tuple[int, str]:
        """(unix ns, why) at which the sandbox must end without the service: the earlier of its
        lifetime's end ("lifetime") and its lease's expiry ("lease"); 0 for never."""
        at, why = live.rec.expires_ns or 0, "lifetime"
        if live.rec.lease_id:
            lease = self._leases.get((live.rec.owner, live.rec.lease_id))
            if lease is not None and (not at or lease.expires_ns < at):
                at, why = lease.expires_ns, "lease"
        return at, why

    async def _send_deadline(self, live: LiveSandbox) -> None:
        if live.handle is None or live.rec.terminal:
            return
        at, why = self._deadline_of(live)
        try:
            await live.handle.set_deadline(at, why, self._config.default_stop_grace_seconds)
        except asyncio.CancelledError:
            raise
        except SandboxRuntimeError as e:  # gone or unreachable: its watcher will tell
            log.debug("deadline not given to %s: %s", live.rec.id, e)
        except Exception:
            log.exception("set_deadline crashed for %s", live.rec.id)

    def _push_deadline(self, live: LiveSandbox) -> None:
        """Sends the sandbox's current deadline in the background: one sender per sandbox at a
        time, which sends again while it changed meanwhile (so a late send never wins)."""
        if live.handle is None or self._closing:
            return
        live.deadline_dirty = True
        if live.deadline_pushing:
            return
        live.deadline_pushing = True

        async def push() -> None:
            try:
                while live.deadline_dirty and not live.rec.terminal:
                    live.deadline_dirty = False
                    await self._send_deadline(live)
            finally:
                live.deadline_pushing = False

        self._spawn(push())
