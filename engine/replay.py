"""The engine's replay service: any range of seqs, re-sent from the journal byte for byte.

Replays are served in slices so commands keep their latency: per loop turn at most
``replay_chunk`` events per request (one ``EVS`` message: the journaled entries as they are) and
``replay_turn_events`` in all, round-robin; one request at a time per client (ROUTER identity)
and at most ``replay_max_active`` at once (others get ``ERR busy:...`` at once); a request returns
at most ``REPLAY_LIMIT`` events, then ``END`` with the engine's (epoch, last seq), and the client
asks again from where it got to. The socket is ``ROUTER_MANDATORY``: a client that does not read
pauses only its own replay (abandoned after ``replay_stall_ms``), and one that left is dropped.
``INFO`` answers the engine's (epoch, last seq) at once.

Owned by ``engine.service.EngineService``, on its one thread: it hands each request over
(``on_request``) and gives the service a turn every loop (``serve``).
"""

from __future__ import annotations

import itertools
import logging
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

import zmq

from engine.journal import Journal
from engine.settings import EngineSettings
from schemas.wire import UNPUBLISHABLE

__all__ = ["REPLAY_LIMIT", "ReplayService"]

log = logging.getLogger("ohs.engine")

REPLAY_LIMIT = 50_000
"""Most events one replay request returns; the client asks again from where it got to."""
TYPE_AT = 4 + 3
"""Offset of the event type in an entry (after the size, the magic and the version)."""
_QQ = struct.Struct(">QQ")
_QQQ = struct.Struct(">QQQ")


@dataclass
class _Replay:
    ident: bytes
    entries: Iterator[tuple[int, bytes]]
    last_progress: float
    pending: list[bytes] | None = None
    """A message that met a full pipe: sent first on the next turn."""
    pending_events: int = 0
    ended: bool = False


class ReplayStats(Protocol):
    """The counters the replay service keeps (``engine.service.ServiceStats``)."""

    replay_requests: int
    replayed_events: int
    replay_busy: int
    replay_abandoned: int
    replay_errors: int
    handler_errors: int
    unpublishable: int


class ReplayService:
    def __init__(
        self,
        sock: zmq.Socket[bytes],
        journal: Journal,
        settings: EngineSettings,
        stats: ReplayStats,
        position: Callable[[], tuple[int, int]],
    ) -> None:
        self.sock, self.journal, self.s, self.stats, self.position = sock, journal, settings, stats, position
        """``position``: the engine's (epoch, last seq) now."""
        self.active: dict[bytes, _Replay] = {}
        """Replays under way, by client identity, in round-robin order."""

    def close(self) -> None:
        for r in self.active.values():
            _close(r.entries)
        self.active.clear()

    def _reply(self, frames: list[bytes]) -> bool | None:
        """True if sent, False if the client's pipe is full, None if the client is gone."""
        try:
            self.sock.send_multipart(frames, zmq.NOBLOCK)
        except zmq.Again:
            return False
        except zmq.ZMQError as exc:
            if exc.errno == zmq.EHOSTUNREACH:
                return None
            raise
        return True

    def on_request(self, frames: list[zmq.Frame], count: int) -> None:
        """One request from the replay socket (identity first): INFO, or REPLAY(epoch, lo, hi)."""
        ident = frames[0].bytes
        parts = [f.bytes for f in frames[1:]]
        epoch, last = self.position()
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
        if ident in self.active or len(self.active) >= self.s.replay_max_active:
            # One at a time per client: its EV frames would otherwise interleave with another answer's.
            self.stats.replay_busy += 1
            self._reply([ident, b"ERR", b"busy:client" if ident in self.active else b"busy:server"])
            return
        self.stats.replay_requests += 1
        # Fsync first, and never past what is durable now: a replayed event must never be one a
        # machine crash could still take back (the replay is sent over later loop turns).
        self.journal.sync()
        hi = min(hi, last) if hi else last
        lo = max(lo, 1)
        entries: Iterator[tuple[int, bytes]] = iter(()) if lo > hi else self.journal.read_entries(lo, hi, REPLAY_LIMIT)
        self.active[ident] = _Replay(ident, entries, time.monotonic())

    def serve(self) -> bool:
        """One turn of replay work, round-robin; True if any replay moved."""
        s = self.s
        budget, moved, now = s.replay_turn_events, False, time.monotonic()
        for ident in list(self.active):
            if budget <= 0:
                break
            r = self.active.pop(ident)  # re-inserted at the end: the next turn starts with the others
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
                self.active[ident] = r
        return moved

    def _advance(self, r: _Replay, n: int) -> tuple[int, bool]:
        """Send up to ``n`` events of ``r`` as one EVS message: (events sent, whether it has more)."""
        if r.pending is None:
            chunk = [e for _seq, e in itertools.islice(r.entries, n)]
            if chunk:
                r.pending, r.pending_events = [r.ident, b"EVS", b"".join(chunk)], len(chunk)
                self.stats.unpublishable += sum(1 for e in chunk if e[TYPE_AT] == UNPUBLISHABLE)
            else:
                r.ended = True
                r.pending = [r.ident, b"END", _QQ.pack(*self.position())]
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


def _close(entries: Iterator[tuple[int, bytes]]) -> None:
    close = getattr(entries, "close", None)
    if close is not None:
        close()
