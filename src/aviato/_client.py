"""The SDK's connection to a service: which transport serves an address, and retries.

- `get_client(base_url)` returns the `Client` of the running event loop for that address and
  the current `AVIATO_API_KEY`, created on first use and shared: one per (event loop, address,
  key), in practice one per address on the SDK's background loop. None means the embedded
  local service, found or started by `aviato._local_service.ensure_local_service` (in a
  worker thread, so the loop never blocks; never during clean-up at exit: `CLEANING_UP`).
- The transport of an address is the gRPC one (`aviato._transport.grpc`), unless a factory was
  registered for that exact address with `register_transport` (how tests plug in the in-memory
  transport of `aviato._transport.memory`).
- `Client.with_retry` repeats a call that could not reach the service (`AviatoConnectionError`
  with code UNAVAILABLE) within a budget (20 s by default) with jittered exponential backoff;
  for the local service it also restarts the service if it has died. The caller says what may
  be repeated: unary calls (creates carry a request id, so they are safe), whole file reads and
  writes, and the opening of streamed reads. A command is never sent twice: an exec that breaks
  is reported, never replayed.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import logging
import os
import random
import threading
import time
import weakref
from collections.abc import Awaitable, Callable
from typing import TypeVar

from aviato import _bridge, _defaults, _local_service
from aviato._transport.base import Transport
from aviato._transport.errors import is_transient
from aviato._transport.grpc import GrpcTransport, parse_base_url, translate_error
from aviato.exceptions import AviatoConnectionError

__all__ = [
    "Client",
    "get_client",
    "parse_base_url",
    "register_transport",
    "translate_error",
]

logger = logging.getLogger("aviato")

R = TypeVar("R")

RETRY_BUDGET_SECONDS = 20.0

TransportFactory = Callable[[], Transport]
_factories: dict[str, TransportFactory] = {}

# Set while sessions are closed at exit or on a signal: the local service is then used only if
# it runs. Starting one to stop sandboxes would leave a service running after the program
# ended, and is not needed: a session's sandboxes end by themselves when their lease expires,
# with or without a service (the sandbox's own deadline).
CLEANING_UP: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "aviato_cleaning_up", default=False
)


def register_transport(base_url: str, factory: TransportFactory | None) -> None:
    """Serves `base_url` with transports made by `factory` (None removes it). For tests and
    embedding; clients already made for that address keep their transport."""
    key = base_url.rstrip("/")
    if factory is None:
        _factories.pop(key, None)
    else:
        _factories[key] = factory


class Client:
    """One transport to one service on one event loop, and the retry policy around it."""

    def __init__(self, transport: Transport, *, local_state_dir: str | None = None) -> None:
        self.transport = transport
        self.local_state_dir = local_state_dir

    def __repr__(self) -> str:
        return f"<aviato Client {self.transport.url}>"

    @property
    def closed(self) -> bool:
        return self.transport.closed

    async def with_retry(
        self,
        attempt: Callable[[], Awaitable[R]],
        *,
        op: str,
        retry: bool = True,
        budget: float | None = None,
    ) -> R:
        """Runs `attempt` (which must be safe to repeat), repeating it while the service cannot
        be reached, within `budget` seconds (default `RETRY_BUDGET_SECONDS`)."""
        deadline = time.monotonic() + (RETRY_BUDGET_SECONDS if budget is None else budget)
        delay = 0.05
        revive_error: BaseException | None = None
        while True:
            try:
                return await attempt()
            except Exception as err:
                if not is_transient(err):
                    raise
                if self.local_state_dir is not None and CLEANING_UP.get():
                    raise  # clean-up never starts a local service (see CLEANING_UP)
                if retry and time.monotonic() + delay < deadline:
                    logger.debug("%s: service unavailable, retrying in %.2fs", op, delay)
                    await asyncio.sleep(delay * (0.5 + random.random()))
                    delay = min(delay * 2, 2.0)
                    if self.local_state_dir is not None:
                        revive_error = await self._revive_local_service()
                    continue
                if revive_error is not None:
                    raise revive_error from None  # why the local service is not there
                raise

    async def _revive_local_service(self) -> BaseException | None:
        """The local service may have died: start it again (a no-op when it answers)."""
        try:
            await ensure_local_service(self.local_state_dir)
        except Exception as err:
            return err
        return None

    async def close(self) -> None:
        await self.transport.close()


async def ensure_local_service(state_dir: str | None) -> str:
    """`_local_service.ensure_local_service` (blocking) in a thread of its own, never the loop's
    default executor: that one refuses work once the interpreter has begun to exit, and a stop
    fired at the end of a script may still have to reach (or start) the local service then."""
    future: concurrent.futures.Future[str] = concurrent.futures.Future()

    def work() -> None:
        try:
            future.set_result(_local_service.ensure_local_service(state_dir))
        except BaseException as err:
            future.set_exception(err)

    threading.Thread(target=work, name="aviato-local-service", daemon=True).start()
    return await asyncio.wrap_future(future)


# (loop, key) -> Client. Weak on the loop so that a closed loop's clients go away.
_clients: weakref.WeakKeyDictionary[
    asyncio.AbstractEventLoop, dict[tuple[str, str | None, str | None], Client]
] = weakref.WeakKeyDictionary()
_locks: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = (
    weakref.WeakKeyDictionary()
)
_exit_hook_registered = False


async def get_client(base_url: str | None) -> Client:
    """The shared client of the running loop for `base_url` (None: the local service)."""
    loop = asyncio.get_running_loop()
    per_loop = _clients.get(loop)
    if per_loop is None:
        per_loop = _clients.setdefault(loop, {})
    state_dir: str | None = None
    api_key = _defaults.api_key()
    if base_url is None:
        state_dir = _local_state_dir()
        address = f"local:{state_dir}"
    else:
        address = base_url
    # One client per address, key and transport choice: a key set (or changed) in
    # AVIATO_API_KEY, or AVIATO_TRANSPORT changed, after the first call is used from the next
    # call on. (A Sandbox object keeps the client it was made with.)
    key = (address, api_key, os.environ.get(_defaults.ENV_TRANSPORT))
    client = per_loop.get(key)
    if client is not None and not client.closed:
        return client
    lock = _locks.setdefault(loop, asyncio.Lock())
    async with lock:
        client = per_loop.get(key)
        if client is not None and not client.closed:
            return client
        if base_url is None:
            assert state_dir is not None
            if CLEANING_UP.get():
                socket_path = await asyncio.to_thread(_local_service.answering_socket, state_dir)
                if socket_path is None:
                    raise AviatoConnectionError(
                        "the local service is not running, and clean-up does not start one "
                        "(a session's sandboxes end by themselves when their lease expires)"
                    )
            else:
                socket_path = await ensure_local_service(state_dir)
            client = Client(
                GrpcTransport(f"unix://{socket_path}", api_key=api_key),
                local_state_dir=state_dir,
            )
        elif (factory := _factories.get(base_url.rstrip("/"))) is not None:
            client = Client(factory())
        else:
            client = Client(GrpcTransport(base_url, api_key=api_key))
        per_loop[key] = client
        _register_exit_hook()
        return client


_state_dirs: dict[tuple[str | None, str | None, str | None], str] = {}


def _local_state_dir() -> str:
    """`_local_service.state_dir()`, remembered per value of the variables it depends on: it is
    asked on every call (every exec), and resolving it with pathlib each time was 1-2 % of an
    exec."""
    env = os.environ
    key = (env.get("AVIATO_STATE_DIR"), env.get("XDG_STATE_HOME"), env.get("HOME"))
    found = _state_dirs.get(key)
    if found is None:
        found = str(_local_service.state_dir())
        if all(v is None or v.startswith(("/", "~")) for v in key[:2]):  # else it needs the cwd
            _state_dirs[key] = found
    return found


def _register_exit_hook() -> None:
    global _exit_hook_registered
    if _exit_hook_registered:
        return
    _exit_hook_registered = True

    async def _close_clients() -> None:
        loop = asyncio.get_running_loop()
        for client in list(_clients.get(loop, {}).values()):
            await client.close()

    _bridge.get_bridge().add_exit_hook(_close_clients, order=_bridge.EXIT_ORDER_CHANNELS)
