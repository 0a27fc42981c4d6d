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
        self.produce_latency = Histogram(
            "ohs_bridge_produce_latency_seconds",
            "From hand-off to the producer to Kafka's acknowledgement",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
        )


M = _Metrics()
