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

Replays are served in slices so commands keep their latency: per loop turn at
most ``replay_chunk`` events per request (one ``EVS`` message: the journaled
entries as they are) and ``replay_turn_events`` in all, round-robin; one
request at a time per client (ROUTER identity) and at most
``replay_max_active`` at once (others get ``ERR busy:...`` at once); a request
returns at most ``REPLAY_LIMIT`` events, then ``END`` with the engine's
(epoch, last seq), and the client asks again from where it got to. The replay
socket is ``ROUTER_MANDATORY``: a client that does not read pauses only its
own replay (abandoned after ``replay_stall_ms``), and one that left is dropped.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import struct
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace

import zmq

from engine.commands import AdvanceTime, Command, CommandResult
from engine.gateway import RequestError, parse_request
from engine.interfaces import EngineError
from engine.journal import Journal
from engine.recovery import RecoveryReport, recover
from engine.settings import EngineSettings
from schemas.events import RejectReason
from schemas.wire import ENTRY, HEARTBEAT, UNPUBLISHABLE, encode_events, entry, pack

__all__ = ["REPLAY_LIMIT", "EngineFatal", "EngineService", "ServiceStats"]

log = logging.getLogger("ohs.engine")

REPLAY_LIMIT = 50_000
"""Most events one replay request returns; the client asks again from where it got to."""
_REPLAY_MAX_FRAME = 4096
"""A replay request is a few dozen bytes: ZeroMQ drops a peer that sends a bigger frame."""
_MAX_PARTS = 3
"""Frames kept after the identity (the rest of a longer message is drained unread)."""
_BATCH_BYTES = 64 * 1024
"""A feed message holds entries up to about this size (more only for one command's many events)."""
_TYPE_AT = 4 + 3
"""Offset of the event type in an entry (after the size, the magic and the version)."""


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


@dataclass
class _Replay:
    ident: bytes
    entries: Iterator[tuple[int, bytes]]
    last_progress: float
    pending: list[bytes] | None = None
    """A message that met a full pipe: sent first on the next turn."""
    pending_events: int = 0
    ended: bool = False


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
        self._replays: dict[bytes, _Replay] = {}
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

    def submit(self, commands: Sequence[Command]) -> list[CommandResult]:
        """Execute, journal, then publish. Commands must carry non-decreasing ts_ns.

        Each event is encoded once: the same entry bytes go into the journal and onto the feed.
        The whole batch is written to the journal (one system call) before any of it is sent or
        answered. A command outside the wire ranges gets its rejection without being executed or
        journaled: it changes nothing, and the journal must hold only what can be published."""
        results: list[CommandResult] = []
        sections: list[bytes] = []
        journal, engine, stats = self.journal, self.engine, self.stats
        add, range_reason, apply, append = journal.add, engine.range_reason, engine.apply, results.append
        none = RejectReason.NONE
        rejected = events = 0
        for cmd in commands:
            reason = range_reason(cmd)
            if reason is not none:
                append(CommandResult(False, reason))
                rejected += 1
                stats.out_of_range += 1
                continue
            try:
                result = apply(cmd)
                evs = result.events
                if evs:
                    entries, json_records = encode_events(evs)
                    add(cmd, evs[0].seq, len(evs), entries, json_records or ())
                    sections.append(entries)
                    events += len(evs)
                    if json_records:
                        self._log_markers(entries)
                else:
                    add(cmd, 0, 0, b"")
            except Exception as exc:
                raise EngineFatal(f"{type(exc).__name__} executing or journaling {cmd!r:.300}") from exc
            append(result)
            if not result.accepted:
                rejected += 1
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
        return results

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
            if entries[pos + _TYPE_AT] == UNPUBLISHABLE:
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
                        self._on_replay(frames, count)
                except EngineFatal:
                    raise
                except Exception:  # no input may end the process
                    self.stats.handler_errors += 1
                    log.exception("%s request failed", "gateway" if gateway else "replay")
        self._replay_moved = self._serve_replays() if self._replays else False
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
            "replays": len(self._replays),
        }

    def close(self) -> None:
        for r in self._replays.values():
            _close(r.entries)
        self._replays.clear()
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
                "first_seq": r.events[0].seq if r.events else 0,
                "last_seq": r.events[-1].seq if r.events else 0,
            }
            for r in results
        ]
        self.gateway.send_multipart([ident, b"OK", json.dumps(reply).encode()])

    # ---------------------------------------------------------------- replay
    def _reply(self, frames: list[bytes]) -> bool | None:
        """True if sent, False if the client's pipe is full, None if the client is gone."""
        try:
            self.replay.send_multipart(frames, zmq.NOBLOCK)
        except zmq.Again:
            return False
        except zmq.ZMQError as exc:
            if exc.errno == zmq.EHOSTUNREACH:
                return None
            raise
        return True

    def _on_replay(self, frames: list[zmq.Frame], count: int) -> None:
        ident = frames[0].bytes
        parts = [f.bytes for f in frames[1:]]
        epoch, last = self.engine.epoch, self.engine.last_seq
        if count == 2 and parts[0] == b"INFO":
            self._reply([ident, b"INFO", _QQ.pack(epoch, last)])
            return
        if count != 3 or parts[0] != b"REPLAY" or len(parts[1]) != _QQQ.size:
            self.stats.replay_errors += 1
            self._reply([ident, b"ERR", b"bad_request"])
            return
        req_epoch, lo, hi = _QQQ.unpack(parts[1])
        if req_epoch != epoch:
            self._reply([ident, b"ERR", f"epoch_mismatch:{epoch}".encode()])
            return
        if ident in self._replays or len(self._replays) >= self.settings.replay_max_active:
            # One at a time per client: its EV frames would otherwise interleave with another answer's.
            self.stats.replay_busy += 1
            self._reply([ident, b"ERR", b"busy:client" if ident in self._replays else b"busy:server"])
            return
        self.stats.replay_requests += 1
        # Fsync first, and never past what is durable now: a replayed event must never be one a
        # machine crash could still take back (the replay is sent over later loop turns).
        self.journal.sync()
        hi = min(hi, last) if hi else last
        lo = max(lo, 1)
        entries: Iterator[tuple[int, bytes]] = iter(()) if lo > hi else self.journal.read_entries(lo, hi, REPLAY_LIMIT)
        self._replays[ident] = _Replay(ident, entries, time.monotonic())

    def _serve_replays(self) -> bool:
        """One turn of replay work, round-robin; True if any replay moved."""
        s = self.settings
        budget, moved, now = s.replay_turn_events, False, time.monotonic()
        for ident in list(self._replays):
            if budget <= 0:
                break
            r = self._replays.pop(ident)  # re-inserted at the end: the next turn starts with the others
            try:
                sent, alive = self._advance(r, min(s.replay_chunk, budget))
            except Exception:  # the journal could not be read: tell the client, never end the process
                self.stats.handler_errors += 1
                log.exception("replay for %s failed", ident.hex())
                self._reply([ident, b"ERR", b"journal_error"])
                _close(r.entries)
                continue
            budget -= max(sent, 1)
            moved = moved or sent > 0
            if not alive:
                _close(r.entries)
            elif sent == 0 and now - r.last_progress > s.replay_stall_ms / 1000.0:
                self.stats.replay_abandoned += 1
                log.warning("replay for %s abandoned: no reads for %d ms", ident.hex(), s.replay_stall_ms)
                _close(r.entries)
            else:
                self._replays[ident] = r
        return moved

    def _advance(self, r: _Replay, n: int) -> tuple[int, bool]:
        """Send up to ``n`` events of ``r`` as one EVS message: (events sent, whether it has more)."""
        if r.pending is None:
            chunk = [e for _seq, e in itertools.islice(r.entries, n)]
            if chunk:
                r.pending, r.pending_events = [r.ident, b"EVS", b"".join(chunk)], len(chunk)
                self.stats.unpublishable += sum(1 for e in chunk if e[_TYPE_AT] == UNPUBLISHABLE)
            else:
                r.ended = True
                r.pending = [r.ident, b"END", _QQ.pack(self.engine.epoch, self.engine.last_seq)]
        ok = self._reply(r.pending)
        if ok is None:  # the client left: nobody to send the rest to
            return 0, False
        if not ok:
            return 0, True  # its pipe is full: the others' turn
        sent = r.pending_events
        r.pending, r.pending_events, r.last_progress = None, 0, time.monotonic()
        if r.ended:
            return 1, False
        self.stats.replayed_events += sent
        return sent, True


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


def _close(entries: Iterator[tuple[int, bytes]]) -> None:
    close = getattr(entries, "close", None)
    if close is not None:
        close()


_QQ = struct.Struct(">QQ")
_QQQ = struct.Struct(">QQQ")
_SIZE = struct.Struct(">I")
_SEQ = struct.Struct(">Q")
