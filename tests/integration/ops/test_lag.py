"""``ohs lag`` against real groups on the real broker: every exit status, the owner of each
partition, ``--watch`` rounds, and nothing but one line on stderr when it fails."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import uuid

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from streams.lag import GroupNotFound, LagReader, describe_lag, group_lag
from tests.ports import free_port

pytestmark = pytest.mark.integration

OHS_LAG = [sys.executable, "-m", "ohs.cli", "lag"]


def _produce(bootstrap: str, topic: str, n: int, partition: int = 0) -> None:
    producer = Producer({"bootstrap.servers": bootstrap})
    for i in range(n):
        producer.produce(topic, key=b"k", value=str(i).encode(), partition=partition)
    assert producer.flush(30) == 0


def _run(args: list[str], env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*OHS_LAG, *args], capture_output=True, text=True, env=env, timeout=timeout, check=False)


def _one_line_error(proc: subprocess.CompletedProcess[str]) -> str:
    """stderr is exactly one line of ours: no traceback, no librdkafka log (``%3|...``)."""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("ohs lag: ") and "Traceback" not in proc.stderr and "%" not in lines[0][:3], lines
    return lines[0]


@pytest.fixture
def lagging(stack_endpoints, topic_factory):
    """A topic with 10 records and a group that committed offset 4 of partition 0 (lag 6)."""
    bootstrap = stack_endpoints.kafka_bootstrap
    topic = topic_factory("lag", partitions=1)
    group = f"lag-{uuid.uuid4().hex[:8]}"
    _produce(bootstrap, topic, 10)
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False})
    consumer.commit(offsets=[TopicPartition(topic, 0, 4)], asynchronous=False)
    yield bootstrap, topic, group, consumer
    consumer.close()


def test_a_lag_reader_follows_the_group_through_one_consumer(lagging):
    """``ohs run``'s progress line reads the worker's lag every second through one LagReader."""
    bootstrap, topic, group, consumer = lagging
    time.sleep(1.1)
    reader = LagReader(bootstrap, group)
    try:
        (row,) = reader.read([topic])
        assert (row.committed, row.lag_messages) == (4, 6) and row.lag_seconds >= 1.0
        consumer.commit(offsets=[TopicPartition(topic, 0, 8)], asynchronous=False)
        (row,) = reader.read([topic])
        assert (row.committed, row.lag_messages) == (8, 2) and row.lag_seconds >= 1.0
        consumer.commit(offsets=[TopicPartition(topic, 0, 10)], asynchronous=False)
        (row,) = reader.read([topic])
        assert (row.lag_messages, row.lag_seconds) == (0, 0.0)
        assert reader.read([f"{topic}-absent"]) == []
    finally:
        reader.close()


def test_lag_counts_messages_and_age_then_returns_to_zero(stack_endpoints, lagging):
    bootstrap, topic, group, consumer = lagging
    time.sleep(1.1)  # so the oldest unconsumed record is measurably old

    (row,) = group_lag(bootstrap, group, [topic])
    assert (row.committed, row.end, row.lag_messages) == (4, 10, 6)
    assert row.lag_seconds >= 1.0

    args = ["--bootstrap-server", bootstrap, "--group", group, "--topic", topic, "--json"]
    proc = _run([*args, "--max-lag", "5"], stack_endpoints.env())
    assert proc.returncode == 1, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["partitions"][0]["lag_messages"] == 6 and doc["exit"] == 1 and doc["status"] == "breached"
    assert "lag 6 messages > --max-lag 5" in _one_line_error(proc)
    # The same lag within the thresholds is OK; a threshold on seconds applies too.
    assert _run([*args, "--max-lag", "6"], stack_endpoints.env()).returncode == 0
    proc = _run([*args, "--max-lag-seconds", "0.5"], stack_endpoints.env())
    assert proc.returncode == 1 and "--max-lag-seconds 0.5" in _one_line_error(proc)

    consumer.commit(offsets=[TopicPartition(topic, 0, 10)], asynchronous=False)
    (row,) = group_lag(bootstrap, group, [topic])
    assert (row.lag_messages, row.lag_seconds) == (0, 0.0)
    proc = _run([*args, "--max-lag", "0", "--max-lag-seconds", "0"], stack_endpoints.env())
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr


def test_flags_beat_the_environment_and_the_default_topics_are_the_groups(stack_endpoints, lagging):
    bootstrap, topic, group, _ = lagging
    # The environment points at nothing and names another group: the flags win.
    env = {**stack_endpoints.env(), "OHS_KAFKA_BOOTSTRAP": f"127.0.0.1:{free_port()}", "OHS_WORKER_GROUP": "other"}
    proc = _run(["--bootstrap-server", bootstrap, "--group", group], env)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].split() == [
        "GROUP", "TOPIC", "PARTITION", "COMMITTED", "END", "LAG", "LAG-S", "CONSUMER-ID", "HOST", "CLIENT-ID"
    ]  # fmt: skip
    # Without --topic: exactly the topics the group has offsets on.
    assert [line.split()[:6] for line in lines[1:-2]] == [[group, topic, "0", "4", "10", "6"]]
    # And the environment alone is used when no flag is given.
    env = {**stack_endpoints.env(), "OHS_KAFKA_BOOTSTRAP": bootstrap, "OHS_WORKER_GROUP": group}
    proc = _run(["--json"], env)
    assert proc.returncode == 0 and [p["topic"] for p in json.loads(proc.stdout)["partitions"]] == [topic]


def test_exit_3_when_kafka_cannot_be_reached_or_the_group_or_topic_does_not_exist(stack_endpoints, lagging):
    bootstrap, _topic, group, _ = lagging
    dead = f"127.0.0.1:{free_port()}"
    proc = _run(["--bootstrap-server", dead, "--group", group, "--timeout", "2"], stack_endpoints.env())
    assert proc.returncode == 3 and proc.stdout == ""
    assert f"cannot reach Kafka at {dead}" in _one_line_error(proc)

    missing = f"no-such-group-{uuid.uuid4().hex[:8]}"
    proc = _run(["--bootstrap-server", bootstrap, "--group", missing, "--max-lag", "0"], stack_endpoints.env())
    assert proc.returncode == 3 and proc.stdout == ""
    assert f"consumer group '{missing}' does not exist" in _one_line_error(proc)
    with pytest.raises(GroupNotFound):
        describe_lag(bootstrap, missing)

    proc = _run(["--bootstrap-server", bootstrap, "--group", group, "--topic", "no-such-topic"], stack_endpoints.env())
    assert proc.returncode == 3 and "topic 'no-such-topic' does not exist" in _one_line_error(proc)


def test_exit_2_on_a_usage_error_in_one_line(stack_endpoints):
    for args in (["--max-lag", "many"], ["--no-such-flag"], ["--count", "2"], ["--watch", "0"]):
        proc = _run(args, stack_endpoints.env())
        assert proc.returncode == 2, (args, proc.stderr)
        assert "see `ohs lag --help`" in _one_line_error(proc)
    proc = _run([], {**stack_endpoints.env(), "OHS_WORKER_LAG_INTERVAL_S": "soon"})
    assert proc.returncode == 2 and "bad environment" in _one_line_error(proc)


def test_each_partition_shows_the_member_that_owns_it(stack_endpoints, topic_factory):
    bootstrap = stack_endpoints.kafka_bootstrap
    topic = topic_factory("lag-owned", partitions=2)
    group = f"lag-owned-{uuid.uuid4().hex[:8]}"
    _produce(bootstrap, topic, 3, partition=1)
    member = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": group,
            "client.id": "owner-under-test",
            "enable.auto.commit": False,
            "auto.offset.reset": "latest",
        }
    )
    try:
        member.subscribe([topic])
        deadline = time.monotonic() + 60
        while len(member.assignment()) < 2:
            assert time.monotonic() < deadline, "the member was never assigned both partitions"
            member.poll(0.2)
        proc = _run(
            ["--bootstrap-server", bootstrap, "--group", group, "--topic", topic, "--json"], stack_endpoints.env()
        )
        assert proc.returncode == 0, proc.stderr
        doc = json.loads(proc.stdout)
        assert doc["groups"] == [{"group": group, "state": "STABLE", "members": 1, "missing_topics": []}]
        rows = {p["partition"]: p for p in doc["partitions"]}
        for partition in (0, 1):
            assert rows[partition]["consumer_id"] == member.memberid()
            assert rows[partition]["client_id"] == "owner-under-test" and rows[partition]["host"]
        # Nothing committed yet: everything in the log counts as unconsumed.
        assert (rows[1]["committed"], rows[1]["lag_messages"]) == (-1, 3)
    finally:
        member.close()


def test_watch_applies_the_thresholds_every_round_and_exits_with_the_last(stack_endpoints, lagging):
    bootstrap, topic, group, consumer = lagging
    args = ["--bootstrap-server", bootstrap, "--group", group, "--topic", topic, "--json", "--max-lag", "5"]
    proc = _run([*args, "--watch", "0.2", "--count", "3"], stack_endpoints.env())
    assert proc.returncode == 1, proc.stderr
    docs = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [d["exit"] for d in docs] == [1, 1, 1]
    assert len(proc.stderr.splitlines()) == 3  # one line per breached round

    # Interrupted: the status of the last round, which is OK once the group catches up.
    with subprocess.Popen(
        [*OHS_LAG, *args, "--watch"],  # --watch without a value: the default interval
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=stack_endpoints.env(),
    ) as watcher:
        try:
            first = json.loads(watcher.stdout.readline())
            assert first["exit"] == 1
            consumer.commit(offsets=[TopicPartition(topic, 0, 10)], asynchronous=False)
            deadline = time.monotonic() + 60
            while json.loads(watcher.stdout.readline())["exit"] != 0:
                assert time.monotonic() < deadline, "the watch never saw the group catch up"
            watcher.send_signal(signal.SIGINT)
            assert watcher.wait(30) == 0
            assert "Traceback" not in watcher.stderr.read()
        finally:
            if watcher.poll() is None:
                watcher.kill()
