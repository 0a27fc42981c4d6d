"""The bridge's Prometheus metrics (names are part of the dashboard contract)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

__all__ = ["M"]


class _Metrics:
    def __init__(self) -> None:
        self.received = Counter("ohs_bridge_received_total", "Feed messages received (events and heartbeats)")
        self.produced = Counter("ohs_bridge_produced_total", "Records handed to the producer", ["topic"])
        self.acked = Counter("ohs_bridge_acked_total", "Records acknowledged by Kafka")
        self.duplicates = Counter("ohs_bridge_duplicates_total", "Events dropped at or below what was received")
        self.gaps = Counter("ohs_bridge_gaps_total", "Holes in the seqs detected")
        self.replayed = Counter("ohs_bridge_replayed_total", "Events received from the engine's replay service")
        self.dead_lettered = Counter("ohs_bridge_dead_lettered_total", "Inputs sent to the DLQ", ["reason"])
        self.delivery_errors = Counter("ohs_bridge_delivery_errors_total", "Producer errors reported")
        self.watermark = Gauge("ohs_bridge_watermark", "Highest seq with every seq below acknowledged")
        self.engine_seq = Gauge("ohs_bridge_engine_seq", "Highest seq the engine reported")
        self.in_flight = Gauge("ohs_bridge_in_flight", "Events handed to the producer, not yet acknowledged")
        self.ceiling = Gauge("ohs_bridge_ceiling", "Seq ceiling of the current epoch acknowledged in the checkpoint")
        self.outbox = Gauge("ohs_bridge_outbox", "Records waiting in order for the ceiling or a free producer queue")
        self.ignored_heartbeats = Counter(
            "ohs_bridge_ignored_heartbeats_total", "Heartbeats of an epoch the engine did not confirm"
        )
        self.dead_letter_failures = Counter(
            "ohs_bridge_dead_letter_failures_total", "Dead letters Kafka refused even without their payload"
        )
        self.loop_errors = Counter("ohs_bridge_loop_errors_total", "Unexpected errors caught and survived by the loop")
        self.producer_resets = Counter(
            "ohs_bridge_producer_resets_total", "Producers replaced after a fatal error (replayed from the watermark)"
        )
        self.connect_attempts = Counter("ohs_bridge_connect_attempts_total", "Attempts to reach Kafka at start")
        self.produce_latency = Histogram(
            "ohs_bridge_produce_latency_seconds",
            "From hand-off to the producer to Kafka's acknowledgement",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
        )


M = _Metrics()
