"""The driver of a code context, run inside the sandbox by ``python3`` (3.8 or later).

It is not imported by the SDK: `aviato._code_wire` sends the text of this package's modules
(`rich`, `kernels`, then this one) over the command's stdin, and its bootstrap makes them the
package ``_aviato_driver`` and calls `main`. They import the standard library only (and IPython
when asked for and present): nothing of `aviato` exists in the sandbox.

The channel. At start the driver moves the command's stdin and stdout (the pipes to the SDK)
to descriptors above 100, close-on-exec, and puts ``/dev/null`` on fd 0 and pipes of its own on
fds 1 and 2, read by two threads. Whatever the user's code (or a program it starts) writes to
fd 1 or 2 is therefore data, carried inside frames, never a frame itself. The SDK's requests
arrive as a 4-byte big-endian length and a JSON object. The driver's frames are::

    b"\\xffAVZ" + token (16 random bytes the SDK chose) + 4-byte big-endian length + JSON

with the JSON encoded as ASCII, so the marker (which holds 0xFF) never occurs inside a genuine
frame; the SDK skips any bytes that are not a frame with its token (see `aviato._code_wire`).
The driver checks before each frame that its descriptors are still the ones it opened, and
exits if the user's code closed or replaced them (the SDK then reports the context as lost).

What this cannot do: the user's code runs in this very process, so code that sets out to read
the token from the driver's memory can write frames the SDK accepts, for its own runs. That
gains it nothing it could not print as its result; the SDK parses every frame with bounds and
as JSON (never pickle), so the worst it gets is a wrong answer from the sandbox it controls.

Interrupts: the SDK sends SIGINT; the handler raises `KeyboardInterrupt` only while user code
runs, so the driver itself is never interrupted between runs.
"""

from __future__ import annotations

import codecs
import contextlib
import fcntl
import json
import os
import select
import signal
import struct
import sys
import termios
import threading
import time
from typing import Any

from .kernels import RunState, make_kernel
from .rich import error_frame, mime_bundle, plain_data, type_name

MAGIC = b"\xffAVZ"
FRAME_HEADER = struct.Struct(">4s16sI")
REQUEST_HEADER = struct.Struct(">I")
MAX_REQUEST_BYTES = 64 << 20
MAX_FRAME_BYTES = 32 << 20
CHANNEL_FD_FLOOR = 100
OUTPUT_CHUNK_BYTES = 64 << 10
MAX_DISPLAYS_PER_RUN = 256
SETTLE_SECONDS = 2.0
EX_CHANNEL_LOST = 70


def _high_dup(fd: int) -> int:
    """A close-on-exec duplicate of `fd` at or above CHANNEL_FD_FLOOR."""
    return fcntl.fcntl(fd, getattr(fcntl, "F_DUPFD_CLOEXEC", 1030), CHANNEL_FD_FLOOR)


def _identity(fd: int) -> tuple[int, int]:
    info = os.fstat(fd)
    return info.st_dev, info.st_ino


def _pending_bytes(fd: int) -> int:
    raw = fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0")
    return int(struct.unpack("i", raw)[0])


def _lost(reason: str) -> None:
    """Ends the driver: its channel is gone, so nothing more can be said to the SDK."""
    os._exit(EX_CHANNEL_LOST)


class Channel:
    """The frames to the SDK and the requests from it (see the module docstring)."""

    def __init__(self, fd_in: int, fd_out: int) -> None:
        self.fd_in = fd_in
        self.fd_out = fd_out
        self.token = b""
        self.lock = threading.RLock()
        self.sent_in_run = 0
        self.watched: dict[int, tuple[int, int]] = {}
        self.watch(fd_in)
        self.watch(fd_out)

    def watch(self, fd: int) -> None:
        self.watched[fd] = _identity(fd)

    def verify(self) -> None:
        """Exits if a descriptor of the driver was closed or replaced by the user's code."""
        try:
            for fd, identity in self.watched.items():
                if _identity(fd) != identity:
                    _lost(f"descriptor {fd} was replaced")
        except OSError:
            _lost("a descriptor was closed")

    def send(self, message: dict[str, Any]) -> None:
        payload = json.dumps(message, ensure_ascii=True, separators=(",", ":"), allow_nan=False)
        data = payload.encode("ascii")
        if len(data) > MAX_FRAME_BYTES:
            raise ValueError("frame too large")
        frame = FRAME_HEADER.pack(MAGIC, self.token, len(data)) + data
        with self.lock:
            self.verify()
            view = memoryview(frame)
            try:
                while view:
                    view = view[os.write(self.fd_out, view) :]
            except OSError:
                _lost("the channel is closed")
            if message.get("k") != "done":
                self.sent_in_run += 1

    def _read_exactly(self, n: int) -> bytes | None:
        parts = []
        while n:
            try:
                chunk = os.read(self.fd_in, min(n, 1 << 20))
            except OSError:
                return None
            if not chunk:
                return None
            parts.append(chunk)
            n -= len(chunk)
        return b"".join(parts)

    def read_request(self) -> dict[str, Any] | None:
        """The next request, or None when the SDK closed the channel."""
        head = self._read_exactly(REQUEST_HEADER.size)
        if head is None:
            return None
        (size,) = REQUEST_HEADER.unpack(head)
        if size > MAX_REQUEST_BYTES:
            return None
        body = self._read_exactly(size)
        if body is None:
            return None
        request = json.loads(body.decode("utf-8"))
        return request if isinstance(request, dict) else None


class Capture:
    """fds 1 and 2 as pipes, read by one thread each into "out" frames of the current run."""

    NAMES = ("stdout", "stderr")

    def __init__(self, channel: Channel, state: RunState) -> None:
        self.channel = channel
        self.state = state
        self.read_ends: list[int] = []
        self.write_ends: list[int] = []
        self.totals = [0, 0]
        self.decoders = [self._decoder(), self._decoder()]
        null = os.open(os.devnull, os.O_RDONLY)
        self.null = _high_dup(null)
        os.close(null)
        for _ in range(2):
            read_end, write_end = os.pipe()
            self.read_ends.append(_high_dup(read_end))
            self.write_ends.append(_high_dup(write_end))
            os.close(read_end)
            os.close(write_end)
            channel.watch(self.read_ends[-1])
            channel.watch(self.write_ends[-1])
        self.restore()
        for index in (0, 1):
            threading.Thread(target=self._pump, args=(index,), daemon=True).start()

    @staticmethod
    def _decoder() -> codecs.IncrementalDecoder:
        return codecs.getincrementaldecoder("utf-8")(errors="replace")

    def restore(self) -> None:
        """Puts /dev/null back on fd 0 and the capture pipes on fds 1 and 2 (user code may have
        closed or replaced them)."""
        os.dup2(self.null, 0, inheritable=True)
        for index, write_end in enumerate(self.write_ends):
            os.dup2(write_end, index + 1, inheritable=True)

    def begin(self) -> None:
        self.totals = [0, 0]
        self.decoders = [self._decoder(), self._decoder()]

    def _pump(self, index: int) -> None:
        fd = self.read_ends[index]
        while True:
            try:
                select.select([fd], [], [])
                with self.channel.lock:
                    self.channel.verify()
                    data = os.read(fd, OUTPUT_CHUNK_BYTES)
                    if data:
                        self._forward(index, data)
            except OSError:
                _lost("a capture pipe was closed")

    def _forward(self, index: int, data: bytes) -> None:
        """Called with the channel's lock held."""
        run = self.state.run
        if run is None:
            return  # written between runs (a background writer): dropped
        kept = max(0, min(len(data), self.state.max_output_bytes - self.totals[index]))
        self.totals[index] += len(data)
        if kept:
            text = self.decoders[index].decode(data[:kept])
            if text:
                self.channel.send({"k": "out", "run": run, "name": self.NAMES[index], "text": text})

    def settle(self) -> None:
        """Waits (at most SETTLE_SECONDS) until what the run wrote to fds 1 and 2 was sent."""
        for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
            try:
                if stream is not None:
                    stream.flush()
            except Exception:
                pass
        deadline = time.monotonic() + SETTLE_SECONDS
        while True:
            with self.channel.lock:
                self.channel.verify()
                if all(_pending_bytes(fd) == 0 for fd in self.read_ends):
                    run = self.state.run
                    for index, decoder in enumerate(self.decoders):
                        rest = decoder.decode(b"", final=True)
                        if rest and run is not None:
                            name = self.NAMES[index]
                            self.channel.send({"k": "out", "run": run, "name": name, "text": rest})
                    return
            if time.monotonic() > deadline:
                return
            time.sleep(0.002)


# --- the loop ---------------------------------------------------------------------------------


class Driver:
    def __init__(self, channel: Channel, hello: dict[str, Any]) -> None:
        self.channel = channel
        self.state = RunState(int(hello["max_output_bytes"]), int(hello["max_display_bytes"]))
        self.capture = Capture(channel, self.state)
        os.environ.setdefault("MPLBACKEND", "Agg")
        self.kernel = make_kernel(str(hello.get("kernel", "auto")), self.state, self._display)
        self.shown_figures: set[int] = set()

    def _display(self, bundle: dict[str, Any]) -> None:
        run = self.state.run
        if run is None:
            return
        self.state.displays += 1
        if self.state.displays > MAX_DISPLAYS_PER_RUN:
            if self.state.displays == MAX_DISPLAYS_PER_RUN + 1:
                self.state.dropped.append(f"displays after the first {MAX_DISPLAYS_PER_RUN}")
            return
        self.channel.send({"k": "display", "run": run, "data": bundle})

    def _open_figures(self) -> None:
        """Shows the matplotlib figures the run left open, as Jupyter's inline backend does."""
        pyplot = sys.modules.get("matplotlib.pyplot")
        if pyplot is None:
            return
        try:
            for number in pyplot.get_fignums():
                figure = pyplot.figure(number)
                self._display(mime_bundle(figure, self.state.max_display_bytes, self.state.dropped))
            pyplot.close("all")
        except Exception as err:
            self.state.dropped.append(f"open figures: {type(err).__name__}")

    def fail(self, request: dict[str, Any], err: BaseException) -> None:
        """Ends the run `request` with an error of the driver's own (it is not the code's)."""
        run = request.get("run")
        value = f"the interpreter failed: {type_name(err)}: {err}"[:2000]
        with self.channel.lock:
            self.state.run = None
            error = {"k": "error", "run": run, "name": "InterpreterError", "value": value}
            self.channel.send({**error, "traceback": []})
            sent = self.channel.sent_in_run
            self.channel.send({"k": "done", "run": run, "count": 0, "frames": sent})

    def run(self, request: dict[str, Any]) -> None:
        run = int(request["run"])
        self.capture.restore()
        self.channel.verify()
        with self.channel.lock:
            self.state.run = run
            self.state.displays = 0
            self.state.dropped = []
            self.channel.sent_in_run = 0
            self.capture.begin()
            # the SDK sends SIGINT for this run only after this frame: see RunState.interrupted
            self.channel.send({"k": "start", "run": run})
        outcome = self.kernel.run(str(request["code"]))
        self._open_figures()
        self.capture.settle()
        self.capture.restore()
        if outcome.has_value:
            bundle = outcome.bundle
            if bundle is None:
                bundle = mime_bundle(
                    outcome.value, self.state.max_display_bytes, self.state.dropped
                )
            message: dict[str, Any] = {"k": "value", "run": run, "data": bundle}
            is_plain, data = plain_data(outcome.value)
            if is_plain:
                message["json"] = data
            self.channel.send(message)
        if outcome.error is not None:
            self.channel.send(error_frame(run, outcome.error[0], outcome.error[1]))
        with self.channel.lock:
            totals = self.capture.totals
            done = {
                "k": "done",
                "run": run,
                "count": outcome.count,
                "frames": self.channel.sent_in_run,
                "stdout_bytes": totals[0],
                "stderr_bytes": totals[1],
                "dropped": [note[:200] for note in self.state.dropped[:8]],
            }
            self.state.run = None
            self.channel.send(done)  # small: one atomic write to the pipe


def main() -> None:
    state_holder: list[RunState] = []

    def on_interrupt(signum: int, frame: Any) -> None:
        if state_holder:
            state_holder[0].interrupted()

    signal.signal(signal.SIGINT, on_interrupt)
    channel = Channel(_high_dup(0), _high_dup(1))
    hello = channel.read_request()
    if hello is None or hello.get("op") != "hello":
        return
    channel.token = bytes.fromhex(str(hello["token"]))
    try:
        driver = Driver(channel, hello)
    except BaseException as err:  # e.g. kernel="ipython" without IPython: say why, then end
        channel.send({"k": "fatal", "message": f"{type_name(err)}: {err}"[:2000]})
        raise SystemExit(1) from None
    state_holder.append(driver.state)
    with contextlib.suppress(Exception):
        sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    channel.send({"k": "ready", "kernel": driver.kernel.name, "python": sys.version.split()[0]})
    while True:
        request = channel.read_request()
        if request is None or request.get("op") == "close":
            return
        if request.get("op") == "run":
            driver.state.pending_interrupt = False  # any earlier run's interrupt was seen
            try:
                driver.run(request)
            except Exception as err:  # the driver's own failure: this run ends, the context lives
                driver.fail(request, err)
