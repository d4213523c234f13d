"""Runs an EgressGateway in the small internet's host namespace, driven by JSON lines on stdin.

`nsenter --net=/run/netns/<host> -- python gateway_driver.py --dns 192.0.2.1` starts it. Each
line in is a command, each line out its answer:

  {"op": "serve", "sandbox": "s1", "policy": {"internet": false, "rules": [{"dns_name": ...}]}}
      -> {"port": N}: the listening socket the test hands over on the unix socket `--handoff`
         (SCM_RIGHTS, as the supervisor hands a sandbox's listener to the service: it is bound
         in the sandbox's namespace, not this one) served under that policy
  {"op": "update", "sandbox": "s1", "policy": {...}}   -> {}
  {"op": "usage", "sandbox": "s1"}                     -> {"bytes_sent": ..., ...}
  {"op": "close", "sandbox": "s1"}                     -> the final usage
  {"op": "rss"}                                        -> {"rss_kib": N} of this process

An error answers {"error": "..."}. The process ends when stdin closes (gateway.close_all()).
`GatewayDriver` (below) starts it from a test and sends the commands.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import socket
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aviato.egress.gateway import EgressGateway
from aviato.egress.policy import check_rules
from aviato.egress.resolver import Resolver
from aviato.runtime.model import EgressPolicy, EgressRule

if TYPE_CHECKING:
    from small_internet import SmallInternet


def policy_of(data: dict[str, Any]) -> EgressPolicy:
    rules = check_rules(
        EgressRule(dns_name=r.get("dns_name", ""), cidr=r.get("cidr", ""))
        for r in data.get("rules", [])
    )
    return EgressPolicy(internet=bool(data.get("internet")), rules=rules)


def rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def receive_listener(handoff: socket.socket) -> socket.socket:
    connection, _ = handoff.accept()
    with connection:
        connection.settimeout(10)
        _, fds, _, _ = socket.recv_fds(connection, 16, 1)
    if len(fds) != 1:
        raise RuntimeError("no listener was handed over")
    return socket.socket(fileno=fds[0])


async def handle(
    gateway: EgressGateway, handoff: socket.socket, command: dict[str, Any]
) -> dict[str, Any]:
    op = command["op"]
    if op == "serve":
        listener = await asyncio.to_thread(receive_listener, handoff)
        port = listener.getsockname()[1]
        await gateway.serve(command["sandbox"], listener, policy_of(command["policy"]))
        return {"port": port}
    if op == "update":
        gateway.update(command["sandbox"], policy_of(command["policy"]))
        return {}
    if op == "usage":
        return dataclasses.asdict(gateway.usage(command["sandbox"]))
    if op == "close":
        usage = await gateway.close(command["sandbox"])
        return dataclasses.asdict(usage) if usage else {}
    if op == "rss":
        return {"rss_kib": rss_kib()}
    return {"error": f"unknown op {op!r}"}


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dns", required=True)
    parser.add_argument("--handoff", required=True, help="unix socket path for listeners")
    parser.add_argument("--dns-timeout", type=float, default=5.0)
    parser.add_argument("--connect-timeout", type=float, default=10.0)
    parser.add_argument("--max-connections", type=int, default=256)
    args = parser.parse_args()
    gateway = EgressGateway(
        Resolver([args.dns], timeout=args.dns_timeout),
        connect_timeout=args.connect_timeout,
        max_connections_per_sandbox=args.max_connections,
    )
    handoff = socket.socket(socket.AF_UNIX)
    handoff.bind(args.handoff)
    handoff.listen(1)
    handoff.settimeout(10)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    print(json.dumps({"ready": True}), flush=True)
    try:
        while line := await reader.readline():
            try:
                answer = await handle(gateway, handoff, json.loads(line))
            except Exception as e:
                answer = {"error": f"{type(e).__name__}: {e}"}
            print(json.dumps(answer), flush=True)
    finally:
        await gateway.close_all()


class GatewayDriver:
    """An EgressGateway in the host namespace; `call` sends a command, returns its answer."""

    def __init__(self, internet: SmallInternet, directory: Path, *options: str) -> None:
        self.internet = internet
        self.handoff = directory / "handoff.sock"
        self.process = subprocess.Popen(
            [*internet.enter("host"), sys.executable, str(Path(__file__).resolve()),
             "--dns", internet.dns, "--handoff", str(self.handoff), *options],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=(directory / "driver.log").open("w"),
            text=True,
        )  # fmt: skip
        self.log = directory / "driver.log"
        assert json.loads(self._line()) == {"ready": True}

    def _line(self) -> str:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        assert line, "the gateway driver ended"
        return line

    def call(self, op: str, **fields: Any) -> dict[str, Any]:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps({"op": op, **fields}) + "\n")
        self.process.stdin.flush()
        answer: dict[str, Any] = json.loads(self._line())
        assert "error" not in answer, answer["error"]
        return answer

    def serve(self, sandbox: str, internet: bool = False, **rules: list[str]) -> int:
        """Serves a sandbox whose listener is bound on 127.0.0.1 of the sandbox namespace;
        returns its port there."""
        listener = self.internet.socket_in("sandbox")
        with listener:
            listener.bind(("127.0.0.1", 0))
            listener.listen(128)
            with socket.socket(socket.AF_UNIX) as handing:
                handing.connect(str(self.handoff))
                socket.send_fds(handing, [b"L"], [listener.fileno()])
            policy = {
                "internet": internet,
                "rules": [{kind: value} for kind, values in rules.items() for value in values],
            }
            answer = self.call("serve", sandbox=sandbox, policy=policy)
        return int(answer["port"])

    def rss_kib(self) -> int:
        return int(self.call("rss")["rss_kib"])

    def stop(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


if __name__ == "__main__":
    asyncio.run(main())
