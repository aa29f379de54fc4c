"""Notifier partitions: how clients are hashed into them, and how drivers share them out."""

from __future__ import annotations

import pytest

from tidegate import names
from tidegate.config import Limits, Settings
from tidegate.driver.notify_partition import Holdings
from tidegate.driver.poison import stage_of
from tidegate.errors import ConfigError

# Where nats-server 2.15.1 stored `tg.event.<client>` under `{{partition(4,1)}}` (observed).
SERVER_PARTITIONS_OF_4 = {
    "c1": 1,
    "delta": 1,
    "zz": 1,
    "gamma": 2,
    "a-b": 3,
    "alpha": 3,
    "beta": 3,
    "team_x": 3,
}


@pytest.mark.parametrize(("client", "partition"), sorted(SERVER_PARTITIONS_OF_4.items()))
def test_partition_of_a_client_is_the_servers(client: str, partition: int) -> None:
    assert names.event_partition(client, 4) == partition


def test_one_partition_means_no_transform_and_the_whole_stream() -> None:
    assert names.event_partition_transform(1) is None
    assert names.notify_filters(0, 1) == [names.EVENT_ALL]
    assert names.event_partition("anyone", 1) == 0
    # Partition 0 keeps the single notifier's names: the default needs no migration.
    assert names.notify_consumer(0) == names.NOTIFY_CONSUMER == "notify"
    assert names.notifier_lease(0) == names.NOTIFIER_LEASE


def test_partitions_split_the_stored_subjects_without_overlap() -> None:
    assert names.event_partition_transform(3) == (
        "tg.event.*",
        "tg.event.{{partition(3,1)}}.{{wildcard(1)}}",
    )
    filters = [names.notify_filters(p, 3) for p in range(3)]
    assert filters == [["tg.event.0.*", "tg.event.*"], ["tg.event.1.*"], ["tg.event.2.*"]]
    flat = [f for fs in filters for f in fs]
    assert len(flat) == len(set(flat))


def test_partitions_are_spread() -> None:
    counts = [0] * 4
    for i in range(400):
        counts[names.event_partition(f"client{i}", 4)] += 1
    assert min(counts) > 50, counts


def test_consumer_and_lease_names_round_trip() -> None:
    for p in range(5):
        assert names.notify_partition_of_consumer(names.notify_consumer(p)) == p
    assert names.notify_consumer(2) == "notify_2"
    assert names.notifier_lease(2) != names.notifier_lease(0)
    for other in ("projector", "notify_", "notify_x", "notify_02", "notifyx", "route_notify_1"):
        assert names.notify_partition_of_consumer(other) is None
    assert stage_of(names.EVENTS_STREAM, "notify_3") == "notify"
    assert stage_of(names.EVENTS_STREAM, names.PROJECTOR_CONSUMER) == "event"
    assert stage_of(names.EVENTS_STREAM, "probe") is None


def test_the_client_of_a_stored_event_subject() -> None:
    assert names.client_of_event_subject("tg.event.alpha") == "alpha"
    assert names.client_of_event_subject("tg.event.3.alpha") == "alpha"
    assert names.client_of_event_subject("tg.event.x.alpha") is None
    assert names.client_of_event_subject("tg.event.1.2.alpha") is None
    assert names.client_of_event_subject("tg.submit.alpha") is None


def test_member_keys_are_valid_kv_keys() -> None:
    key = names.notify_member("driver-host.example.org-123")
    assert key.startswith("notify-member.") and key.count(".") == 1


def test_partition_count_setting() -> None:
    assert Limits().notify_partitions == 1
    env = {"TIDEGATE_NOTIFY_PARTITIONS": "3"}
    assert Settings.from_env(env).limits.notify_partitions == 3
    for bad in (0, 65):
        with pytest.raises(ConfigError, match="TIDEGATE_NOTIFY_PARTITIONS"):
            Limits(notify_partitions=bad)


def test_a_driver_takes_up_to_its_share_and_hands_over_its_last_takeover() -> None:
    h = Holdings(partitions=3, members=2)
    assert h.share() == 2
    h.held = {0: 10.0}
    assert h.may_take()
    h.held = {0: 10.0, 2: 11.0}
    assert not h.may_take()
    h.members = 1  # the other driver died: all three are ours to take
    assert h.may_take()
    h.held = {0: 10.0, 2: 11.0, 1: 30.0}
    assert not h.must_hand_over(1)
    h.members = 3  # two came back: one each; the latest takeovers go first
    assert h.must_hand_over(1)
    assert not h.must_hand_over(0) and not h.must_hand_over(2)
    h.held = {0: 10.0, 2: 11.0}
    assert h.must_hand_over(2)
    h.held = {0: 10.0}
    assert not h.must_hand_over(0)


def test_an_event_must_name_its_subjects_client() -> None:
    names.check_event_subject("tg.event.alpha", "alpha")
    names.check_event_subject("tg.event.3.alpha", "alpha")  # stored in its partition
    for subject in ("tg.event.beta", "tg.event.3.beta", "tg.event.x.alpha", "tg.work.alpha"):
        with pytest.raises(ValueError, match="not its own subject"):
            names.check_event_subject(subject, "alpha")
