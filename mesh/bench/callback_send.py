"""`python -m tidegate.bench.callback_send`: what one HTTP callback costs the driver's CPU.

It drives the driver's real sender (`Transports.send`, with the address policy, the
before-write guard, the capped read and the whole-exchange timeout) in the flood's shape: C
clients, up to `concurrency` requests in flight per client (`callback_concurrency`), one
callback per request or batches, against the flood's callback receiver (`sink.CallbackSink`)
run in a child process with a configurable latency, so this process's CPU time
(`time.process_time`) is the sender's alone. `transports-signed` adds a Standard Webhooks
secret (the flood's clients have none).

Beside it, the ceilings on the same receiver, in the same run: a bare `httpx.AsyncClient` with
its default pool (`httpx-default`) and with one pool per client and no caps
(`httpx-per-client`), and a raw asyncio HTTP/1.1 keep-alive loop, one connection per request
in flight (`raw`: the floor cost of a request in Python here). Each figure is a steady-state
window after a warm-up, the median of `repeat` runs interleaved across senders. `CPU share`
is this process's CPU seconds per second (near 1: the sender is the limit, not the receiver);
`connections opened` counts the connections the receiver accepted in the window (a pool that
closes idle connections reconnects, every new connection resolved and checked by the address
policy). Another sender can be compared by adding it to `FACTORIES` from a script.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import Final

import httpx
import msgspec
from nats.aio.client import Client as NATS

from tidegate.bench.sink import CallbackSink
from tidegate.driver.callbacks.payload import Callback, encode_batch
from tidegate.driver.callbacks.transport import Transports
from tidegate.signing import new_secret
from tidegate.urlpolicy import LOCAL_CALLBACK_NETS, parse_nets
from tidegate.wire import ClientRecord

SENDERS: Final = (
    "transports",
    "transports-signed",
    "httpx-default",
    "httpx-per-client",
    "raw",
)
ALLOW: Final = parse_nets(LOCAL_CALLBACK_NETS)  # the receiver is on loopback
_MODULE: Final = "tidegate.bench.callback_send"  # `__name__` is __main__ under -m


class SendConfig(msgspec.Struct, frozen=True, kw_only=True):
    clients: int = 20
    concurrency: int = 16  # requests in flight per client
    latencies_ms: tuple[float, ...] = (0.0, 50.0)
    batches: tuple[int, ...] = (1, 16)  # callbacks per request (1: the client takes no batches)
    senders: tuple[str, ...] = SENDERS
    warmup_s: float = 1.0
    seconds: float = 5.0
    repeat: int = 3


class Figure(msgspec.Struct, frozen=True, kw_only=True):
    sender: str
    latency_ms: float
    batch: int
    requests_per_s: float
    callbacks_per_s: float
    cpu_ms_per_request: float  # this process's CPU time per request
    cpu_s_per_1000_callbacks: float
    connections: int  # accepted by the receiver during the window
    cpu_share: float  # this process's CPU seconds per second: near 1, the sender is the limit
    sink_cpu_ms_per_request: float  # the receiver's: when it is near 1000/requests_per_s, it limits


# --- the receiver, in a child process ------------------------------------------------------


class _CountingSink(CallbackSink):
    """The flood's receiver, also counting the connections it accepts."""

    connections = 0

    async def __aenter__(self) -> _CountingSink:
        # A listen backlog for every request in flight at once: asyncio's default (100)
        # overflows at 320, the kernel answers with SYN cookies and resets a few connections.
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, backlog=4096)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        await super()._serve(reader, writer)


async def _serve_sink(latency_ms: float) -> None:
    """The child's side: the port on stdout, then one line of figures per line on stdin."""
    loop = asyncio.get_running_loop()
    stdin = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
    async with _CountingSink(latency_ms) as sink:
        print(json.dumps({"port": sink.port}), flush=True)
        while await stdin.readline():
            # Only counts: the sink's per-callback records grow without bound otherwise.
            sink.ids.clear()
            sink.latest.clear()
            sink.arrivals.clear()
            for values in sink.latency_ms.values():
                values.clear()
            figures = {
                "connections": sink.connections,
                "requests": sink.requests,
                "received": sink.received,
                "bad": sink.bad_requests,
                "cpu_s": time.process_time(),
            }
            print(json.dumps(figures), flush=True)


class _SinkProcess:
    def __init__(self, latency_ms: float) -> None:
        self._proc = subprocess.Popen(
            [sys.executable, "-m", _MODULE, "--serve-sink", "--latency-ms", str(latency_ms)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.port = int(self._read()["port"])

    def _read(self) -> dict[str, float]:
        assert self._proc.stdout is not None
        line = self._proc.stdout.readline()
        if not line:
            raise RuntimeError("the callback receiver exited; see its error above")
        got: dict[str, float] = json.loads(line)
        return got

    def figures(self) -> dict[str, float]:
        assert self._proc.stdin is not None
        self._proc.stdin.write("stats\n")
        self._proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        assert self._proc.stdin is not None
        self._proc.stdin.close()
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()


# --- the senders ---------------------------------------------------------------------------

# One request's worth of work: sends `callbacks` to `client`, raises when it was not taken.
Send = Callable[[str, list[Callback]], Awaitable[None]]


def _callback(client: str, n: int) -> Callback:
    now = datetime.now(UTC)
    return Callback(
        event_id=f"{client}-{n}-succeeded",
        task_id=f"{client}-{n}",
        client=client,
        key=f"key-{n}",
        state="succeeded",
        attempt=1,
        at=now,
        executor="executor-1",
        exit_code=0,
        started_at=now,
        finished_at=now,
        run=n,
    )


def _lease_check() -> Callable[[], None]:
    """Stands for the notifier's lease check, which runs before every socket write."""
    until = time.monotonic() + 3600

    def check() -> None:
        if time.monotonic() > until:
            raise RuntimeError("lease lost")

    return check


@contextlib.asynccontextmanager
async def _transports(
    port: int, batch: int, signed: bool, kind: type[Transports] = Transports
) -> AsyncIterator[Send]:
    transports = kind(NATS(), timeout_s=5.0, allowed_nets=ALLOW)
    secret = new_secret() if signed else None
    records: dict[str, ClientRecord] = {}
    check = _lease_check()

    async def send(client: str, callbacks: list[Callback]) -> None:
        record = records.get(client)
        if record is None:
            record = records[client] = ClientRecord(
                name=client,
                callback_url=f"http://127.0.0.1:{port}/{client}",
                callback_secret=secret,
                callback_batch_max=batch,
            )
        await transports.send(record, callbacks, before_each=check)

    try:
        yield send
    finally:
        await transports.close()


@contextlib.asynccontextmanager
async def _httpx_default(port: int, batch: int) -> AsyncIterator[Send]:
    async with httpx.AsyncClient() as http:

        async def send(client: str, callbacks: list[Callback]) -> None:
            body = encode_batch(callbacks, batch=batch > 1)
            resp = await http.post(
                f"http://127.0.0.1:{port}/{client}",
                content=body,
                headers={"Content-Type": "application/json"},
            )
            resp.raise_for_status()

        yield send


@contextlib.asynccontextmanager
async def _httpx_per_client(port: int, batch: int) -> AsyncIterator[Send]:
    """Bare httpx as the driver pools it: one client per callback client, no keep-alive cap."""
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    pools: dict[str, httpx.AsyncClient] = {}
    try:

        async def send(client: str, callbacks: list[Callback]) -> None:
            http = pools.get(client)
            if http is None:
                http = pools[client] = httpx.AsyncClient(limits=limits)
            body = encode_batch(callbacks, batch=batch > 1)
            resp = await http.post(
                f"http://127.0.0.1:{port}/{client}",
                content=body,
                headers={"Content-Type": "application/json"},
            )
            resp.raise_for_status()

        yield send
    finally:
        for http in pools.values():
            await http.aclose()


@contextlib.asynccontextmanager
async def _raw(port: int, batch: int) -> AsyncIterator[Send]:
    """HTTP/1.1 by hand: one keep-alive connection per request in flight, reused."""
    idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    opened: list[asyncio.StreamWriter] = []

    async def send(client: str, callbacks: list[Callback]) -> None:
        body = encode_batch(callbacks, batch=batch > 1)
        if idle:
            reader, writer = idle.pop()
        else:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            opened.append(writer)
        head = (
            f"POST /{client} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode()
        writer.write(head + body)
        got = await reader.readuntil(b"\r\n\r\n")
        length = 0
        for line in got.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.lower() == b"content-length":
                length = int(value)
        await reader.readexactly(length)
        if not got.startswith(b"HTTP/1.1 2"):
            raise RuntimeError(got.split(b"\r\n", 1)[0].decode())
        idle.append((reader, writer))

    try:
        yield send
    finally:
        for writer in opened:
            writer.close()


SenderFactory = Callable[[int, int], contextlib.AbstractAsyncContextManager[Send]]
# name → (receiver port, callbacks per request) → a sender; a comparison may add its own.
FACTORIES: dict[str, SenderFactory] = {
    "transports": lambda port, batch: _transports(port, batch, signed=False),
    "transports-signed": lambda port, batch: _transports(port, batch, signed=True),
    "httpx-default": _httpx_default,
    "httpx-per-client": _httpx_per_client,
    "raw": _raw,
}


def _sender(name: str, port: int, batch: int) -> contextlib.AbstractAsyncContextManager[Send]:
    factory = FACTORIES.get(name)
    if factory is None:
        raise ValueError(f"unknown sender {name!r}; one of {', '.join(FACTORIES)}")
    return factory(port, batch)


# --- one measurement -----------------------------------------------------------------------


async def measure(
    cfg: SendConfig, sender: str, latency_ms: float, batch: int, sink: _SinkProcess
) -> Figure:
    """One steady-state window of one sender: `clients` x `concurrency` workers sending."""
    done = [0, 0]  # requests, callbacks
    failed: list[BaseException] = []
    stop = asyncio.Event()
    clients = [f"client-{i:02d}" for i in range(cfg.clients)]

    async def worker(send: Send, client: str, w: int) -> None:
        n = w * 10_000_000
        while not stop.is_set():
            chunk = [_callback(client, n + i) for i in range(batch)]
            n += batch
            try:
                await send(client, chunk)
            except Exception as exc:  # counted and shown: a timeout is a figure too
                failed.append(exc)
                continue
            done[0] += 1
            done[1] += batch

    async with _sender(sender, sink.port, batch) as send:
        workers = [
            asyncio.create_task(worker(send, c, i * cfg.concurrency + j))
            for i, c in enumerate(clients)
            for j in range(cfg.concurrency)
        ]
        await asyncio.sleep(cfg.warmup_s)
        before, sink0 = (done[0], done[1], time.process_time(), time.monotonic()), sink.figures()
        await asyncio.sleep(cfg.seconds)
        after, sink1 = (done[0], done[1], time.process_time(), time.monotonic()), sink.figures()
        stop.set()
        await asyncio.gather(*workers)
    if failed:
        print(f"  {sender}: {len(failed)} requests failed, e.g. {failed[0]}", file=sys.stderr)
    requests, callbacks = after[0] - before[0], after[1] - before[1]
    cpu, wall = after[2] - before[2], after[3] - before[3]
    sink_requests = max(1.0, sink1["requests"] - sink0["requests"])
    return Figure(
        sender=sender,
        latency_ms=latency_ms,
        batch=batch,
        requests_per_s=round(requests / wall, 1),
        callbacks_per_s=round(callbacks / wall, 1),
        cpu_ms_per_request=round(cpu * 1000 / max(1, requests), 3),
        cpu_s_per_1000_callbacks=round(cpu * 1000 / max(1, callbacks), 3),
        connections=int(sink1["connections"] - sink0["connections"]),
        cpu_share=round(cpu / wall, 2),
        sink_cpu_ms_per_request=round((sink1["cpu_s"] - sink0["cpu_s"]) * 1000 / sink_requests, 3),
    )


def median_figure(runs: Sequence[Figure]) -> Figure:
    """Per field, the median of the runs (the runs' spread goes beside it, in `spread`)."""
    first = runs[0]

    def med(field: str) -> float:
        return float(statistics.median(getattr(r, field) for r in runs))

    return Figure(
        sender=first.sender,
        latency_ms=first.latency_ms,
        batch=first.batch,
        requests_per_s=med("requests_per_s"),
        callbacks_per_s=med("callbacks_per_s"),
        cpu_ms_per_request=med("cpu_ms_per_request"),
        cpu_s_per_1000_callbacks=med("cpu_s_per_1000_callbacks"),
        connections=int(med("connections")),
        cpu_share=med("cpu_share"),
        sink_cpu_ms_per_request=med("sink_cpu_ms_per_request"),
    )


async def run(cfg: SendConfig, log: Callable[[str], None] = print) -> list[tuple[Figure, str]]:
    """Every (latency, batch, sender), `repeat` times interleaved; medians and their ranges."""
    out: list[tuple[Figure, str]] = []
    for latency in cfg.latencies_ms:
        sink = await asyncio.to_thread(_SinkProcess, latency)
        try:
            for batch in cfg.batches:
                runs: dict[str, list[Figure]] = {s: [] for s in cfg.senders}
                for _ in range(cfg.repeat):
                    for sender in cfg.senders:
                        fig = await measure(cfg, sender, latency, batch, sink)
                        log(f"  {format_row(fig)}")
                        runs[sender].append(fig)
                for sender in cfg.senders:
                    cbs = [f.callbacks_per_s for f in runs[sender]]
                    cpu = [f.cpu_s_per_1000_callbacks for f in runs[sender]]
                    spread = f"{min(cbs):,.0f}..{max(cbs):,.0f}/s; {min(cpu):.3f}..{max(cpu):.3f} s"
                    out.append((median_figure(runs[sender]), spread))
        finally:
            await asyncio.to_thread(sink.close)
    return out


HEADER: Final = (
    "| sender | latency ms | batch | requests/s | callbacks/s | CPU ms/request "
    "| CPU s/1000 callbacks | CPU share | connections opened | receiver CPU ms/request "
    "| range of runs |\n"
    "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"
)


def format_row(f: Figure, spread: str = "") -> str:
    return (
        f"| {f.sender} | {f.latency_ms:g} | {f.batch} | {f.requests_per_s:,.0f} "
        f"| {f.callbacks_per_s:,.0f} | {f.cpu_ms_per_request:.3f} "
        f"| {f.cpu_s_per_1000_callbacks:.3f} | {f.cpu_share:.2f} | {f.connections} "
        f"| {f.sink_cpu_ms_per_request:.3f} | {spread} |"
    )


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.split(",") if x.strip())


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip())


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tidegate.bench.callback_send", description=__doc__)
    p.add_argument("--clients", type=int, default=20)
    p.add_argument("--concurrency", type=int, default=16, help="requests in flight per client")
    p.add_argument("--latency-ms", type=_floats, default=(0.0, 50.0), help="e.g. 0,50")
    p.add_argument("--batch", type=_ints, default=(1, 16), help="callbacks per request, e.g. 1,16")
    p.add_argument("--senders", default=",".join(SENDERS), help=", ".join(SENDERS))
    p.add_argument("--seconds", type=float, default=5.0, help="measured window per run")
    p.add_argument("--warmup", type=float, default=1.0, help="seconds before each window")
    p.add_argument("--repeat", type=int, default=3, help="runs per figure (the median is shown)")
    p.add_argument("--json", action="store_true", help="the figures as JSON on stdout")
    p.add_argument("--serve-sink", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve_sink:
        asyncio.run(_serve_sink(args.latency_ms[0]))
        return 0
    cfg = SendConfig(
        clients=args.clients,
        concurrency=args.concurrency,
        latencies_ms=args.latency_ms,
        batches=args.batch,
        senders=tuple(s.strip() for s in args.senders.split(",") if s.strip()),
        warmup_s=args.warmup,
        seconds=args.seconds,
        repeat=args.repeat,
    )
    with open("/proc/loadavg") as f:
        load = " ".join(f.read().split()[:3])
    log = (lambda line: print(line, file=sys.stderr)) if args.json else print
    log(f"load average before: {load}")
    figures = asyncio.run(run(cfg, log))
    with open("/proc/loadavg") as f:
        load_after = " ".join(f.read().split()[:3])
    if args.json:
        out = [msgspec.to_builtins(f) | {"range": s} for f, s in figures]
        sys.stdout.write(json.dumps({"load": [load, load_after], "figures": out}, indent=1) + "\n")
    else:
        print(f"\nmedians of {cfg.repeat}; load average before {load}, after {load_after}")
        print(HEADER)
        for fig, spread in figures:
            print(format_row(fig, spread))
    return 0


if __name__ == "__main__":
    sys.exit(main())
