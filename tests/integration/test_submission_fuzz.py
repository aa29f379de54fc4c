"""Bad input at volume, through a real driver: hypothesis publishes batches of random and
adversarial submissions straight to the bus (no SDK to tidy them up). Every one is accounted
for, and the driver stays healthy:

    accepted (routed) + rejected + set aside as a message dead letter = stored in the stream

Publishes the server itself refuses (a wildcard subject) or drops as duplicates (a repeated
`Nats-Msg-Id` within the dedup window) never reach a stage; they are counted apart.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import nats
import nats.errors
import nats.js.errors
import pytest
from adversarial import BODIES, HEADERS
from harness import Cluster, metric, scrape, wait_for
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from tidegate.client import TidegateClient
from tidegate.embedded.servers import free_port
from tidegate.wire import TaskSpec

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

# Registered clients, an unknown one, and names no client can have (dotted, wildcard).
_CLIENTS = st.sampled_from(["alpha", "beta", "nobody", "a.b", "alpha.x", "*", ">", "x*"])
_SUBMISSION = st.tuples(_CLIENTS, BODIES, HEADERS)


@dataclass
class Sent:
    stored: int = 0  # PubAck'ed as new: every stage must account for it
    duplicates: int = 0  # PubAck'ed as a duplicate of an earlier Nats-Msg-Id: never routed
    refused: int = 0  # the server refused the publish (no stream took it)


def _counted(port: int) -> float:
    text = scrape(port)
    return (
        metric(text, "tidegate_tasks_routed_total")
        + metric(text, "tidegate_tasks_rejected_total")
        + metric(text, "tidegate_message_dead_letters_total")
    )


async def _publish(url: str, batch: list[tuple[str, bytes, str | None]]) -> Sent:
    sent = Sent()
    nc = await nats.connect(url)
    js = nc.jetstream()
    try:
        for client, body, header in batch:
            headers = {"Nats-Msg-Id": header} if header else None
            try:
                ack = await js.publish(f"tg.submit.{client}", body, headers=headers, timeout=5)
            except (nats.errors.Error, nats.js.errors.Error, ValueError):
                sent.refused += 1
                continue
            if ack.duplicate:
                sent.duplicates += 1
            else:
                sent.stored += 1
    finally:
        await nc.close()
    return sent


def test_random_and_adversarial_submissions_are_each_accounted_for(cluster: Cluster) -> None:
    port = free_port()
    driver = cluster.driver("--metrics-port", str(port))
    totals = Sent()

    async def counted_at_least(n: float) -> tuple[float] | None:
        try:
            seen = _counted(port)
        except OSError:  # the metrics server is not up yet
            return None
        return (seen,) if seen >= n else None

    @settings(
        max_examples=6,
        deadline=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
        # Examples share one driver: a shrunk example would be judged against the leftovers
        # of the failing one. The failing batch is reported whole instead.
        phases=[Phase.explicit, Phase.generate],
    )
    @given(batch=st.lists(_SUBMISSION, min_size=20, max_size=60))
    def one_batch(batch: list[tuple[str, bytes, str | None]]) -> None:
        (before,) = asyncio.run(
            wait_for(lambda: counted_at_least(0), timeout=60, what="the driver's metrics")
        )
        sent = asyncio.run(_publish(cluster.nats_url, batch))
        for field in ("stored", "duplicates", "refused"):
            setattr(totals, field, getattr(totals, field) + getattr(sent, field))
        target = before + sent.stored
        try:
            (after,) = asyncio.run(
                wait_for(lambda: counted_at_least(target), timeout=60, what="accounted for")
            )
        except AssertionError:
            raise AssertionError(
                f"{_counted(port) - before} of {sent} accounted for\n{driver.log()[-6000:]}"
            ) from None
        assert after == target, (after, target, sent)  # not more either: each counted once
        assert driver.alive(), driver.log()[-4000:]

    one_batch()
    assert totals.stored > 0 and totals.refused + totals.duplicates > 0, totals
    # Still healthy: a proper submission goes through after all that.
    asyncio.run(_good_submission_routes(cluster, port))
    assert driver.alive(), driver.log()[-4000:]


async def _good_submission_routes(cluster: Cluster, port: int) -> None:
    text = scrape(port)
    routed = metric(text, "tidegate_tasks_routed_total")
    async with await TidegateClient.connect(cluster.nats_url, "gamma") as tg:
        result = await tg.submit(TaskSpec(key="after-the-fuzz", argv=["/bin/true"]))
    assert not result.duplicate

    async def one_more() -> bool:
        return metric(scrape(port), "tidegate_tasks_routed_total") >= routed + 1

    await wait_for(one_more, timeout=30, what="a good submission routed after the fuzz")
