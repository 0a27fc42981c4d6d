"""The bridge's intake: each event of the feed or of a replay, validated, deduplicated and gated by epoch.

Anything bad goes to the dead-letter topic with a reason: the bridge never crashes on input. A
seq already handed to the producer is a duplicate; an early seq waits above its hole
(``bridge.tracker``); an epoch is followed only when the engine's replay service confirms it.
"""

from __future__ import annotations

import json
import logging

from bridge.deadletter import MAX_MARKER_DETAIL, dead_letter
from bridge.metrics import M
from bridge.outbox import Outbox
from bridge.state import (
    ACCOUNT,
    EVENT,
    OPEN,
    RESERVED,
    Headers,
    Out,
    log,
)
from bridge.tracker import SeqTracker
from schemas.checkpoint import CeilingLease
from schemas.codec import EVENT_TYPES, CodecError, decode_dict
from schemas.events import EventType
from schemas.wire import HEARTBEAT, UNPUBLISHABLE, WireError, WireHeader, parse_marker, split_batch, unpack

__all__ = ["Intake"]


class Intake(Outbox):
    # ----------------------------------------------------------------- intake
    def _handle_batch(self, message: bytes, *, replayed: bool) -> None:
        """Every event of a batch message, in order; what follows a malformed spot is dead-lettered
        whole (the seqs it would have held are found missing and replayed)."""
        entries, problem = split_batch(message)
        for header, payload in entries:
            self._handle_safely([header, payload], replayed=replayed)
        if problem:
            M.received.inc()
            consumed = sum(4 + len(h) + len(p) for h, p in entries)
            self._dead_letter([message[consumed:]], "bad_batch", problem)

    def _handle_safely(self, frames: list[bytes], *, replayed: bool) -> None:
        try:
            self.handle(frames, replayed=replayed)
        except Exception as exc:
            M.loop_errors.inc()
            self._say("handle", logging.ERROR, "error handling an input (dead-lettered)", exc_info=True)
            try:
                self._dead_letter(frames, "bridge_error", f"{type(exc).__name__}: {exc}")
            except Exception:
                self._say("handle-dlq", logging.ERROR, "could not dead-letter an input", exc_info=True)

    def handle(self, frames: list[bytes], *, replayed: bool) -> None:
        M.received.inc()
        if len(frames) != 2:
            self._dead_letter(frames, "bad_frame_count", f"{len(frames)} frames, want 2")
            return
        header_frame, payload = frames
        try:
            h = unpack(header_frame)
        except WireError as exc:
            self._dead_letter(frames, exc.reason, str(exc))
            return
        if h.type == HEARTBEAT:
            self._on_heartbeat(h, frames)
            return
        if h.seq == 0:  # seqs start at 1: not a duplicate of anything
            self._dead_letter(frames, "bad_seq", "seq 0", h)
            return
        # What the replay service sends for a seq the bridge asked for is the engine's word on it:
        # if it is not a valid event, the seq is dead-lettered and counted as done.
        req = self._replay_req if replayed else None
        authoritative = req is not None and h.epoch == req.epoch and req.first <= h.seq <= req.last
        if h.type == UNPUBLISHABLE:
            problem, detail = _check_marker(h, payload)
            if problem and not authoritative:
                self._dead_letter(frames, "bad_marker", problem, h)
                return
            out = self._accounted(frames, h, "unpublishable_event", detail or problem, detail_cap=MAX_MARKER_DETAIL)
        else:
            validated = self._validate(frames, h, payload, authoritative)
            if validated is None:
                return
            out = validated
        tracker = self._gate(h, frames)
        if tracker is None:
            return
        if tracker.is_duplicate(h.seq):
            M.duplicates.inc()
            return
        if replayed:
            M.replayed.inc()
        for ready in tracker.offer(h.seq, out):
            self._emit(ready)  # type: ignore[arg-type]

    def _validate(self, frames: list[bytes], h: WireHeader, payload: bytes, authoritative: bool) -> Out | None:
        """The event's outbox entry; or a dead letter that stands for its seq; or None (dead-lettered)."""
        oversized = len(payload) > self._max_payload
        problem: tuple[str, str] | None = None
        try:
            # The Avro decode is the validation: a record of a known writer, every field of its
            # type, nothing after it (the bridge needs no event object).
            name, record = decode_dict(payload)
            if (
                EVENT_TYPES.get(name) != h.type
                or record.get("seq") != h.seq
                or record.get("epoch") != h.epoch
                or _keys(name, record) != (h.key_user_id, h.key_user_id_2)
            ):
                # The header's keys choose the partitions: one that names another user would
                # put the event where that user's worker state is not.
                problem = ("header_mismatch", f"header {h} does not describe the payload")
            elif self.registry is not None and not oversized:
                # The same Avro body, behind the registry's 5-byte header instead of the 10-byte one.
                payload = self.registry.to_registry(payload)
        except CodecError as exc:
            problem = ("oversized", f"{len(payload)} bytes; {exc}") if oversized else (exc.reason, exc.detail)
        if problem is not None:
            if authoritative:
                return self._accounted(frames, h, *problem)
            self._dead_letter(frames, *problem, h)
            return None
        if oversized:
            detail = f"{len(payload)} bytes > {self._max_payload} (max_message_bytes less {RESERVED} for framing)"
            return self._accounted(frames, h, "oversized_event", detail)
        epoch_bytes = self._epoch_bytes.get(h.epoch)
        if epoch_bytes is None:
            self._epoch_bytes = {h.epoch: (epoch_bytes := str(h.epoch).encode())}
        headers = [("epoch", epoch_bytes), ("seq", str(h.seq).encode())]
        topic = self._topics[EventType(h.type)]
        records: list[tuple[str, bytes | None, bytes, Headers]]
        if h.type == EventType.TRADE:
            records = [(topic, str(h.key_user_id).encode(), payload, [*headers, ("side", b"taker")])]
            if h.key_user_id_2 != h.key_user_id:  # each side's partition gets the trade
                records.append((topic, str(h.key_user_id_2).encode(), payload, [*headers, ("side", b"maker")]))
        else:
            records = [(topic, str(h.key_user_id).encode(), payload, headers)]
        return Out(EVENT, h.epoch, h.seq, records, frames)

    def _accounted(self, frames: list[bytes], h: WireHeader, reason: str, detail: str, detail_cap: int = 1000) -> Out:
        dl = dead_letter(
            frames,
            reason,
            detail,
            limit=self.s.max_message_bytes,
            epoch=h.epoch,
            seq=h.seq,
            accounted=True,
            detail_cap=detail_cap,
        )
        return Out(ACCOUNT, h.epoch, h.seq, [(self.s.topic_dlq, None, dl.value, dl.headers)], frames)

    def _on_heartbeat(self, h: WireHeader, frames: list[bytes]) -> None:
        if frames[1]:
            self._dead_letter(frames, "bad_heartbeat", f"a heartbeat with a {len(frames[1])}-byte payload", h)
            return
        tracker = self.tracker
        if tracker is None or h.epoch != tracker.epoch:
            # Adopting an epoch needs the replay service's word: a garbage frame with a plausible
            # header must not make the bridge abandon its epoch. A heartbeat holds no event, so
            # one that is not confirmed is only counted.
            if (tracker is not None and h.epoch < tracker.epoch) or self._engine_epoch() != h.epoch:
                M.ignored_heartbeats.inc()
                return
            tracker = self._switch(h.epoch)
        tracker.heartbeat(h.seq)
        M.engine_seq.set(tracker.engine_last)

    def _gate(self, h: WireHeader, frames: list[bytes]) -> SeqTracker | None:
        """The tracker of the event's epoch, following a confirmed new epoch; None if the event was
        dealt with here (a duplicate of a left epoch, or dead-lettered)."""
        tracker = self.tracker
        if tracker is not None and h.epoch == tracker.epoch:
            return tracker
        if tracker is not None and h.epoch < tracker.epoch:
            done = self._closed.get(h.epoch)
            if done is not None and h.seq <= done:
                M.duplicates.inc()  # a stale re-send of a seq that was handed to the producer
                return None
            self._dead_letter(frames, "stale_epoch", f"epoch {h.epoch} is older than the current {tracker.epoch}", h)
            return None
        engine_epoch = self._engine_epoch()
        if engine_epoch != h.epoch:
            said = "no answer" if engine_epoch is None else f"epoch {engine_epoch}"
            self._dead_letter(frames, "unconfirmed_epoch", f"epoch {h.epoch}: the replay service says {said}", h)
            return None
        return self._switch(h.epoch)

    def _switch(self, epoch: int) -> SeqTracker:
        old = self.tracker
        if old is not None:
            log.warning(
                "engine epoch changed %d -> %d (confirmed by the replay service): starting the new epoch at seq 1; "
                "epoch %d ends with seqs up to %d handed over (the engine had said %d)",
                old.epoch,
                epoch,
                old.epoch,
                old.received,
                old.engine_last,
            )
            self._closed[old.epoch] = old.received
            while len(self._closed) > 16:
                del self._closed[min(self._closed)]
            # Early seqs of the old epoch can never be released: the hole below them is gone.
            for _, item in old.take_pending():
                self._dead_letter_out(item, "epoch_closed", f"epoch {old.epoch} ended before the hole below it filled")
        self.tracker = SeqTracker(epoch=epoch)
        self._leases[epoch] = CeilingLease(self.s.ceiling_lease)
        # The new epoch's first checkpoint goes after everything of the old one, in the outbox.
        self._opening = epoch
        self._emit(Out(OPEN, epoch, 0, []))
        M.watermark.set(0)
        return self.tracker


def _check_marker(h: WireHeader, payload: bytes) -> tuple[str, str]:
    """(problem or "", the marker's compact JSON or a description of what came)."""
    if h.key_user_id or h.key_user_id_2:
        return f"marker with keys {h.key_user_id}, {h.key_user_id_2} (want 0, 0)", ""
    try:
        # Bounded: at most MARKER_MAX_BYTES, one level deep, measured before the JSON parser runs.
        doc = parse_marker(payload)
    except WireError as exc:
        return f"marker payload: {exc}", ""
    if not isinstance(doc["sha256"], str):
        return "marker field 'sha256' is not a str", ""
    return "", json.dumps(doc, separators=(",", ":"), ensure_ascii=False)


def _keys(name: str, record: dict[str, object]) -> tuple[object, object]:
    """The partition keys the engine puts in an event's header (``schemas.wire``): a trade's
    taker and maker, any other event's user and 0."""
    if name == "Trade":
        return record.get("taker_user_id"), record.get("maker_user_id")
    return record.get("user_id"), 0
