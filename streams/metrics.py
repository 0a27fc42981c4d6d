"""The worker's Prometheus metrics (names are part of the dashboard contract)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from kit.version import register_build_info

__all__ = ["W"]


class _Metrics:
    def __init__(self) -> None:
        self.records = Counter("ohs_worker_records_total", "Records taken from the topic")
        self.applied = Counter("ohs_worker_applied_total", "Order updates applied to Cassandra")
        self.duplicates = Counter("ohs_worker_duplicates_total", "Records already applied (re-sends, replays)")
        self.dead_lettered = Counter("ohs_worker_dead_lettered_total", "Records sent to the DLQ", ["reason"])
        self.retries = Counter("ohs_worker_write_retries_total", "Failed batch writes retried")
        self.consumer_gaps = Counter(
            "ohs_worker_consumer_gaps_total", "Times the consumer skipped records and the worker fetched them again"
        )
        self.rows = Counter("ohs_worker_rows_total", "CQL rows (statements) written")
        self.requests = Counter("ohs_worker_cql_requests_total", "CQL requests (batches or single statements) sent")
        self.last_durable = Gauge("ohs_worker_last_durable_timestamp_seconds", "When the last batch became durable")
        self.last_commit = Gauge("ohs_worker_last_commit_timestamp_seconds", "When offsets were last committed")
        self.batch_size = Histogram(
            "ohs_worker_batch_records", "Records per batch", buckets=(1, 10, 50, 100, 250, 500, 1000, 2000, 5000)
        )
        self.write_latency = Histogram(
            "ohs_worker_write_seconds",
            "Cassandra write time of one batch, retries included",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )
        # The group's lag as the broker sees it (committed offsets), not the worker's own position:
        # what an alert on "events not yet durable in Cassandra" needs.
        self.lag_messages = Gauge(
            "ohs_worker_lag_messages", "Records after the group's committed offset", ["topic", "partition"]
        )
        self.lag_seconds = Gauge(
            "ohs_worker_lag_seconds", "Age of the oldest record not yet committed", ["topic", "partition"]
        )


W = _Metrics()
register_build_info("worker")
