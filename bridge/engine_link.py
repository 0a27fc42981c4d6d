"""The bridge's link to the engine's replay service: holes filled, epochs confirmed.

A hole (a jump in the seqs, or a heartbeat ahead of what arrived) is asked of the replay service
once it has stayed open for ``gap_wait_ms``; the answer comes through the same intake as the feed.
``INFO`` gives the engine's (epoch, last seq): an epoch is followed only when it confirms it, and
early seqs above the engine's real last seq are dead-lettered.
"""

from __future__ import annotations

import contextlib
import logging
import time

import zmq

from bridge.intake import Intake
from bridge.metrics import M
from bridge.state import (
    QQ,
    QQQ,
    log,
)
from bridge.tracker import Hole

__all__ = ["EngineLink"]


class EngineLink(Intake):
    # ------------------------------------------------------ the replay service
    def _engine_epoch(self, fresh: bool = False) -> int | None:
        """The engine's epoch per its replay service (INFO), reused for ``epoch_check_ms``."""
        info = self._engine_info(fresh)
        return None if info is None else info[0]

    def _engine_info(self, fresh: bool = False) -> tuple[int, int] | None:
        now = time.monotonic()
        # An unanswered INFO is not asked again for a while: a flood of foreign-epoch frames while
        # the engine is away must not block the loop on one timeout each.
        reuse = self.s.epoch_check_ms / 1000.0 * (1 if self._info is not None else 5)
        if not fresh and now - self._info_at < reuse:
            return self._info
        self._info_at = now
        self._info = None
        if self._info_sock is None:
            self._info_sock = self._ctx.socket(zmq.DEALER)
            self._info_sock.setsockopt(zmq.LINGER, 0)
            self._info_sock.connect(self.s.replay_endpoint)
        sock = self._info_sock
        # If nothing can be queued, the poll below times out and the socket is replaced.
        with contextlib.suppress(zmq.Again):
            sock.send_multipart([b"INFO"], zmq.NOBLOCK)
        if sock.poll(self.s.replay_timeout_ms):
            frames = sock.recv_multipart()
            if len(frames) == 2 and frames[0] == b"INFO" and len(frames[1]) == QQ.size:
                epoch, last = QQ.unpack(frames[1])
                self._info = (epoch, last)
                return self._info
            self._say("info", logging.ERROR, "the replay service answered INFO with %d unexpected frames", len(frames))
        # A late reply on this socket must never be read as the answer to the next request.
        sock.close(linger=0)
        self._info_sock = None
        return None

    def _replay_socket(self) -> zmq.Socket[bytes]:
        if self._replay is None:
            self._replay = self._ctx.socket(zmq.DEALER)
            self._replay.setsockopt(zmq.LINGER, 0)
            self._replay.connect(self.s.replay_endpoint)
        return self._replay

    def _drop_replay_socket(self) -> None:
        if self._replay is not None:
            self._replay.close(linger=0)
            self._replay = None

    def _fill_holes(self) -> None:
        tracker = self.tracker
        if tracker is None:
            return
        hole = tracker.hole_to_request(time.monotonic(), self.s.gap_wait_ms / 1000.0, self.s.replay_timeout_ms / 1000.0)
        if hole is None:
            return
        M.gaps.inc()
        log.info("hole in epoch %d: seqs %d..%d; asking the engine to replay", hole.epoch, hole.first, hole.last)
        self._replay_req = hole
        try:
            self._replay_range(hole)
        finally:
            self._replay_req = None

    def _replay_range(self, hole: Hole) -> None:
        sock = self._replay_socket()
        try:
            sock.send_multipart([b"REPLAY", QQQ.pack(hole.epoch, hole.first, hole.last)], zmq.NOBLOCK)
        except zmq.Again:
            self._drop_replay_socket()
            return
        # The engine may stream a long range in chunks between its other work: the timeout runs
        # from the last frame received (bounded overall so the loop always comes back).
        timeout = self.s.replay_timeout_ms / 1000.0
        now = time.monotonic()
        deadline, give_up, received = now + timeout, now + max(10 * timeout, 60.0), 0
        while (now := time.monotonic()) < min(deadline, give_up):
            self._last_loop = now
            if not sock.poll(100):
                self.producer.poll(0)
                continue
            frames = sock.recv_multipart()
            deadline = time.monotonic() + timeout
            kind = frames[0]
            if kind in (b"EVS", b"EV") and len(frames) == (2 if kind == b"EVS" else 3):
                if kind == b"EVS":
                    self._handle_batch(frames[1], replayed=True)
                else:  # one event per message, as an older engine replied
                    self._handle_safely(frames[1:], replayed=True)
                received += 1
                if received % 8 == 0:
                    self.producer.poll(0)  # acknowledgements and the producer's queue keep moving
                    self._renew()
                    self._drain()
                if self._kafka_backpressured():
                    # Kafka is behind: stop here, as the feed loop does, so what is in flight stays
                    # bounded. The rest of the range is asked again once acknowledgements catch up;
                    # a new socket, so nothing late of this answer is read as the next one's.
                    log.debug(
                        "replay of %d..%d paused after %d messages: Kafka is behind", hole.first, hole.last, received
                    )
                    self._drop_replay_socket()
                    return
                continue
            if kind == b"END" and len(frames) == 2 and len(frames[1]) == QQ.size:
                epoch, last = QQ.unpack(frames[1])
                self._replay_ended(epoch, last)
                return
            if kind == b"ERR":
                why = frames[1][:200].decode(errors="replace") if len(frames) > 1 else ""
                self._say("replay-err", logging.ERROR, "replay of %d..%d refused: %s", hole.first, hole.last, why)
                if why.startswith("epoch_mismatch"):
                    self._follow_engine()
                return
            self._dead_letter(frames, "bad_replay_reply", f"{len(frames)} frames starting {kind[:20]!r}")
            self._drop_replay_socket()
            return
        self._say("replay-timeout", logging.ERROR, "replay service at %s did not answer", self.s.replay_endpoint)
        self._drop_replay_socket()

    def _replay_ended(self, epoch: int, last: int) -> None:
        tracker = self.tracker
        if tracker is None or epoch != tracker.epoch:
            return
        tracker.heartbeat(last)
        if max(tracker.pending, default=0) <= last and tracker.engine_last <= last:
            return
        # Seqs wait above the engine's last seq, or a heartbeat claimed more than it has: ask the
        # engine itself. Everything pending was received before this INFO is sent, so a genuine
        # one is at or below the last seq it reports.
        info = self._engine_info(fresh=True)
        if info is None or info[0] != tracker.epoch:
            return
        for seq, item in tracker.engine_is_at(info[1]):
            self._dead_letter_out(item, "beyond_engine_seq", f"seq {seq}: the engine's last seq is {info[1]}")
        M.engine_seq.set(tracker.engine_last)

    def _follow_engine(self) -> None:
        """The replay service says it is in another epoch: follow it if it is newer."""
        epoch = self._engine_epoch(fresh=True)
        if epoch is not None and (self.tracker is None or epoch > self.tracker.epoch):
            self._switch(epoch)
