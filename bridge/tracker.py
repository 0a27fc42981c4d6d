"""Which seqs of the current epoch the bridge has, which Kafka has confirmed, which are missing.

Pure logic, no I/O. Two frontiers per epoch:

* ``received``: the highest seq R such that every seq <= R has been handed to
  the producer, *in seq order*. Seqs above R that arrive early wait in
  ``pending`` (with their payload) until the hole below them is filled, so
  every partition of every topic holds a user's events in seq order: the
  worker can then treat any seq at or below a user's last applied seq as a
  duplicate. A seq at or below R, or already pending, is a duplicate.
* ``watermark``: the highest seq W such that every seq <= W has been
  *acknowledged* by Kafka (all of its records: a Trade is two). W never
  passes an unconfirmed seq; it is what the bridge checkpoints, and what a
  restarted bridge resumes from.

A hole is (R, first pending) or, when a heartbeat says the engine is at H > R
with nothing pending, (R, H]. A hole is reported once it has stayed open for
``wait``, then again only after ``retry_after`` has passed without it closing
(the replay request may have been lost).

Heartbeats and early seqs come from the feed, which is not trusted to tell the
truth about seqs: ``engine_is_at`` applies the replay service's answer and hands
back what waits beyond the engine's real last seq, for the dead-letter topic.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["Hole", "SeqTracker"]


@dataclass(frozen=True, slots=True)
class Hole:
    epoch: int
    first: int
    last: int
    """Inclusive; 0 means "up to whatever the engine has"."""


@dataclass
class SeqTracker:
    epoch: int
    watermark: int = 0
    received: int = -1
    engine_last: int = 0
    """Highest seq the engine said it has (heartbeats, events)."""
    pending: dict[int, object] = field(default_factory=dict)
    """Early seqs and their payloads, held back until the hole below them closes. Never dropped
    here: the bridge stops reading the feed while too many wait (see ``Bridge``)."""
    _acked_above: set[int] = field(default_factory=set)
    _outstanding: dict[int, int] = field(default_factory=dict)
    """seq -> records still awaiting acknowledgement."""
    _hole_reported_at: float = -1.0
    _hole_reported: Hole | None = None
    _hole_start: int = 0
    _hole_seen_at: float = 0.0

    def __post_init__(self) -> None:
        if self.received < self.watermark:
            self.received = self.watermark

    # ------------------------------------------------------------------ intake
    def offer(self, seq: int, item: object) -> list[object]:
        """The items now ready to produce, in seq order (empty for a duplicate or an early seq)."""
        if seq > self.engine_last:
            self.engine_last = seq
        if seq <= self.received or seq in self.pending:
            return []
        if seq != self.received + 1:
            self.pending[seq] = item
            return []
        ready = [item]
        self.received = seq
        while self.received + 1 in self.pending:
            self.received += 1
            ready.append(self.pending.pop(self.received))
        return ready

    def is_duplicate(self, seq: int) -> bool:
        return seq <= self.received or seq in self.pending

    def heartbeat(self, last_seq: int) -> None:
        if last_seq > self.engine_last:
            self.engine_last = last_seq

    def engine_is_at(self, last_seq: int) -> list[tuple[int, object]]:
        """The engine's replay service (authoritative) says its last seq is ``last_seq``: what
        waits above it was never emitted by the engine (forged, or lost with an unsynced journal).
        Returns those (seq, item) pairs, removed, and lowers ``engine_last`` to the truth (a
        forged heartbeat may have raised it)."""
        beyond = sorted(seq for seq in self.pending if seq > last_seq)
        out = [(seq, self.pending.pop(seq)) for seq in beyond]
        self.engine_last = max(last_seq, self.received, max(self.pending, default=0))
        return out

    def take_pending(self) -> list[tuple[int, object]]:
        """Everything waiting above a hole, removed (the epoch is over: the hole will never fill)."""
        out = sorted(self.pending.items())
        self.pending.clear()
        return out

    # ----------------------------------------------------------------- acking
    def expect(self, seq: int, records: int) -> None:
        """``seq`` was handed to the producer as ``records`` Kafka records."""
        self._outstanding[seq] = records

    def ack(self, seq: int) -> None:
        """One record of ``seq`` was acknowledged by Kafka."""
        left = self._outstanding.get(seq)
        if left is None:
            return
        if left > 1:
            self._outstanding[seq] = left - 1
            return
        del self._outstanding[seq]
        if seq == self.watermark + 1:
            self.watermark = seq
            while self.watermark + 1 in self._acked_above:
                self.watermark += 1
                self._acked_above.remove(self.watermark)
        elif seq > self.watermark:
            self._acked_above.add(seq)

    def in_flight(self) -> int:
        return len(self._outstanding)

    # ------------------------------------------------------------------ holes
    def hole(self) -> Hole | None:
        if self.pending:
            return Hole(self.epoch, self.received + 1, min(self.pending) - 1)
        if self.engine_last > self.received:
            return Hole(self.epoch, self.received + 1, self.engine_last)
        return None

    def hole_to_request(self, now: float, wait: float, retry_after: float) -> Hole | None:
        """The hole to ask the engine for, if any: one that has stayed open for ``wait`` (so
        what is merely in flight can arrive), asked again after ``retry_after`` (a replay
        request can be lost)."""
        hole = self.hole()
        if hole is None:
            self._hole_reported = None
            self._hole_start = 0
            return None
        if hole.first != self._hole_start:
            self._hole_start, self._hole_seen_at = hole.first, now
        if now - self._hole_seen_at < wait:
            return None
        if (
            self._hole_reported is None
            or now - self._hole_reported_at >= retry_after
            or (hole.first != self._hole_reported.first)
        ):
            self._hole_reported, self._hole_reported_at = hole, now
            return hole
        return None
