"""In-memory twins of what the bridge talks to: the engine's feed and replay service (real
ZeroMQ sockets, scripted journal), and Kafka (a producer that delivers on poll and checks the
seq ceiling invariant on every record it is handed). Integration tests use ``EngineTwin``
against the real Kafka; unit tests use both."""

from __future__ import annotations

import queue
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import zmq
from confluent_kafka import KafkaError

from bridge.errors import BridgeUnavailable
from bridge.settings import BridgeSettings
from schemas.checkpoint import Checkpoint
from schemas.codec import encode
from schemas.events import Event, OrderUpdate
from schemas.wire import HEARTBEAT, entry, header_for, pack

_QQ = struct.Struct(">QQ")
_QQQ = struct.Struct(">QQQ")
UNPUBLISHABLE = 101


def engine_events(epoch: int, n: int, seed: int = 1) -> list[Event]:
    """At least ``n`` real events of epoch ``epoch`` from the real engine running a seeded flow."""
    from engine.core import Engine
    from engine.settings import EngineSettings
    from engine.simulator import FlowGenerator

    specs = EngineSettings(_env_file=None).symbol_specs()  # type: ignore[call-arg]
    gen = FlowGenerator(specs, 50, seed=seed)
    engine = Engine(specs, epoch=epoch)
    events: list[Event] = []
    for c in gen.deposits():
        events.extend(engine.execute(replace(c, ts_ns=1)).events)
    ts = 1
    while len(events) < n:
        ts += 1000
        c = replace(gen.next(ts), ts_ns=ts)
        r = engine.execute(c)
        if r.accepted and type(c).__name__ == "PlaceOrder":
            gen.record(c.user_id, r.order_id)  # type: ignore[union-attr]
        events.extend(r.events)
    return events


def frames_of(ev: Event) -> tuple[bytes, bytes]:
    return header_for(ev), encode(ev)


def oversized(ev: Event, size: int = 3_000_000) -> Event:
    """The same order update with a huge client_order_id (what an old journal may hold)."""
    assert isinstance(ev, OrderUpdate)
    return replace(ev, client_order_id="x" * size)


def marker(epoch: int, seq: int, reason: str = "too_large") -> tuple[bytes, bytes]:
    body = f'{{"reason":"{reason}","detail":"client_order_id of 3000000 chars","size":3000123,"sha256":"{"ab" * 32}"}}'
    return pack(UNPUBLISHABLE, epoch, seq, 0, 0), body.encode()


class EngineTwin:
    """The engine's feed (PUB, bound) and replay service (ROUTER, bound), served by a thread.

    ``journal`` maps seq -> (header, payload) of the current epoch: what INFO and REPLAY answer
    from. ``append`` journals and (optionally) publishes, in batches as the engine does (several
    entries per message); ``send`` publishes any frames at all, once a subscriber is there (the
    socket is an XPUB, which sees subscriptions arrive). REPLAY answers in EVS batches, or one EV
    per event with ``replay_batches = False`` (as an older engine did).
    """

    def __init__(self, feed: str, replay: str, epoch: int, heartbeat_ms: int = 100) -> None:
        self.epoch = epoch
        self.journal: dict[int, tuple[bytes, bytes]] = {}
        self.last = 0
        self.requests: list[tuple[Any, ...]] = []
        self.info_replies: list[list[bytes]] = []
        """Scripted (wrong) replies to the next INFO requests, for hostile-reply tests."""
        self.heartbeat_ms = heartbeat_ms
        self._lock = threading.Lock()
        self._out: queue.Queue[tuple[list[bytes], bool]] = queue.Queue()
        self._retry: list[list[bytes]] = []
        self.replay_batches = True
        self.subscribers = 0
        ctx = zmq.Context.instance()
        self._push = ctx.socket(zmq.XPUB)
        self._push.setsockopt(zmq.SNDHWM, 0)
        self._push.setsockopt(zmq.XPUB_VERBOSER, 1)  # every subscribe and unsubscribe is seen
        self._push.bind(feed)
        self._router = ctx.socket(zmq.ROUTER)
        self._router.bind(replay)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="engine-twin", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------ scripting
    def append(self, header: bytes, payload: bytes, publish: bool = True) -> None:
        seq = struct.unpack_from(">Q", header, 12)[0]
        with self._lock:
            self.journal[seq] = (header, payload)
            self.last = max(self.last, seq)
        if publish:
            self._out.put(([header, payload], False))

    def append_events(self, events: list[Event], skip: set[int] = frozenset()) -> None:  # type: ignore[assignment]
        for ev in events:
            self.append(*frames_of(ev), publish=ev.seq not in skip)

    def send(self, frames: list[bytes]) -> None:
        """Publish any frames (kept until a bridge has subscribed to take them)."""
        self._out.put((frames, True))

    def new_epoch(self, epoch: int) -> None:
        """An engine restarted on an empty journal."""
        with self._lock:
            self.epoch, self.journal, self.last = epoch, {}, 0

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self._push.close(linger=0)
        self._router.close(linger=0)

    # --------------------------------------------------------------- thread
    def _serve(self) -> None:
        next_hb = time.monotonic()
        while not self._stop.is_set():
            while self._push.poll(0):
                sub = self._push.recv()
                if sub[:1] == b"\x01":
                    self.subscribers += 1
                elif sub[:1] == b"\x00":
                    self.subscribers -= 1
            # Like the engine, never wait on the feed: a journaled frame that finds no bridge is
            # dropped (the bridge replays it); an injected one is kept until a bridge is there.
            while self._retry and self.subscribers > 0:
                self._push.send_multipart(self._retry.pop(0))
            batch: list[bytes] = []
            while True:
                try:
                    frames, keep = self._out.get_nowait()
                except queue.Empty:
                    break
                if keep:
                    if batch:
                        self._push.send(b"".join(batch))
                        batch = []
                    if self._retry or self.subscribers <= 0:
                        self._retry.append(frames)
                    else:
                        self._push.send_multipart(frames)
                    continue
                batch.append(entry(*frames))
                if len(batch) >= 100:
                    self._push.send(b"".join(batch))
                    batch = []
            if batch:
                self._push.send(b"".join(batch))
            if self.heartbeat_ms and time.monotonic() >= next_hb:
                next_hb = time.monotonic() + self.heartbeat_ms / 1000.0
                with self._lock:
                    hb = pack(HEARTBEAT, self.epoch, self.last)
                self._push.send(entry(hb, b""))
            if self._router.poll(5):
                ident, *req = self._router.recv_multipart()
                self._answer(ident, req)

    def _answer(self, ident: bytes, req: list[bytes]) -> None:
        with self._lock:
            epoch, last, journal = self.epoch, self.last, dict(self.journal)
        if req == [b"INFO"]:
            self.requests.append(("INFO",))
            reply = self.info_replies.pop(0) if self.info_replies else [b"INFO", _QQ.pack(epoch, last)]
            self._router.send_multipart([ident, *reply])
            return
        if len(req) != 2 or req[0] != b"REPLAY" or len(req[1]) != _QQQ.size:
            self._router.send_multipart([ident, b"ERR", b"bad_request"])
            return
        e, lo, hi = _QQQ.unpack(req[1])
        self.requests.append(("REPLAY", e, lo, hi))
        if e != epoch:
            self._router.send_multipart([ident, b"ERR", f"epoch_mismatch:{epoch}".encode()])
            return
        seqs = sorted(s for s in journal if s >= max(lo, 1) and (not hi or s <= hi))[:50_000]
        if self.replay_batches:
            for i in range(0, len(seqs), 64):
                chunk = b"".join(entry(*journal[seq]) for seq in seqs[i : i + 64])
                self._router.send_multipart([ident, b"EVS", chunk])
        else:
            for seq in seqs:
                self._router.send_multipart([ident, b"EV", *journal[seq]])
        self._router.send_multipart([ident, b"END", _QQ.pack(epoch, last)])


# ------------------------------------------------------------------------------------ Kafka


@dataclass
class Delivered:
    topic: str
    key: bytes | None
    value: bytes
    headers: dict[str, bytes]


class _Msg:
    def __init__(self, topic: str, key: bytes | None, value: bytes, headers: list[tuple[str, bytes]]) -> None:
        self._t, self._k, self._v, self._h = topic, key, value, headers

    def topic(self) -> str:
        return self._t

    def key(self) -> bytes | None:
        return self._k

    def value(self) -> bytes:
        return self._v

    def headers(self) -> list[tuple[str, bytes]]:
        return self._h


class KafkaTwin:
    """Stands in for ``bridge.kafka.KafkaIO``: topics, checkpoint, producers, one shared log."""

    def __init__(self, s: BridgeSettings) -> None:
        self.s = s
        self.log: list[Delivered] = []
        self.down_for = 0
        """ensure_topics fails (retriable) this many more times."""
        self.producers: list[ProducerTwin] = []
        self.violations: list[str] = []
        self.acked_ceiling: dict[int, int] = {}

    def ensure_topics(self) -> None:
        if self.down_for > 0:
            self.down_for -= 1
            raise BridgeUnavailable("cannot reach Kafka at twin: down")

    def read_checkpoint(self) -> Checkpoint | None:
        found = None
        for d in self.log:
            if d.topic == self.s.topic_checkpoint and d.key == self.s.bridge_id.encode():
                found = Checkpoint.from_bytes(d.value)
        return found

    def make_producer(self, on_error: Callable[[KafkaError], None]) -> ProducerTwin:
        p = ProducerTwin(self, on_error)
        self.producers.append(p)
        return p

    @property
    def producer(self) -> ProducerTwin:
        return self.producers[-1]

    def topic(self, name: str) -> list[Delivered]:
        return [d for d in self.log if d.topic == name]

    def seqs(self) -> list[int]:
        event_topics = {self.s.topic_updates, self.s.topic_trades, self.s.topic_balances}
        return [int(d.headers["seq"]) for d in self.log if d.topic in event_topics]

    def checkpoints(self) -> list[Checkpoint]:
        return [Checkpoint.from_bytes(d.value) for d in self.topic(self.s.topic_checkpoint)]


class ProducerTwin:
    """Delivers on poll() in order. ``hold`` keeps everything queued (Kafka away); ``capacity``
    makes produce() raise BufferError when that many records wait; ``refuse(topic, value, headers)``
    returns a KafkaError to report instead of delivering; ``raise_on(topic, value, headers)``
    returns a KafkaException to raise from produce()."""

    def __init__(self, kafka: KafkaTwin, on_error: Callable[[KafkaError], None]) -> None:
        self.kafka = kafka
        self.on_error = on_error
        self.queue: list[tuple[_Msg, Any]] = []
        self.hold = False
        self.capacity: int | None = None
        self.refuse: Callable[[str, bytes, dict[str, bytes]], KafkaError | None] = lambda t, v, h: None
        self.raise_on: Callable[[str, bytes, dict[str, bytes]], Exception | None] = lambda t, v, h: None
        self.purged = False

    def produce(
        self,
        topic: str,
        value: bytes | None = None,
        key: bytes | None = None,
        headers: list[tuple[str, bytes]] | None = None,
        on_delivery: Any = None,
    ) -> None:
        headers = list(headers or [])
        h = dict(headers)
        if self.capacity is not None and len(self.queue) >= self.capacity:
            raise BufferError("queue full")
        exc = self.raise_on(topic, value or b"", h)
        if exc is not None:
            raise exc
        s = self.kafka.s
        counted = topic in (s.topic_updates, s.topic_trades, s.topic_balances) or (
            topic == s.topic_dlq and h.get("accounted") == b"1"
        )
        if counted:
            epoch, seq = int(h["epoch"]), int(h["seq"])
            if self.kafka.acked_ceiling.get(epoch, -1) < seq:
                self.kafka.violations.append(
                    f"{topic} epoch {epoch} seq {seq} handed over with ceiling {self.kafka.acked_ceiling.get(epoch)}"
                )
        size = len(value or b"") + sum(len(k) + len(v) for k, v in headers)
        if size > s.max_message_bytes:
            self.kafka.violations.append(f"a {size}-byte record for {topic} exceeds {s.max_message_bytes}")
        self.queue.append((_Msg(topic, key, value or b"", headers), on_delivery))

    def poll(self, timeout: float = 0) -> int:
        if self.hold or not self.queue:
            if timeout:
                time.sleep(min(timeout, 0.005))
            return 0
        batch, self.queue = self.queue, []
        for msg, cb in batch:
            err = self.refuse(msg.topic(), msg.value(), dict(msg.headers()))
            if err is None:
                self.kafka.log.append(Delivered(msg.topic(), msg.key(), msg.value(), dict(msg.headers())))
                if msg.topic() == self.kafka.s.topic_checkpoint:
                    cp = Checkpoint.from_bytes(msg.value())
                    self.kafka.acked_ceiling[cp.epoch] = max(self.kafka.acked_ceiling.get(cp.epoch, 0), cp.ceiling)
            if cb is not None:
                cb(err, msg)
        return len(batch)

    def flush(self, timeout: float = 0) -> int:
        if not self.hold:
            self.poll(0)
        return len(self.queue)

    def purge(self) -> None:
        batch, self.queue = self.queue, []
        self.purged = True
        for msg, cb in batch:
            if cb is not None:
                cb(KafkaError(KafkaError._PURGE_QUEUE), msg)

    def __len__(self) -> int:
        return len(self.queue)


def twin_settings(tag: str, **overrides: Any) -> BridgeSettings:
    values: dict[str, Any] = {
        "feed_endpoint": f"inproc://feed-{tag}",
        "replay_endpoint": f"inproc://replay-{tag}",
        "topic_updates": "u",
        "topic_trades": "t",
        "topic_balances": "b",
        "topic_dlq": "dlq",
        "topic_checkpoint": "cp",
        "bridge_id": "twin",
        "metrics_port": 0,
        "gap_wait_ms": 20,
        "replay_timeout_ms": 1000,
        "schema_registry_url": None,
        "kafka_bootstrap": "twin:0",
    }
    values.update(overrides)
    return BridgeSettings(_env_file=None, **values)  # type: ignore[call-arg]


def run_until(bridge: Any, cond: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    """Turn the bridge's loop (in this thread) until ``cond()``; bounded."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        bridge.step(poll_ms=5)
