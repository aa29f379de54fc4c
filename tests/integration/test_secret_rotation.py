"""Issue 10, point 4: callback secrets are never in the bucket executors read, and a secret is
rotated with an overlap during which both the old and the new one verify."""

from __future__ import annotations

import json

import pytest
from harness import Cluster, cli, register, wait_for
from receiver import Hit, Receiver
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from tidegate import names
from tidegate.bus.natsconn import connect
from tidegate.client import TidegateClient
from tidegate.signing import new_secret
from tidegate.wire import ClientRecord, TaskSpec


def verifies(secret: str, hit: Hit) -> bool:
    try:
        Webhook(secret).verify(hit.body, dict(hit.headers), json_parse=False)
    except WebhookVerificationError:
        return False
    return True


async def test_secrets_stay_out_of_the_shared_bucket_and_rotate_with_an_overlap(
    cluster: Cluster, engine_db: str
) -> None:
    first = new_secret()
    async with Receiver() as rx:
        await register(
            cluster.nats_url,
            engine_db,
            ClientRecord(name="rotor", callback_url=rx.url(), callback_secret=first),
        )
        cluster.driver()
        cluster.executor(slots=2)
        env = cluster.env()

        async def called_back(key: str) -> Hit | None:
            for hit in rx.hits:
                if hit.ok and any(cb.key == key for cb in hit.callbacks()):
                    return hit
            return None

        async def run(key: str) -> Hit:
            async with await TidegateClient.connect(cluster.nats_url, "rotor") as tg:
                await tg.submit(TaskSpec(key=key, argv=["/bin/true"]))

            async def arrived() -> Hit | None:
                return await called_back(key)

            return await wait_for(arrived, timeout=60, what=f"the callback of {key}")

        assert verifies(first, await run("before"))

        # Executors (and anyone who may read the clients bucket) see no secret.
        nc = await connect(cluster.nats_url, "test-secrets")
        try:
            js = nc.jetstream()
            shared = await (await js.key_value(names.CLIENTS_BUCKET)).get("rotor")
            assert shared.value is not None
            assert first not in shared.value.decode()
            assert json.loads(shared.value)["callback_secret"] is None
            kept = await (await js.key_value(names.CLIENT_SECRETS_BUCKET)).get("rotor")
            assert kept.value is not None and first in kept.value.decode()
        finally:
            await nc.close()

        rotated = cli(env, "client", "rotate-secret", "rotor", "--overlap", "1h", "--json")
        assert rotated.returncode == 0, rotated.stderr
        second = json.loads(rotated.stdout)["callback_secret"]
        assert second.startswith("whsec_") and second != first

        async def both_sign() -> Hit | None:
            # The drivers follow the secrets bucket within a second: a task run meanwhile may
            # still be signed with the first alone.
            hit = await run(f"during-{len(rx.hits)}")
            return hit if verifies(second, hit) else None

        during = await wait_for(both_sign, timeout=30, interval=0.5, what="the new secret signing")
        assert verifies(first, during), "the old secret must still verify during the overlap"

        third = new_secret()
        ended = cli(env, "client", "rotate-secret", "rotor", "--overlap", "0s", "--secret", third)
        assert ended.returncode == 0, ended.stderr
        assert third not in ended.stdout  # given, not generated: nothing to show

        async def only_third() -> Hit | None:
            hit = await run(f"after-{len(rx.hits)}")
            return hit if verifies(third, hit) else None

        after = await wait_for(only_third, timeout=30, interval=0.5, what="the third secret")
        assert not verifies(second, after), "no overlap given: the replaced secret stops at once"
        assert not verifies(first, after)

        listed = cli(env, "client", "list", "--json")
        assert listed.returncode == 0, listed.stderr
        assert third not in listed.stdout and second not in listed.stdout
        [row] = [c for c in json.loads(listed.stdout) if c["name"] == "rotor"]
        assert row["callback_secret_previous"] is None and row["has_callback_secret"]


@pytest.mark.parametrize("overlap", ["soon", "-5s"])
def test_rotate_refuses_a_bad_overlap(cluster: Cluster, overlap: str) -> None:
    done = cli(cluster.env(), "client", "rotate-secret", "nobody", f"--overlap={overlap}")
    assert done.returncode == 2
    assert "duration" in done.stderr
