"""An SDK exec whose connection breaks while the service stays up (a network that dropped):
the SDK attaches again from the last byte it received, and the result has every byte and the
exit status; the command never notices. Through a relay of the service's unix socket whose
connections the test cuts."""

from __future__ import annotations

import contextlib
import socket
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from server_helpers import ServerProcess

from aviato import Sandbox


class SocketRelay:
    """Relays each connection made to `path` to the unix socket `upstream`; `cut()` breaks
    every connection open now (new ones are relayed as before)."""

    def __init__(self, path: Path, upstream: Path) -> None:
        self.path = path
        self._upstream = upstream
        self._open: list[socket.socket] = []
        self._lock = threading.Lock()
        self._listener = socket.socket(socket.AF_UNIX)
        self._listener.bind(str(path))
        self._listener.listen(16)
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                client, _ = self._listener.accept()
                server = socket.socket(socket.AF_UNIX)
                server.connect(str(self._upstream))
                with self._lock:
                    self._open += [client, server]
                for a, b in ((client, server), (server, client)):
                    threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
        for s in (source, sink):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def cut(self) -> int:
        with self._lock:
            cut, self._open = self._open, []
        for s in cut:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()
        return len(cut) // 2

    def close(self) -> None:
        self._listener.close()
        self.cut()


@pytest.fixture
def relay(server: ServerProcess) -> Iterator[SocketRelay]:
    with tempfile.TemporaryDirectory(prefix="avr", dir="/tmp") as tmp:
        relay = SocketRelay(Path(tmp) / "relay.sock", server.socket_path)
        yield relay
        relay.close()


@pytest.mark.slow
def test_an_exec_resumes_after_its_connection_broke(relay: SocketRelay) -> None:
    sb = Sandbox.run(base_url=f"unix://{relay.path}")
    try:
        script = "for i in $(seq 1 300); do echo line-$i; sleep 0.005; done; exit 3"
        process = sb.exec(["sh", "-c", script])
        seen = ""
        chunks = iter(process.stdout)
        while "line-20\n" not in seen:
            seen += next(chunks)
        assert relay.cut() >= 1  # the network drops; the service and the command go on
        result = process.result(timeout=60)
        assert result.stdout == "".join(f"line-{i}\n" for i in range(1, 301))
        assert result.returncode == 3
        assert seen + "".join(chunks) == result.stdout  # the live stream, too, lost nothing
    finally:
        sb.stop().result(timeout=30)
