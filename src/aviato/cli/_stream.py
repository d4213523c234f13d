"""The request side of one Exec stream, fed from several threads, for `exec` and `sh`.

grpc's blocking API takes the requests of a bidirectional stream as an iterator, which it drains
on a thread of its own. `ExecRequests` is that iterator: the init frame first, then whatever the
command's threads `send()` — stdin chunks, resizes, signals — until `close()`.

Backpressure: stdin chunks count against a semaphore that is released only once grpc has taken
the chunk, so a fast local producer (`cat big.iso | aviato exec ...`) blocks instead of filling
memory. Control frames (signals, resizes) bypass it, so that a signal handler never blocks.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Iterator

from aviato.v1 import sandbox_pb2 as pb

MAX_STDIN_CHUNKS_IN_FLIGHT = 16
STDIN_CHUNK_BYTES = 64 * 1024


class ExecRequests:
    """An iterator of ExecRequest frames that other threads append to."""

    def __init__(self, init: pb.ExecInit) -> None:
        self._init: pb.ExecInit | None = init
        self._queue: queue.SimpleQueue[pb.ExecRequest | None] = queue.SimpleQueue()
        self._stdin_slots = threading.Semaphore(MAX_STDIN_CHUNKS_IN_FLIGHT)
        self._closed = threading.Event()

    def __iter__(self) -> Iterator[pb.ExecRequest]:
        if self._init is not None:
            init, self._init = self._init, None
            yield pb.ExecRequest(init=init)
        while (request := self._queue.get()) is not None:
            if request.WhichOneof("msg") == "stdin":
                self._stdin_slots.release()
            yield request

    def send_stdin(self, data: bytes) -> bool:
        """Queue a stdin chunk, blocking while too many are in flight; False once closed."""
        while not self._stdin_slots.acquire(timeout=0.5):
            if self._closed.is_set():
                return False
        if self._closed.is_set():
            return False
        self._queue.put(pb.ExecRequest(stdin=data))
        return True

    def send_eof(self) -> None:
        self._queue.put(pb.ExecRequest(stdin_eof=True))

    def send_signal(self, signum: int) -> None:
        """Signal the command's process group; safe to call from a signal handler."""
        self._queue.put(pb.ExecRequest(signal=signum))

    def send_resize(self, size: pb.TerminalSize) -> None:
        self._queue.put(pb.ExecRequest(resize=size))

    def close(self) -> None:
        """End the request stream; senders blocked on backpressure return False."""
        self._closed.set()
        self._queue.put(None)

    @property
    def closed(self) -> bool:
        return self._closed.is_set()


def pump_fd(fd: int, requests: ExecRequests) -> None:
    """Copy `fd` into the stream as stdin chunks until EOF (then send EOF) or close.

    Meant for a daemon thread: a read that never returns (a pipe nobody closes) only keeps the
    thread waiting, never the command's exit.
    """
    while not requests.closed:
        try:
            data = os.read(fd, STDIN_CHUNK_BYTES)
        except OSError:
            data = b""
        if not data:
            requests.send_eof()
            return
        if not requests.send_stdin(data):
            return


def write_all(fd: int, data: bytes) -> None:
    """os.write until every byte is out (a pipe or terminal may take less at a time)."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]
