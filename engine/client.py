"""``EngineClient``: place, cancel, deposit and withdraw through the engine's command gateway."""

from __future__ import annotations

import json
import struct
import uuid
from dataclasses import dataclass
from typing import Any

import zmq

from engine.interfaces import EngineError

__all__ = ["EngineClient", "EngineClientError", "EngineTimeout", "Result", "engine_info"]


class EngineClientError(EngineError):
    """The gateway refused the request as malformed: sending it again is refused again."""

    retriable = False


class EngineTimeout(EngineClientError):
    """The gateway did not answer in time: the engine may be busy or restarting, try again."""

    retriable = True


@dataclass(frozen=True, slots=True)
class Result:
    accepted: bool
    reason: str
    order_id: int
    first_seq: int
    last_seq: int


class EngineClient:
    """One DEALER socket; requests are answered in order. Not thread-safe."""

    def __init__(self, endpoint: str = "tcp://127.0.0.1:5555", timeout_ms: int = 5000) -> None:
        self._ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.IDENTITY, uuid.uuid4().bytes)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.connect(endpoint)
        self._timeout_ms = timeout_ms

    def batch(self, commands: list[dict[str, Any]]) -> list[Result]:
        self._sock.send_multipart([b"CMD", json.dumps(commands).encode()])
        if not self._sock.poll(self._timeout_ms):
            # The reply may still come later and would be mistaken for the next one's.
            self.close()
            raise EngineTimeout(f"no answer from the engine gateway within {self._timeout_ms} ms")
        status, body = self._sock.recv_multipart()
        if status != b"OK":
            raise EngineClientError(body.decode(errors="replace"))
        return [Result(**r) for r in json.loads(body)]

    def _one(self, command: dict[str, Any]) -> Result:
        return self.batch([command])[0]

    def deposit(self, user_id: int, asset: str, amount: int) -> Result:
        return self._one({"type": "deposit", "user_id": user_id, "asset": asset, "amount": amount})

    def withdraw(self, user_id: int, asset: str, amount: int) -> Result:
        return self._one({"type": "withdraw", "user_id": user_id, "asset": asset, "amount": amount})

    def place(
        self,
        user_id: int,
        symbol: str,
        side: str,
        qty: int,
        price: int = 0,
        *,
        order_type: str = "LIMIT",
        time_in_force: str = "GTC",
        quote_budget: int = 0,
        client_order_id: str = "",
        expire_ns: int = 0,
    ) -> Result:
        return self._one(
            {
                "type": "place",
                "user_id": user_id,
                "symbol": symbol,
                "side": side,
                "order_type": order_type,
                "time_in_force": time_in_force,
                "qty": qty,
                "price": price,
                "quote_budget": quote_budget,
                "client_order_id": client_order_id,
                "expire_ns": expire_ns,
            }
        )

    def cancel(self, user_id: int, order_id: int = 0, client_order_id: str = "") -> Result:
        return self._one(
            {"type": "cancel", "user_id": user_id, "order_id": order_id, "client_order_id": client_order_id}
        )

    def close(self) -> None:
        self._sock.close(linger=0)


def engine_info(endpoint: str) -> tuple[int, int] | None:
    """(epoch, last seq) from the engine's replay service (``INFO``), or None when it does not answer in 1 s."""
    sock: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.DEALER)
    sock.connect(endpoint)
    try:
        sock.send_multipart([b"INFO"])
        if not sock.poll(1000):
            return None
        _, body = sock.recv_multipart()
        epoch, last = struct.unpack(">QQ", body)
        return int(epoch), int(last)
    except (zmq.ZMQError, ValueError, struct.error):
        return None
    finally:
        sock.close(linger=0)
