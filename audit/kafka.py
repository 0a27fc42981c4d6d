"""The Kafka side of ``ohs audit``: every journaled event on its topic, under its key, unchanged.

The bridge publishes an OrderUpdate on the updates topic keyed by its user, a BalanceUpdate on the
balances topic keyed by its user, and a Trade on the trades topic once per side, keyed by the
taker and by the maker (once if they are the same user), each with ``epoch``/``seq`` headers. The
topics are read from their first offsets to the end offsets taken when reading starts, by
manual assignment (no consumer group joins, nothing is committed), in large batches.

Per seq a byte of flags: bits 0-1 say a consistent copy of the (only or taker, maker) side
arrived, bits 2-3 that any record claimed that side. A second consistent copy is a duplicate
(at-least-once, fine); a claimed seq lower than the partition's highest is out of order unless
it re-sends a side already claimed; a side that never got a consistent copy is lost.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, cast

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

from audit.core import (
    BALANCE,
    TRADE,
    UNPUBLISHABLE,
    UPDATE,
    AuditError,
    Findings,
    PartitionOrder,
    Truth,
    diff_event,
    payload_verdict,
)
from schemas.codec import CodecError, decode
from schemas.registry import Registry, is_registry_frame

__all__ = ["ROLES", "KafkaLedger", "check_kafka", "read_topics"]

ROLES = {"updates": UPDATE, "trades": TRADE, "balances": BALANCE}
_ROLE_OF_KIND = {kind: role for role, kind in ROLES.items()}


def _user(key: bytes | None) -> int | None:
    return int(key) if key is not None and key.isdigit() else None


def _seq_headers(headers: Any) -> tuple[int | None, int | None]:
    """(epoch, seq) from the bridge's headers (a list of (name, value) pairs), None where missing."""
    epoch = seq = None
    for name, value in headers or ():
        if name in ("epoch", "seq") and value is not None and value.isdigit():
            if name == "seq":
                seq = int(value)
            else:
                epoch = int(value)
    return epoch, seq


class KafkaLedger:
    """Checks records one at a time against the truth; ``finish`` counts what never came."""

    def __init__(self, truth: Truth, findings: Findings, registry: Registry | None = None) -> None:
        self.truth = truth
        self.f = findings
        self.registry = registry
        self.seen = bytearray(truth.last_seq + 1)
        self.partitions: dict[tuple[str, int], PartitionOrder] = {}

    def offer(
        self,
        role: str,
        partition: int,
        offset: int,
        key: bytes | None,
        headers: Any,
        value: bytes | None,
    ) -> None:
        area, t, f = f"kafka.{role}", self.truth, self.f
        f.read[area] += 1
        where = {"partition": partition, "offset": offset}
        if value is None:
            f.add(area, "unknown", _user(key), reason="tombstone", **where)
            return
        if is_registry_frame(value):
            if self.registry is None:
                f.add(area, "unknown", _user(key), reason="registry_frame_without_registry_url", **where)
                return
            try:
                value = self.registry.to_single_object(value)
            except CodecError as exc:
                f.add(area, "unknown", _user(key), reason=exc.reason, **where)
                return
        epoch, seq = _seq_headers(headers)
        if epoch is None or seq is None:
            try:
                event = decode(value)
            except CodecError as exc:
                f.add(area, "unknown", _user(key), reason=exc.reason, **where)
                return
            epoch, seq = event.epoch, event.seq
        user = _user(key)
        if epoch != t.epoch:
            if epoch > t.epoch and t.after_snapshot(epoch, seq) == "beyond_journal":
                f.add(area, "beyond_journal", user, epoch=epoch, seq=seq, **where)
            else:
                f.add(area, "other_epoch")
            return
        if seq > t.last_seq:
            f.add(area, t.after_snapshot(epoch, seq), user, seq=seq, **where)
            return
        kind = t.kinds[seq] if seq > 0 else 0
        if kind == 0:
            f.add(area, "unknown", user, reason="not_in_journal", seq=seq, **where)
            return
        if kind == UNPUBLISHABLE:  # the engine sent a marker for it, never an event
            f.add(area, "inconsistent", user, reason="unpublishable_in_journal", seq=seq, **where)
            return
        if kind != ROLES[role]:
            f.add(area, "inconsistent", user, reason="wrong_topic", seq=seq, journal=_ROLE_OF_KIND[kind], **where)
            return
        bits = (1 if user == t.key1[seq] else 0) | (2 if kind == TRADE and user == t.key2[seq] else 0)
        if not bits:
            f.add(area, "inconsistent", user, reason="wrong_key", seq=seq, **where)
            return
        state = self.seen[seq]
        order = self.partitions.get((role, partition))
        if order is None:
            order = self.partitions[(role, partition)] = PartitionOrder()
        if not order.offer(seq, resend=bool(state >> 2 & bits)):
            f.add(area, "out_of_order", user, seq=seq, after=order.high, **where)
        state |= bits << 2
        verdict, reason = payload_verdict(value, t.hashes[seq], epoch, seq)
        if verdict != "ok":
            detail = self._diff(value, seq) if f.wants_example(area, verdict) else {}
            f.add(area, verdict, user, reason=reason, seq=seq, **where, **detail)
        elif state & bits == bits:
            f.add(area, "duplicates")
        else:
            state |= bits
        self.seen[seq] = state

    def _diff(self, value: bytes, seq: int) -> dict[str, Any]:
        want = self.truth.event(seq)
        try:
            got = decode(value)
        except CodecError:
            return {}
        return {"fields": diff_event(want, got)} if want is not None else {}

    def finish(self) -> None:
        """Count each journaled side with no consistent copy as lost, and what was expected."""
        t, f, seen, kinds = self.truth, self.f, self.seen, self.truth.kinds
        self_trades = 0
        for seq in range(1, t.last_seq + 1):
            kind = kinds[seq]
            if kind not in _ROLE_OF_KIND:  # an unpublishable seq (seqs are gapless: recovery proved it)
                continue
            single = kind != TRADE or t.key1[seq] == t.key2[seq]
            if kind == TRADE and single:
                self_trades += 1
            missing = (1 if single else 3) & ~seen[seq]
            if not missing:
                continue
            area = f"kafka.{_ROLE_OF_KIND[kind]}"
            if missing & 1:
                f.add(area, "lost", t.key1[seq], seq=seq)
            if missing & 2:
                f.add(area, "lost", t.key2[seq], seq=seq, side="maker")
        f.expected["kafka.updates"] = t.type_counts["OrderUpdate"]
        f.expected["kafka.balances"] = t.type_counts["BalanceUpdate"]
        f.expected["kafka.trades"] = 2 * t.type_counts["Trade"] - self_trades


def read_topics(
    bootstrap: str,
    topics: dict[str, str],
    ledger: KafkaLedger,
    batch: int = 10_000,
    idle_s: float = 30.0,
    config: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Feed every record of ``topics`` (role -> name), up to the end offsets taken now, to ``ledger``."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"ohs-audit-{uuid.uuid4().hex[:8]}",  # required by the client; never joined or committed
            "enable.auto.commit": False,
            "enable.partition.eof": True,
            "auto.offset.reset": "earliest",
            "max.partition.fetch.bytes": 8 * 1024 * 1024,
            **(config or {}),
        }
    )
    try:
        return _read(consumer, topics, ledger, batch, idle_s)
    except KafkaException as exc:
        raise AuditError(f"Kafka at {bootstrap}: {exc}") from exc
    finally:
        consumer.close()


def _read(consumer: Consumer, topics: dict[str, str], ledger: KafkaLedger, batch: int, idle_s: float) -> dict[str, Any]:
    info: dict[str, Any] = {}
    ends: dict[tuple[str, int], int] = {}
    start: list[TopicPartition] = []
    metadata = consumer.list_topics(timeout=30)
    for role, name in topics.items():
        meta = metadata.topics.get(name)
        if meta is None or meta.error is not None:
            ledger.f.notes.append(f"topic {name} ({role}) does not exist")
            info[role] = {"topic": name, "partitions": 0}
            continue
        offsets = {}
        for p in sorted(meta.partitions):
            low, high = consumer.get_watermark_offsets(TopicPartition(name, p), timeout=30)
            offsets[p] = [low, high]
            if low > 0:
                ledger.f.info.append(f"{name}[{p}] starts at offset {low}: retention removed older records")
            if high > low:
                ends[(name, p)] = high
                start.append(TopicPartition(name, p, low))
        info[role] = {"topic": name, "partitions": len(offsets), "offsets": offsets}
    role_of = {name: role for role, name in topics.items()}
    consumer.assign(start)
    pending = set(ends)
    deadline = time.monotonic() + idle_s
    while pending:
        messages = consumer.consume(num_messages=batch, timeout=1.0)
        if not messages:
            if time.monotonic() > deadline:
                raise AuditError(f"no records for {idle_s:.0f}s while partitions {sorted(pending)} are not read")
            continue
        deadline = time.monotonic() + idle_s
        done = []
        for msg in messages:
            tp = (cast(str, msg.topic()), cast(int, msg.partition()))
            err = msg.error()
            if err is not None:
                if err.code() != KafkaError._PARTITION_EOF:
                    raise AuditError(f"reading {tp[0]}[{tp[1]}]: {err}")
                done.append(tp)
                continue
            offset = cast(int, msg.offset())
            end = ends[tp]
            if offset >= end:  # produced after the end offsets were taken
                done.append(tp)
                continue
            ledger.offer(role_of[tp[0]], tp[1], offset, msg.key(), msg.headers(), msg.value())
            if offset >= end - 1:
                done.append(tp)
        finished = [tp for tp in done if tp in pending]
        if finished:
            pending.difference_update(finished)
            consumer.pause([TopicPartition(name, p) for name, p in finished])
    ledger.finish()
    return info


def check_kafka(
    truth: Truth,
    findings: Findings,
    bootstrap: str,
    topics: dict[str, str],
    registry_url: str | None,
    config: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Read ``topics`` (role -> name) into ``findings``; returns the partitions and offsets read."""
    registry = Registry(registry_url) if registry_url else None
    try:
        return read_topics(bootstrap, topics, KafkaLedger(truth, findings, registry), config=config)
    finally:
        if registry is not None:
            registry.close()
