"""The dead-letter topic, read and re-driven (``ohs dlq``).

What a dead letter holds (the writers' contract, see docs/operations.md "Dead-letter topic"):

* worker and replay (``source`` = ``worker`` / ``replay``): the value and key of the record as
  it came (the worker cuts a value above 900 KiB and says so in ``truncated_from``, and keeps at
  most 256 bytes of key), and headers ``reason``, ``detail``, ``topic``, ``partition``,
  ``offset`` of the source record (and ``null_value`` from the worker);
* bridge (``source`` = ``bridge``): the feed frames as they came (``u32 count``, then ``u32
  length + bytes`` per frame; the last frame of an event is its Avro payload), ``reason``,
  ``detail``, ``size`` and ``sha256`` of the whole input, ``epoch``/``seq`` when the frame
  header could be read, ``accounted`` and ``truncated``. No source topic: the engine's feed is
  not a topic.

Re-driving (after the cause is fixed) produces a worker or replay dead letter's key and value
to its source topic again, with the bridge's partitioner (murmur2 of the key, so the record
lands where its user's state lives), an idempotent producer, the record's ``epoch``/``seq``
headers (from the dead letter when it has them, else from the decoded event) and a
``redriven-from: <dlq topic>:<partition>:<offset>`` header. The worker applies each user's
update once (it deduplicates by ``user_seq``), so re-driving a record twice changes nothing the
second time. Refused: a dead letter whose source is unknown (the bridge's, or headers
missing), whose value or key was cut, that holds a tombstone, or whose source topic or
partition no longer exists.
"""

from __future__ import annotations

import json
import logging
import struct
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition

from streams.errors import StreamsError

__all__ = [
    "DlqError",
    "Letter",
    "Redrive",
    "decode_letter",
    "plan_redrive",
    "read_letters",
    "redrive",
]

_kafka_log = logging.getLogger("ohs.dlq.kafka")
_kafka_log.addHandler(logging.NullHandler())
_kafka_log.propagate = False
QUIET: dict[str, Any] = {"log_level": 0, "logger": _kafka_log}
"""librdkafka says nothing on stderr: failures surface as DlqError with one line."""

REDRIVABLE_SOURCES = ("worker", "replay")
WORKER_KEY_CAP = 256
"""The worker keeps at most this many bytes of a dead letter's key (streams/app.py)."""
_U32 = struct.Struct(">I")


class DlqError(StreamsError):
    """Kafka unreachable, or a topic missing: one line, fit for a terminal."""

    retriable = True


@dataclass(frozen=True, slots=True)
class Letter:
    """One dead letter, as read from the DLQ topic."""

    topic: str
    partition: int
    offset: int
    timestamp: float
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes], ...] = ()

    def header(self, name: str) -> str | None:
        """The last value of header ``name`` as text (None when absent)."""
        for k, v in reversed(self.headers):
            if k == name:
                return v.decode("utf-8", "replace") if v is not None else ""
        return None

    def _int(self, name: str) -> int | None:
        text = self.header(name)
        if text is None or not text.strip().lstrip("-").isdigit() or len(text) > 20:
            return None
        return int(text)

    @property
    def source(self) -> str:
        return self.header("source") or "?"

    @property
    def reason(self) -> str:
        return self.header("reason") or "?"

    @property
    def detail(self) -> str:
        return self.header("detail") or ""

    @property
    def source_topic(self) -> str | None:
        return self.header("topic") or None

    @property
    def source_partition(self) -> int | None:
        return self._int("partition")

    @property
    def source_offset(self) -> int | None:
        return self._int("offset")

    @property
    def size(self) -> int:
        """Bytes of the value held here."""
        return len(self.value or b"")

    @property
    def original_size(self) -> int:
        """Bytes of what was dead-lettered (more than ``size`` when the value was cut)."""
        for name in ("truncated_from", "size"):
            n = self._int(name)
            if n is not None:
                return n
        return self.size

    @property
    def truncated(self) -> bool:
        return self.header("truncated") == "1" or self.header("truncated_from") is not None

    @property
    def null_value(self) -> bool:
        return self.header("null_value") == "1"

    @property
    def where(self) -> str:
        """Where the dead-lettered record came from, as topic[partition]@offset, or '-'."""
        if self.source_topic is None:
            return "-"
        return f"{self.source_topic}[{self.source_partition}]@{self.source_offset}"

    def as_dict(self) -> dict[str, Any]:
        return {
            "topic": self.topic,
            "partition": self.partition,
            "offset": self.offset,
            "timestamp": self.timestamp,
            "source": self.source,
            "reason": self.reason,
            "detail": self.detail,
            "source_topic": self.source_topic,
            "source_partition": self.source_partition,
            "source_offset": self.source_offset,
            "key": _text_or_hex(self.key),
            "size": self.size,
            "original_size": self.original_size,
            "truncated": self.truncated,
            "headers": {k: _text_or_hex(v) for k, v in self.headers},
        }


def _text_or_hex(data: bytes | None) -> str | None:
    if data is None:
        return None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return "0x" + data.hex()
    return text if text.isprintable() else "0x" + data.hex()


# ----------------------------------------------------------------------------------- reading


def read_letters(
    bootstrap: str,
    topic: str,
    *,
    partitions: Sequence[int] | None = None,
    from_offset: int | None = None,
    to_offset: int | None = None,
    timeout_s: float = 10.0,
    config: dict[str, Any] | None = None,
) -> Iterator[Letter]:
    """Every dead letter of ``topic`` (its ``partitions``, default all) with ``from_offset <=
    offset <= to_offset``, up to the end the topic had when the read began, in offset order per
    partition. Never joins a group, never commits."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"ohs-dlq-{uuid.uuid4().hex[:8]}",
            "enable.auto.commit": False,
            "enable.partition.eof": True,
            "auto.offset.reset": "earliest",
            **QUIET,
            **(config or {}),
        }
    )
    try:
        try:
            meta = consumer.list_topics(topic, timeout=timeout_s).topics.get(topic)
        except KafkaException as exc:
            raise DlqError(f"cannot reach Kafka at {bootstrap}: {_reason(exc)}") from exc
        if meta is None or meta.error is not None or not meta.partitions:
            raise DlqError(f"dead-letter topic {topic!r} does not exist")
        chosen = sorted(meta.partitions) if partitions is None else [p for p in partitions if p in meta.partitions]
        ends: dict[int, int] = {}
        starts = []
        try:
            for p in chosen:
                low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=timeout_s)
                start = max(low, from_offset or 0)
                end = high if to_offset is None else min(high, to_offset + 1)
                if start < end:
                    ends[p] = end
                    starts.append(TopicPartition(topic, p, start))
        except KafkaException as exc:
            raise DlqError(f"cannot read {topic!r}: {_reason(exc)}") from exc
        if not starts:
            return
        consumer.assign(starts)
        done: set[int] = set()
        idle_deadline = time.monotonic() + timeout_s
        while len(done) < len(ends):
            msg = consumer.poll(0.5)
            if msg is None:
                if time.monotonic() > idle_deadline:
                    raise DlqError(f"reading {topic!r} stalled for {timeout_s:g}s")
                continue
            idle_deadline = time.monotonic() + timeout_s
            err = msg.error()
            p = msg.partition() or 0
            if err is not None:
                if err.code() == KafkaError._PARTITION_EOF:
                    done.add(p)
                    continue
                raise DlqError(f"reading {topic!r}: {err.str()}")
            offset = msg.offset() or 0
            if p in done or offset >= ends[p]:
                done.add(p)
                continue
            _kind, ts_ms = msg.timestamp()
            headers: list[tuple[str, bytes]] = []
            for pair in msg.headers() or ():
                k, v = pair[0], pair[1]
                headers.append((str(k), v if isinstance(v, bytes) else (v or "").encode()))
            value, key = msg.value(), msg.key()
            yield Letter(
                topic,
                p,
                offset,
                ts_ms / 1000.0 if ts_ms > 0 else 0.0,
                key if isinstance(key, bytes) or key is None else key.encode(),
                value if isinstance(value, bytes) or value is None else value.encode(),
                tuple(headers),
            )
            if offset + 1 >= ends[p]:
                done.add(p)
    finally:
        consumer.close()


def _reason(exc: BaseException) -> str:
    err = exc.args[0] if exc.args else None
    if isinstance(err, KafkaError):
        return err.str()
    return str(exc) or type(exc).__name__


# ---------------------------------------------------------------------------------- decoding


def frames_of(value: bytes) -> list[bytes] | None:
    """The frames of a bridge dead letter's value (``u32 count``, ``u32 length + bytes`` each), or
    None when the value is not that (cut short, or another layout)."""
    if len(value) < _U32.size:
        return None
    (count,) = _U32.unpack_from(value)
    pos, frames = _U32.size, []
    if count > 64:
        return None
    for _ in range(count):
        if pos + _U32.size > len(value):
            return None
        (n,) = _U32.unpack_from(value, pos)
        pos += _U32.size
        if pos + n > len(value):
            return None
        frames.append(value[pos : pos + n])
        pos += n
    return frames if pos == len(value) else None


def avro_payload(letter: Letter) -> bytes | None:
    """The Avro bytes a dead letter carries: the value itself (worker, replay), or the last feed
    frame of a bridge dead letter."""
    value = letter.value
    if not value:
        return None
    if letter.source == "bridge":
        frames = frames_of(value)
        return frames[-1] if frames and len(frames) == 2 else None
    return value


def decode_letter(letter: Letter, registry: Any = None) -> tuple[str, dict[str, Any]] | str:
    """(record name, the decoded record as JSON-able values), or why it does not decode here.

    A registry-framed value needs ``registry`` (a ``schemas.registry.Registry``)."""
    from schemas.codec import CodecError, decode_dict
    from schemas.registry import is_registry_frame

    payload = avro_payload(letter)
    if payload is None:
        return "no Avro payload" + (" (value cut)" if letter.truncated else "")
    try:
        if is_registry_frame(payload):
            if registry is None:
                return "registry-framed: set OHS_SCHEMA_REGISTRY_URL to decode it"
            payload = registry.to_single_object(payload)
        name, record = decode_dict(payload)
    except CodecError as exc:
        return f"not decodable here: {exc}"
    return name, json.loads(json.dumps(record, default=str))


def _epoch_seq(letter: Letter, registry: Any) -> tuple[int, int] | None:
    epoch, seq = letter._int("epoch"), letter._int("seq")
    if epoch is not None and seq is not None:
        return epoch, seq
    decoded = decode_letter(letter, registry)
    if isinstance(decoded, tuple):
        record = decoded[1]
        if isinstance(record.get("epoch"), int) and isinstance(record.get("seq"), int):
            return record["epoch"], record["seq"]
    return None


# --------------------------------------------------------------------------------- re-driving


@dataclass(frozen=True, slots=True)
class Redrive:
    """What re-driving one dead letter does (or why it is refused)."""

    letter: Letter
    refused: str = ""
    headers: tuple[tuple[str, bytes], ...] = ()
    partition: int | None = None
    """Where the record landed (after ``redrive``)."""

    def as_dict(self) -> dict[str, Any]:
        return {
            "offset": self.letter.offset,
            "partition": self.letter.partition,
            "reason": self.letter.reason,
            "source": self.letter.source,
            "to_topic": self.letter.source_topic,
            "to_partition": self.partition,
            "refused": self.refused or None,
            "headers": {k: v.decode() for k, v in self.headers},
        }


def refusal(letter: Letter, topics: dict[str, int] | None = None) -> str:
    """Why ``letter`` cannot be re-driven ("" when it can). ``topics``: partition count of each
    topic the cluster has (None: not checked)."""
    if letter.source not in REDRIVABLE_SOURCES:
        return f"source {letter.source!r} is not a topic (only worker and replay dead letters name their record)"
    topic, partition, offset = letter.source_topic, letter.source_partition, letter.source_offset
    if topic is None or partition is None or offset is None:
        return "the source topic, partition or offset header is missing"
    if letter.truncated:
        return f"the value was cut ({letter.size} of {letter.original_size} bytes)"
    if letter.null_value or letter.value is None:
        return "a tombstone (null value): nothing to apply"
    if letter.key is None:
        return "no key: the record cannot be routed to its user's partition"
    if letter.source == "worker" and len(letter.key) >= WORKER_KEY_CAP:
        return f"the key may have been cut (the worker keeps {WORKER_KEY_CAP} bytes)"
    if topics is not None:
        if topic not in topics:
            return f"source topic {topic!r} does not exist"
        if not 0 <= partition < topics[topic]:
            return f"source topic {topic!r} has no partition {partition}"
    return ""


def plan_redrive(
    letters: Iterable[Letter], topics: dict[str, int] | None = None, registry: Any = None
) -> list[Redrive]:
    """The re-drive of each letter: its headers, or why it is refused."""
    out = []
    for letter in letters:
        why = refusal(letter, topics)
        if why:
            out.append(Redrive(letter, refused=why))
            continue
        headers: list[tuple[str, bytes]] = []
        es = _epoch_seq(letter, registry)
        if es is not None:
            headers += [("epoch", str(es[0]).encode()), ("seq", str(es[1]).encode())]
        headers.append(("redriven-from", f"{letter.topic}:{letter.partition}:{letter.offset}".encode()))
        out.append(Redrive(letter, headers=tuple(headers)))
    return out


def topic_partitions(bootstrap: str, timeout_s: float = 10.0, config: dict[str, Any] | None = None) -> dict[str, int]:
    """Partition count of every topic of the cluster."""
    consumer = Consumer(
        {"bootstrap.servers": bootstrap, "group.id": f"ohs-dlq-{uuid.uuid4().hex[:8]}", **QUIET, **(config or {})}
    )
    try:
        meta = consumer.list_topics(timeout=timeout_s)
    except KafkaException as exc:
        raise DlqError(f"cannot reach Kafka at {bootstrap}: {_reason(exc)}") from exc
    finally:
        consumer.close()
    return {name: len(t.partitions) for name, t in meta.topics.items() if t.error is None}


@dataclass
class _Delivery:
    partitions: dict[int, int] = field(default_factory=dict)
    errors: dict[int, str] = field(default_factory=dict)


def redrive(
    bootstrap: str, plan: Sequence[Redrive], *, timeout_s: float = 30.0, config: dict[str, Any] | None = None
) -> list[Redrive]:
    """Produce every accepted entry of ``plan`` to its source topic, in order; returns the plan
    with the partition each record landed in. Raises DlqError when any is not acknowledged."""
    todo = [(i, r) for i, r in enumerate(plan) if not r.refused]
    if not todo:
        return list(plan)
    producer = Producer(
        {
            "bootstrap.servers": bootstrap,
            # Idempotent: a retried produce request never writes a record twice.
            "enable.idempotence": True,
            "acks": "all",
            # The bridge's partitioner: a user's records land in the partition of its state.
            "partitioner": "murmur2_random",
            "message.timeout.ms": int(timeout_s * 1000),
            **QUIET,
            **(config or {}),
        }
    )
    got = _Delivery()

    def report(i: int) -> Any:
        def done(err: KafkaError | None, msg: Any) -> None:
            if err is not None:
                got.errors[i] = err.str()
            else:
                got.partitions[i] = msg.partition()

        return done

    try:
        for i, r in todo:
            letter = r.letter
            assert letter.source_topic is not None
            producer.produce(
                letter.source_topic, value=letter.value, key=letter.key, headers=list(r.headers), on_delivery=report(i)
            )
            producer.poll(0)
        left = producer.flush(timeout_s + 5)
    except (KafkaException, BufferError) as exc:
        raise DlqError(f"cannot produce to Kafka at {bootstrap}: {exc}") from exc
    if left or got.errors:
        first = next(iter(got.errors.values()), f"{left} records not acknowledged in {timeout_s:g}s")
        raise DlqError(f"{len(got.errors) or left} of {len(todo)} records were not re-driven: {first}")
    out = list(plan)
    for i, r in todo:
        out[i] = Redrive(r.letter, headers=r.headers, partition=got.partitions.get(i))
    return out
