"""``ohs lag``'s rounds without a broker: thresholds, exit statuses, the one-line summary, the table."""

from __future__ import annotations

from click.testing import CliRunner

from streams.lag import GroupLag, PartitionLag
from streams.lagcmd import EXIT_BREACHED, EXIT_OK, EXIT_UNREACHABLE, Round, breaches, document, lag, summary, table


def row(partition: int, lag_messages: int, lag_seconds: float, member: str = "") -> PartitionLag:
    return PartitionLag("g", "t", partition, 10, 10 + lag_messages, lag_messages, lag_seconds, member, "h", "c")


def test_thresholds_are_strict_upper_bounds():
    rows = [row(0, 5, 1.0), row(1, 6, 31.0)]
    assert breaches(rows, None, None) == []
    assert breaches(rows, 6, 31.0) == []
    assert breaches(rows, 5, None) == ["g t[1]: lag 6 messages > --max-lag 5"]
    assert breaches(rows, None, 30) == ["g t[1]: lag 31.0s > --max-lag-seconds 30"]
    assert len(breaches(rows, 0, 0)) == 4


def test_a_round_exit_status_errors_first_then_breaches():
    g = GroupLag("g", "STABLE", 1, [row(0, 1, 0.5)])
    assert Round([g], [], []).code == EXIT_OK
    assert Round([g], ["b"], []).code == EXIT_BREACHED
    assert Round([g], ["b"], ["e"]).code == EXIT_UNREACHABLE
    assert summary(Round([g], ["b1", "b2", "b3", "b4", "b5"], [])) == "threshold breached: b1; b2; b3 (+2 more)"
    assert summary(Round([], ["b"], ["cannot reach Kafka"])) == "cannot reach Kafka"
    doc = document(Round([g], ["b"], []))
    assert (doc["exit"], doc["status"], doc["groups"][0]["members"]) == (1, "breached", 1)
    assert doc["partitions"][0]["consumer_id"] == ""


def test_the_table_has_the_kafka_consumer_groups_columns_and_the_totals():
    out = table(Round([GroupLag("g", "STABLE", 1, [row(0, 3, 2.5, "member-1"), row(1, 0, 0.0)])], [], []))
    lines = out.splitlines()
    assert lines[0].split() == [
        "GROUP", "TOPIC", "PARTITION", "COMMITTED", "END", "LAG", "LAG-S", "CONSUMER-ID", "HOST", "CLIENT-ID"
    ]  # fmt: skip
    assert lines[1].split() == ["g", "t", "0", "10", "13", "3", "2.5", "member-1", "h", "c"]
    assert lines[2].split()[7] == "-"
    assert lines[-2:] == ["group g: stable, 1 member(s)", "total lag: 3 messages; oldest unconsumed: 2.5s"]


def test_usage_errors_exit_2_in_one_line():
    runner = CliRunner()
    for args in (["--max-lag", "x"], ["--count", "1"], ["--watch", "-1"], ["--bogus"]):
        result = runner.invoke(lag, args)
        assert result.exit_code == 2, (args, result.output)
        assert len(result.output.strip().splitlines()) == 1 and result.output.startswith("ohs lag: "), result.output
