"""The whole client SDK against a real cluster (issue 10, point 2): a client reads, lists and
cancels its own tasks through the drivers' `tg.api.<client>.…` subjects and is refused another
client's; it receives its NATS callbacks with an iterator that answers only handled ones; the
README's client loop runs as it is printed. Real nats-server, PostgreSQL, drivers, executors."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import Any, TypeVar

import pytest
from harness import Cluster, register, wait_for
from nats.aio.client import Client as NATS

from tidegate import names
from tidegate.bus.natsconn import connect
from tidegate.client import TidegateClient
from tidegate.embedded.servers import free_port
from tidegate.errors import ApiRefused, ApiUnavailable
from tidegate.wire import (
    STATE_RANK,
    Callback,
    ClientRecord,
    ErrorReply,
    TaskSpec,
    decode_cancel,
    decode_reply,
)

T = TypeVar("T")
README = Path(__file__).resolve().parents[2] / "README.md"
# A callback whose handler raised is resent from the outbox within a few seconds.
RETRY_ENV = {
    "TIDEGATE_RETRY_EVERY_S": "0.5",
    "TIDEGATE_RETRY_BASE_S": "0.2",
    "TIDEGATE_RETRY_CAP_S": "1",
    "TIDEGATE_CALLBACK_TIMEOUT_S": "2",
}


@pytest.fixture
async def nc(cluster: Cluster) -> AsyncIterator[NATS]:
    conn = await connect(cluster.nats_url, "test-raw")
    yield conn
    await conn.drain()


async def raw(nc: NATS, client: str, op: str, body: bytes) -> Any:
    msg = await nc.request(names.api_subject(client, op), body, timeout=10)
    return decode_reply(msg.data)


async def api_ready(cluster: Cluster, client: str) -> None:
    """Wait until a driver serves the client API (drivers are processes starting meanwhile)."""
    last: list[ApiUnavailable] = []
    async with await TidegateClient.connect(cluster.nats_url, client) as tg:

        async def serving() -> bool:
            try:
                await tg.get("probe")
            except ApiUnavailable as exc:
                last[:] = [exc]
                return False
            return True

        try:
            await wait_for(serving, timeout=60, what="a driver serving the client API")
        except AssertionError as exc:
            raise AssertionError(f"{exc} ({last})\n{cluster.logs()}") from None


async def state_of(tg: TidegateClient, key: str, want: str) -> bool:
    task = await tg.get(key)
    return task is not None and task.state == want


async def test_a_client_reads_lists_and_cancels_its_own_tasks_only(
    cluster: Cluster, nc: NATS
) -> None:
    cluster.driver()
    cluster.executor(slots=8)
    await api_ready(cluster, "alpha")
    async with (
        await TidegateClient.connect(cluster.nats_url, "alpha") as alpha,
        await TidegateClient.connect(cluster.nats_url, "beta") as beta,
    ):
        await alpha.submit_many(TaskSpec(key=f"k{i}", argv=["true"]) for i in range(5))
        await alpha.submit(TaskSpec(key="slow", argv=["sleep", "60"]))
        await beta.submit(TaskSpec(key="slow", argv=["sleep", "60"]))
        await wait_for(lambda: state_of(alpha, "k4", "succeeded"), timeout=60, what="k4 done")
        done = await alpha.get("k4")
        assert done is not None and done.task_id == "alpha:k4" and done.exit_code == 0
        assert done.attempt == 1 and done.finished_at is not None and done.finished
        assert await alpha.get("never-submitted") is None

        # Both slow tasks run; alpha cancels its own, and cannot touch beta's.
        await wait_for(lambda: state_of(alpha, "slow", "running"), timeout=60, what="running")
        await wait_for(lambda: state_of(beta, "slow", "running"), timeout=60, what="running")
        refused = await raw(nc, "alpha", "cancel", b'{"task_id": "beta:slow"}')
        assert isinstance(refused, ErrorReply) and refused.code == "not_yours"
        peek = await raw(nc, "alpha", "get", b'{"task_id": "beta:slow"}')
        assert isinstance(peek, ErrorReply) and peek.code == "not_yours"
        cancelled = await alpha.cancel("slow")
        assert cancelled.task_id == "alpha:slow" and cancelled.state == "running"
        assert cancelled.run is not None
        await wait_for(lambda: state_of(alpha, "slow", "cancelled"), timeout=30, what="cancel")
        beta_slow = await beta.get("slow")
        assert beta_slow is not None and beta_slow.state == "running"  # untouched by alpha

        # Lists hold only the subject's client's tasks, newest first, page by page.
        everything = [t async for t in alpha.iter_tasks(page_size=2)]
        assert {t.key for t in everything} == {"k0", "k1", "k2", "k3", "k4", "slow"}
        assert all(t.client == "alpha" for t in everything)
        stamps = [(t.submitted_at, t.task_id) for t in everything]
        assert stamps == sorted(stamps, key=lambda s: s[0], reverse=True)
        first = await alpha.list(limit=4)
        second = await alpha.list(limit=4, after=first.next)
        assert len(first.tasks) == 4 and first.next is not None
        assert len(second.tasks) == 2 and second.next is None
        assert [t.key for t in tasks_of(first, second)] == [t.key for t in everything]
        only = await alpha.list(state="cancelled")
        assert [t.key for t in only.tasks] == ["slow"]
        assert [t.key for t in (await beta.list()).tasks] == ["slow"]

        # A malformed request gets a clear reason, and the driver goes on serving.
        bad = await raw(nc, "alpha", "list", b'{"limit": "many"}')
        assert isinstance(bad, ErrorReply) and bad.code == "bad_request" and "limit" in bad.message
        garbage = await raw(nc, "alpha", "get", b"\xff\x00 not json")
        assert isinstance(garbage, ErrorReply) and garbage.code == "bad_request"
        with pytest.raises(ApiRefused, match="page cursor") as caught:
            await alpha.list(after="not-a-cursor")
        assert caught.value.code == "bad_request"
        assert await alpha.get("k0") is not None

        # An unregistered client is told so.
        nobody = TidegateClient(nc, "nobody")
        with pytest.raises(ApiRefused, match="tidegate client add nobody") as caught:
            await nobody.get("k0")
        assert caught.value.code == "unknown_client"

        await beta.cancel("slow")
        await wait_for(lambda: state_of(beta, "slow", "cancelled"), timeout=30, what="cancel")


def tasks_of(*pages: Any) -> list[Any]:
    return [t for page in pages for t in page.tasks]


async def test_without_a_driver_the_sdk_says_to_start_one(nats_url: str) -> None:
    async with await TidegateClient.connect(nats_url, "alpha") as tg:
        with pytest.raises(ApiUnavailable, match="start one") as caught:
            await tg.get("k")
        assert caught.value.code == "no_driver"


async def test_reads_say_plainly_when_the_database_is_down_and_cancels_still_go(
    cluster: Cluster,
) -> None:
    # A driver whose PostgreSQL is not there at all (nothing listens on that port).
    cluster.driver(TIDEGATE_DATABASE_URL=f"postgresql://tidegate@127.0.0.1:{free_port()}/gone")
    async with await TidegateClient.connect(cluster.nats_url, "alpha") as tg:

        async def refused() -> ApiUnavailable | None:
            try:
                await tg.get("k")
            except ApiUnavailable as exc:
                return exc if exc.code != "no_driver" else None
            raise AssertionError("a read without a database answered")

        exc = await wait_for(refused, timeout=60, what="the driver's answer")
        assert exc.code == "database_unavailable", exc
        assert "reads need PostgreSQL" in str(exc) and "try again later" in str(exc)
        with pytest.raises(ApiUnavailable, match="reads need PostgreSQL"):
            await tg.list()
        # Cancelling needs NATS only: without the latest run it names every run so far.
        cancelled = await tg.cancel("k")
        assert (cancelled.task_id, cancelled.run, cancelled.state) == ("alpha:k", None, None)
        kv = await tg._nc.jetstream().key_value(names.CANCEL_BUCKET)
        stored = decode_cancel((await kv.get(names.kv_key("alpha:k"))).value or b"")
        assert stored.task_id == "alpha:k" and stored.run is None and stored.at is not None


async def within(cluster: Cluster, work: Awaitable[T], what: str, timeout: float = 60) -> T:
    try:
        return await asyncio.wait_for(work, timeout)
    except TimeoutError:
        raise AssertionError(f"{what}: not within {timeout}s\n{cluster.logs()}") from None


async def collect(
    stream: Any, until: set[str], *, raise_at: str | None = None, seen: list[Callback] | None = None
) -> list[Callback]:
    """Callbacks until every key in `until` has a terminal one; the handler raises at the
    first callback of state `raise_at`."""
    got: list[Callback] = [] if seen is None else seen
    finished: set[str] = set()
    async for cb in stream:
        got.append(cb)
        if cb.state == raise_at:
            raise RuntimeError(f"handler failed on {cb.event_id}")
        if STATE_RANK[cb.state] == STATE_RANK["succeeded"]:
            finished.add(cb.key)
        if finished >= until:
            break
    return got


async def test_callbacks_arrive_in_order_and_a_failed_handler_gets_them_again(
    cluster: Cluster,
) -> None:
    await register(
        cluster.nats_url,
        cluster.database_url,
        ClientRecord(name="sdk", sensitive=True, callback_nats=True),
    )
    cluster.driver(**RETRY_ENV)
    cluster.executor(slots=4)
    await api_ready(cluster, "sdk")
    async with await TidegateClient.connect(cluster.nats_url, "sdk") as tg:
        # Every state of a sensitive client's task, in order, each answered once handled.
        async with tg.callbacks() as stream:
            await tg.submit(TaskSpec(key="one", argv=["true"]))
            got = await within(cluster, collect(stream, {"one"}), "callbacks of one")
        states = [cb.state for cb in got]
        assert states[-1] == "succeeded" and "running" in states, states
        assert states == sorted(states, key=STATE_RANK.__getitem__), states
        assert len({cb.event_id for cb in got}) == len(got)
        # A sensitive client's read never lags its callback.
        task = await tg.get("one")
        assert task is not None and task.state == "succeeded"

        # The handler raises on the `running` callback and the exception leaves the `async
        # with`: the callback is left unanswered, so the driver sends it again (from its
        # outbox), followed by the states after it, in order. (An exception caught inside the
        # block would end it normally: that answers the callback being handled.)
        first: list[Callback] = []
        with pytest.raises(RuntimeError, match="handler failed"):
            async with tg.callbacks() as stream:
                await tg.submit(TaskSpec(key="two", argv=["true"]))
                await within(
                    cluster, collect(stream, {"two"}, raise_at="running", seen=first), "two, 1st"
                )
        assert [cb.state for cb in first][-1] == "running"
        async with tg.callbacks() as stream:
            again = await within(cluster, collect(stream, {"two"}), f"two again after {first}")
        assert [cb.state for cb in again if cb.state == "running"] == ["running"], (first, again)
        assert again[0].event_id.endswith("/running"), [cb.event_id for cb in again]
        assert again[-1].state == "succeeded"
        states = [cb.state for cb in again]
        assert states == sorted(states, key=STATE_RANK.__getitem__), states


async def test_the_readme_client_loop_runs_as_printed(
    cluster: Cluster, capsys: pytest.CaptureFixture[str]
) -> None:
    block = re.search(
        r"<!-- client-loop:start -->\n```python\n(.*?)```\n<!-- client-loop:end -->",
        README.read_text(),
        re.S,
    )
    assert block, "the README's client loop is gone"
    await register(
        cluster.nats_url,
        cluster.database_url,
        ClientRecord(name="billing", sensitive=True, callback_nats=True),
    )
    cluster.driver()
    cluster.executor(slots=4)
    await api_ready(cluster, "billing")
    scope: dict[str, Any] = {"__name__": "readme"}  # not __main__: its asyncio.run is ours
    exec(block.group(1), scope)  # the README's code, as a client system would paste it
    await within(cluster, scope["main"](cluster.nats_url), "the README's loop", 90)
    out = capsys.readouterr().out
    assert re.search(r"^report-\w+ succeeded 0 ", out, re.M), out
    assert re.search(r"^sync-\w+ cancelled ", out, re.M), out
    assert "('succeeded', 0, datetime.datetime(" in out, out
    assert re.search(r"^billing:sync-\w+ ", out, re.M), out
