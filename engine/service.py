"""The engine process: journal + core + ZeroMQ feed, replay service and command gateway.

One thread owns everything, so the core stays deterministic and lock-free:
``submit`` executes commands, encodes each event once (``schemas.wire.encode_events``), journals
the bytes and only then publishes the same bytes; ``service_io`` answers the gateway and replay
sockets and emits heartbeats and AdvanceTime ticks. ``run`` loops ``service_io`` until stopped;
the simulator calls ``submit`` and ``service_io`` itself, between its paced batches.

The feed is a PUB socket: every subscriber gets every message, and none can slow the engine. A
send never blocks: ZeroMQ queues up to ``feed_hwm`` messages per subscriber and drops the rest for
that subscriber alone (one that is slow, or stopped reading). A message is a batch of entries
(about ``_BATCH_BYTES``, more only for one command's many events), in seq order. What a
subscriber lost is in the journal: it sees the hole in the seqs, or a heartbeat ahead of what it
received, and asks the replay service, exactly as after its own restart. A subscriber that
connects late (PUB/SUB's "slow joiner") misses what was sent before its subscription arrived,
and finds it the same way.

Hostile input: no message on any socket can end the process. Every message is
received with a bound on its frames (the rest are drained unread) and ZeroMQ
drops a peer whose frame exceeds ``MAXMSGSIZE``; a gateway request is parsed
by ``engine.gateway`` (size, nesting, command count); a command outside the
wire ranges is rejected by the core before it is journaled; a journaled event
that still cannot be published (a journal from before those rules) goes out
as an ``UNPUBLISHABLE`` marker. Handlers catch what they raise, with one
exception on purpose: a failure inside the core or the journal append leaves
memory and journal apart, so the process stops and recovery restores the
journal's state (the command that failed was never journaled).

Replays (``engine.replay.ReplayService``) are served in slices between the other work, so
commands keep their latency.
"""

from __future__ import annotations

import contextlib
import json
import logging
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import zmq

from engine import core_build
from engine.batch import Outcome, execute_batch
from engine.commands import AdvanceTime, Command
from engine.gateway import RequestError, parse_request
from engine.interfaces import EngineError
from engine.journal import Journal
from engine.recovery import RecoveryReport, recover
from engine.replay import REPLAY_LIMIT, TYPE_AT, ReplayService
from engine.settings import EngineSettings
from schemas import wire
from schemas.events import Event
from schemas.wire import ENTRY, HEARTBEAT, UNPUBLISHABLE, encode_events, entry, pack

__all__ = ["REPLAY_LIMIT", "EngineFatal", "EngineService", "ServiceStats"]

log = logging.getLogger("ohs.engine")

_REPLAY_MAX_FRAME = 4096
"""A replay request is a few dozen bytes: ZeroMQ drops a peer that sends a bigger frame."""
_MAX_PARTS = 3
"""Frames kept after the identity (the rest of a longer message is drained unread)."""
_BATCH_BYTES = 64 * 1024
"""A feed message holds entries up to about this size (more only for one command's many events)."""


class EngineFatal(EngineError):
    """The core or the journal failed mid-command: memory and journal may disagree, so stop."""

    retriable = False


@dataclass
class ServiceStats:
    commands: int = 0
    events: int = 0
    rejected: int = 0
    out_of_range: int = 0
    """Commands rejected by the wire-range rules (never journaled)."""
    feed_dropped: int = 0
    replay_requests: int = 0
    replayed_events: int = 0
    replay_busy: int = 0
    replay_abandoned: int = 0
    gateway_errors: int = 0
    replay_errors: int = 0
    handler_errors: int = 0
    unpublishable: int = 0
    """Markers sent in place of events that cannot be published (feed and replay)."""
    feed_messages: int = 0
    """Batches sent on the feed (heartbeats excluded)."""


class EngineService:
    def __init__(self, settings: EngineSettings, ctx: zmq.Context[zmq.Socket[bytes]] | None = None) -> None:
        self.settings = settings
        self.journal = Journal.open(
            settings.journal_dir,
            settings.symbol_specs(),
            maker_fee_bps=settings.maker_fee_bps,
            taker_fee_bps=settings.taker_fee_bps,
            fee_account=settings.fee_account,
            fsync=settings.fsync,
            fsync_interval_ms=settings.fsync_interval_ms,
        )
        t0 = time.monotonic()
        self.recovery = RecoveryReport()
        self.engine, replayed = recover(self.journal, self.recovery)
        log.info(
            "engine recovered epoch=%d last_seq=%d commands=%d in %.2fs",
            self.engine.epoch,
            self.engine.last_seq,
            replayed,
            time.monotonic() - t0,
        )
        if self.recovery.unchecked or self.recovery.unpublishable:
            log.error(
                "the journal holds %d commands from before the wire-range rules and %d events that cannot be "
                "published (sent as UNPUBLISHABLE markers); first: %s",
                self.recovery.unchecked,
                self.recovery.unpublishable,
                "; ".join(f"seq {seq} {reason}: {detail}" for seq, reason, detail in self.recovery.examples[:5]),
            )
        self.encoder = "C" if wire.native_in_use() else "Python"
        """Which encoder the hot path uses: without the optional C build the engine runs at about
        half its rate (docs/benchmarks.md), so it says so at start and in /health."""
        if self.encoder == "C":
            log.info("event encoder: C (schemas._avroc)")
        else:
            log.warning("event encoder: Python (schemas._avroc not built, or switched off): about half the rate")
        self.core = core_build()
        """Which core runs (the optional mypyc build or its source, and why): ~1.5x apart."""
        if self.core.startswith("compiled"):
            log.info("engine core: %s", self.core)
        else:
            log.warning("engine core: %s: about two thirds of the compiled core's rate", self.core)
        self.stats = ServiceStats()
        self.last_loop = time.monotonic()
        """When ``service_io`` last ran (for /health; read from another thread)."""
        self._ctx = ctx or zmq.Context.instance()
        self.feed = self._ctx.socket(zmq.PUB)
        self.feed.setsockopt(zmq.SNDHWM, settings.feed_hwm)
        self.feed.setsockopt(zmq.LINGER, 2000)
        self.feed.bind(settings.feed_endpoint)
        self.replay = self._ctx.socket(zmq.ROUTER)
        self.replay.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.replay.setsockopt(zmq.MAXMSGSIZE, _REPLAY_MAX_FRAME)
        self.replay.bind(settings.replay_endpoint)
        self.gateway = self._ctx.socket(zmq.ROUTER)
        self.gateway.setsockopt(zmq.MAXMSGSIZE, 4 * settings.gateway_max_bytes)
        self.gateway.bind(settings.gateway_endpoint)
        self._poller = zmq.Poller()
        self._poller.register(self.replay, zmq.POLLIN)
        self._poller.register(self.gateway, zmq.POLLIN)
        self.replays = ReplayService(
            self.replay, self.journal, settings, self.stats, lambda: (self.engine.epoch, self.engine.last_seq)
        )
        self._replay_moved = False
        self._logged: set[int] = set()
        self._last_ts = 0
        now = time.monotonic()
        self._next_heartbeat = now
        self._next_tick = now + settings.tick_ms / 1000.0

    # --------------------------------------------------------------- commands
    def stamp(self) -> int:
        """Engine time for the next command: the wall clock, never going backwards."""
        self._last_ts = max(time.time_ns(), self._last_ts)
        return self._last_ts

    def submit(self, commands: Sequence[Command]) -> list[Outcome]:
        """Execute, journal, then publish. Commands must carry non-decreasing ts_ns.

        Each event is encoded once: the same entry bytes go into the journal and onto the feed.
        The whole batch is written to the journal (one system call) before any of it is sent or
        answered. A command outside the wire ranges gets its rejection without being executed or
        journaled: it changes nothing, and the journal must hold only what can be published."""
        outcomes: list[Outcome] = []
        sections: list[bytes] = []
        journal, stats = self.journal, self.stats
        try:
            events, rejected, out_of_range = execute_batch(
                self.engine, commands, journal.add, wire.native_encoder(), self._encode_and_stage, outcomes, sections
            )
        except Exception as exc:
            # One outcome per command done: the one at len(outcomes) raised.
            cmd = commands[len(outcomes)]
            raise EngineFatal(f"{type(exc).__name__} executing or journaling {cmd!r:.300}") from exc
        stats.out_of_range += out_of_range
        stats.commands += len(commands)
        stats.rejected += rejected
        try:
            journal.flush()
        except Exception as exc:
            raise EngineFatal(f"{type(exc).__name__} writing the journal") from exc
        journal.maybe_sync()
        if sections:
            self._publish(sections)
            stats.events += events
        return outcomes

    def _encode_and_stage(self, cmd: Command, first: int, count: int, events: Sequence[Event]) -> bytes:
        """``execute_batch``'s way for what the C encoder declines or without it: encode in
        Python, UNPUBLISHABLE markers included, and stage the journal record."""
        entries, json_records = encode_events(events)
        self.journal.add(cmd, first, count, entries, json_records or ())
        if json_records:
            self._log_markers(entries)
        return entries

    def _publish(self, sections: list[bytes]) -> None:
        """Send the entries in batches of about ``_BATCH_BYTES``; a send never blocks (PUB)."""
        batch: list[bytes] = []
        size = 0
        for section in sections:
            if size and size + len(section) > _BATCH_BYTES:
                self._send(b"".join(batch))
                batch, size = [], 0
            batch.append(section)
            size += len(section)
        if batch:
            self._send(b"".join(batch))

    def _send(self, message: bytes) -> None:
        try:
            self.feed.send(message, zmq.NOBLOCK, copy=False)
            self.stats.feed_messages += 1
        except zmq.ZMQError:  # PUB drops for a full subscriber and refuses nothing; a refusal is counted
            self.stats.feed_dropped += 1

    def _log_markers(self, entries: bytes) -> None:
        """Count and log the UNPUBLISHABLE markers among ``entries`` (only after an old journal)."""
        pos = 0
        while pos < len(entries):
            (size,) = _SIZE.unpack_from(entries, pos)
            if entries[pos + TYPE_AT] == UNPUBLISHABLE:
                self.stats.unpublishable += 1
                (seq,) = _SEQ.unpack_from(entries, pos + 16)
                if seq not in self._logged and len(self._logged) < 10_000:
                    self._logged.add(seq)
                    log.error("seq %d cannot be published: sending an UNPUBLISHABLE marker", seq)
            pos += ENTRY.size + size

    # ---------------------------------------------------------------------- io
    def service_io(self, timeout_ms: int = 0) -> None:
        """Answer pending requests, advance the replays, then heartbeats, ticks and the fsync interval."""
        self.last_loop = time.monotonic()
        if self._replay_moved:
            timeout_ms = 0  # replays are moving: keep them going between requests
        for sock, _ in self._poller.poll(timeout_ms):
            gateway = sock is self.gateway
            for _ in range(100):  # bounded: commands must not starve behind a flood
                got = _recv_bounded(sock)
                if got is None:
                    break
                frames, count, size = got
                try:
                    if gateway:
                        self._on_gateway(frames, count, size)
                    else:
                        self.replays.on_request(frames, count)
                except EngineFatal:
                    raise
                except Exception:  # no input may end the process
                    self.stats.handler_errors += 1
                    log.exception("%s request failed", "gateway" if gateway else "replay")
        self._replay_moved = self.replays.serve() if self.replays.active else False
        now = time.monotonic()
        if now >= self._next_tick:
            self._next_tick = now + self.settings.tick_ms / 1000.0
            self.submit([AdvanceTime(self.stamp())])
        if now >= self._next_heartbeat:
            self._next_heartbeat = now + self.settings.heartbeat_ms / 1000.0
            with contextlib.suppress(zmq.ZMQError):
                self.feed.send(entry(pack(HEARTBEAT, self.engine.epoch, self.engine.last_seq), b""), zmq.NOBLOCK)
        self.journal.maybe_sync()

    def run(self, should_stop: Callable[[], bool]) -> None:
        while not should_stop():
            self.service_io(timeout_ms=min(self.settings.tick_ms, self.settings.heartbeat_ms) // 2)

    def status(self) -> dict[str, object]:
        """For /health: read from another thread, so only plain attribute reads."""
        return {
            "phase": "running",
            "last_loop": self.last_loop,
            "epoch": self.engine.epoch,
            "last_seq": self.engine.last_seq,
            "replays": len(self.replays.active),
            "encoder": self.encoder,
            "core": self.core,
        }

    def close(self) -> None:
        self.replays.close()
        self.journal.close()
        for sock in (self.feed, self.replay, self.gateway):
            sock.close(linger=1000)

    # --------------------------------------------------------------- gateway
    def _on_gateway(self, frames: list[zmq.Frame], count: int, size: int) -> None:
        ident = frames[0].bytes
        s = self.settings
        try:
            parts = [f.bytes for f in frames[1:]] if size <= s.gateway_max_bytes else []
            commands = parse_request(
                parts, frames=count - 1, size=size, max_bytes=s.gateway_max_bytes, max_commands=s.gateway_max_commands
            )
        except RequestError as exc:
            self.stats.gateway_errors += 1
            self.gateway.send_multipart([ident, b"ERR", f"bad request: {exc}".encode()])
            return
        results = self.submit([replace(cmd, ts_ns=self.stamp()) for cmd in commands])
        reply = [
            {
                "accepted": r.accepted,
                "reason": r.reason.value,
                "order_id": r.order_id,
                "first_seq": r.first_seq,
                "last_seq": r.last_seq,
            }
            for r in results
        ]
        self.gateway.send_multipart([ident, b"OK", json.dumps(reply).encode()])


def _recv_bounded(sock: zmq.Socket[bytes]) -> tuple[list[zmq.Frame], int, int] | None:
    """(identity + at most ``_MAX_PARTS`` frames, frames in the message, bytes after the identity),
    or None when nothing is waiting. The frames of a longer message are received and dropped."""
    try:
        first = sock.recv(zmq.NOBLOCK, copy=False)
    except zmq.Again:
        return None
    frames, count, size = [first], 1, 0
    while sock.getsockopt(zmq.RCVMORE):
        frame = sock.recv(copy=False)  # the rest of a multipart message is already here
        count += 1
        size += len(frame)
        if count <= _MAX_PARTS + 1:
            frames.append(frame)
    return frames, count, size


_QQ = struct.Struct(">QQ")
_QQQ = struct.Struct(">QQQ")
_SIZE = struct.Struct(">I")
_SEQ = struct.Struct(">Q")
