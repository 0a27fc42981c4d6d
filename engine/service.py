"""The engine process: journal + core + ZeroMQ feed, replay service and command gateway.

One thread owns everything, so the core stays deterministic and lock-free:
``submit`` executes commands, appends them with their events to the journal
and only then publishes the events; ``service_io`` answers the gateway and
replay sockets and emits heartbeats and AdvanceTime ticks. ``run`` loops
``service_io`` until stopped; the simulator calls ``submit`` and
``service_io`` itself, between its paced batches.

The feed is best-effort by design: a PUSH socket at its high-water mark (no
bridge, or a slow one) would block the engine, so a send that would block is
dropped and counted. The event is in the journal; the bridge sees the hole in
the seqs (or a heartbeat ahead of what it received) and replays it.
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

from engine.commands import AdvanceTime, Command, CommandResult
from engine.journal import Journal, command_from_dict
from engine.recovery import recover
from engine.settings import EngineSettings
from engine.wire import HEARTBEAT, header_for, pack
from schemas.codec import encode

__all__ = ["EngineService", "ServiceStats"]

log = logging.getLogger("ohs.engine")

REPLAY_LIMIT = 50_000
"""Most events one replay request returns; the client asks again from where it got to."""


@dataclass
class ServiceStats:
    commands: int = 0
    events: int = 0
    rejected: int = 0
    feed_dropped: int = 0
    replay_requests: int = 0
    replayed_events: int = 0
    gateway_errors: int = 0


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
        self.engine, replayed = recover(self.journal)
        log.info(
            "engine recovered epoch=%d last_seq=%d commands=%d in %.2fs",
            self.engine.epoch,
            self.engine.last_seq,
            replayed,
            time.monotonic() - t0,
        )
        self.stats = ServiceStats()
        self._ctx = ctx or zmq.Context.instance()
        self.feed = self._ctx.socket(zmq.PUSH)
        self.feed.setsockopt(zmq.SNDHWM, settings.feed_hwm)
        self.feed.setsockopt(zmq.LINGER, 2000)
        self.feed.bind(settings.feed_endpoint)
        self.replay = self._ctx.socket(zmq.ROUTER)
        self.replay.bind(settings.replay_endpoint)
        self.gateway = self._ctx.socket(zmq.ROUTER)
        self.gateway.bind(settings.gateway_endpoint)
        self._poller = zmq.Poller()
        self._poller.register(self.replay, zmq.POLLIN)
        self._poller.register(self.gateway, zmq.POLLIN)
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
        """Execute, journal, then publish. Commands must carry non-decreasing ts_ns."""
        results = []
        journal, engine, send = self.journal, self.engine, self.feed.send_multipart
        for cmd in commands:
            result = engine.execute(cmd)
            journal.append(cmd, result.events)
            results.append(result)
            self.stats.commands += 1
            if not result.accepted:
                self.stats.rejected += 1
        journal.maybe_sync()
        for result in results:
            for ev in result.events:
                try:
                    send((header_for(ev), encode(ev)), zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    self.stats.feed_dropped += 1
                self.stats.events += 1
        return results

    # ---------------------------------------------------------------------- io
    def service_io(self, timeout_ms: int = 0) -> None:
        """Answer pending requests, then heartbeats, ticks and the fsync interval."""
        for sock, _ in self._poller.poll(timeout_ms):
            for _ in range(100):  # bounded: commands must not starve behind a flood
                try:
                    frames = sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                if sock is self.gateway:
                    self._on_gateway(frames)
                else:
                    self._on_replay(frames)
        now = time.monotonic()
        if now >= self._next_tick:
            self._next_tick = now + self.settings.tick_ms / 1000.0
            self.submit([AdvanceTime(self.stamp())])
        if now >= self._next_heartbeat:
            self._next_heartbeat = now + self.settings.heartbeat_ms / 1000.0
            with contextlib.suppress(zmq.Again):
                self.feed.send_multipart((pack(HEARTBEAT, self.engine.epoch, self.engine.last_seq), b""), zmq.NOBLOCK)
        self.journal.maybe_sync()

    def run(self, should_stop: Callable[[], bool]) -> None:
        while not should_stop():
            self.service_io(timeout_ms=min(self.settings.tick_ms, self.settings.heartbeat_ms) // 2)

    def close(self) -> None:
        self.journal.close()
        for sock in (self.feed, self.replay, self.gateway):
            sock.close(linger=1000)

    # --------------------------------------------------------------- handlers
    def _on_gateway(self, frames: list[bytes]) -> None:
        ident = frames[0]
        try:
            if len(frames) != 3 or frames[1] != b"CMD":
                raise ValueError("expected [CMD, json]")
            body = json.loads(frames[2])
            items = body if isinstance(body, list) else [body]
            if not items or len(items) > 10_000:
                raise ValueError("a request holds 1 to 10000 commands")
            commands = []
            for item in items:
                if not isinstance(item, dict) or item.get("type") == "tick":
                    raise ValueError("each command is an object with a type: place|cancel|deposit|withdraw")
                # The client's clock is never trusted: the engine stamps every command.
                cmd = command_from_dict({**item, "ts_ns": 0})
                commands.append(replace(cmd, ts_ns=self.stamp()))
        except (ValueError, KeyError, TypeError) as exc:
            self.stats.gateway_errors += 1
            self.gateway.send_multipart([ident, b"ERR", f"bad request: {exc}".encode()])
            return
        results = self.submit(commands)
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

    def _on_replay(self, frames: list[bytes]) -> None:
        ident = frames[0]
        epoch, last = self.engine.epoch, self.engine.last_seq
        if len(frames) == 2 and frames[1] == b"INFO":
            self.replay.send_multipart([ident, b"INFO", _QQ.pack(epoch, last)])
            return
        if len(frames) != 3 or frames[1] != b"REPLAY" or len(frames[2]) != _QQQ.size:
            self.replay.send_multipart([ident, b"ERR", b"bad_request"])
            return
        req_epoch, lo, hi = _QQQ.unpack(frames[2])
        if req_epoch != epoch:
            self.replay.send_multipart([ident, b"ERR", f"epoch_mismatch:{epoch}".encode()])
            return
        self.stats.replay_requests += 1
        # Fsync first: a replayed event must never be one a machine crash could still take back.
        self.journal.sync()
        for ev in self.journal.read_events(max(lo, 1), hi, REPLAY_LIMIT):
            self.replay.send_multipart([ident, b"EV", header_for(ev), encode(ev)])
            self.stats.replayed_events += 1
        self.replay.send_multipart([ident, b"END", _QQ.pack(epoch, last)])


_QQ = struct.Struct(">QQ")
_QQQ = struct.Struct(">QQQ")
