"""Real processes of the pipeline for integration tests: engine, bridge (and later the worker).

Each is started as users start it (``python -m ohs.cli ...``) with its own
ports, journal and topic names, and stopped with a real signal.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

from cassandra import InvalidRequest
from cassandra.cluster import NoHostAvailable
from confluent_kafka import Consumer, KafkaError, TopicPartition

from engine.client import EngineClient, EngineClientError
from engine.journal import command_to_dict
from engine.settings import EngineSettings
from engine.simulator import FlowGenerator
from tests.ports import free_port

NOT_MIGRATED = (InvalidRequest, NoHostAvailable)
"""What a query of a worker's table can raise while the worker is still creating its tables: catch
these, then ask ``not_migrated`` whether that is what happened."""


def not_migrated(exc: Exception) -> bool:
    """The table does not exist yet (InvalidRequest), or the query raced with the CREATE TABLE
    that makes it: Cassandra answers a server error "Unknown CF <table id>", which the driver
    reports as NoHostAvailable (a CI run of 2026-12-06 failed on one). Anything else is real."""
    return isinstance(exc, InvalidRequest) or (isinstance(exc, NoHostAvailable) and "Unknown CF" in str(exc))


@dataclass
class Pipeline:
    """Endpoints, topic names and processes of one test's private pipeline."""

    base_env: dict[str, str]
    workdir: Path
    tag: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Every gateway client handed out, closed by stop_all: a test that fails before closing
        # its client would otherwise leave a socket whose ResourceWarning (an error under
        # filterwarnings) is raised in whichever later test the garbage collector runs in.
        self._clients: list[EngineClient] = []
        self.gateway = f"tcp://127.0.0.1:{free_port()}"
        self.feed = f"tcp://127.0.0.1:{free_port()}"
        self.replay = f"tcp://127.0.0.1:{free_port()}"
        self.topics = {
            "updates": f"orders.updates.{self.tag}",
            "trades": f"orders.trades.{self.tag}",
            "balances": f"balances.updates.{self.tag}",
            "dlq": f"orders.dlq.{self.tag}",
            "checkpoint": f"bridge.watermark.{self.tag}",
        }

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        env = {
            **self.base_env,
            "OHS_ENGINE_JOURNAL_DIR": str(self.workdir / "journal"),
            "OHS_ENGINE_GATEWAY_ENDPOINT": self.gateway,
            "OHS_ENGINE_FEED_ENDPOINT": self.feed,
            "OHS_ENGINE_REPLAY_ENDPOINT": self.replay,
            "OHS_ENGINE_HEARTBEAT_MS": "100",
            "OHS_BRIDGE_FEED_ENDPOINT": self.feed,
            "OHS_BRIDGE_REPLAY_ENDPOINT": self.replay,
            "OHS_BRIDGE_TOPIC_UPDATES": self.topics["updates"],
            "OHS_BRIDGE_TOPIC_TRADES": self.topics["trades"],
            "OHS_BRIDGE_TOPIC_BALANCES": self.topics["balances"],
            "OHS_BRIDGE_TOPIC_DLQ": self.topics["dlq"],
            "OHS_BRIDGE_TOPIC_CHECKPOINT": self.topics["checkpoint"],
            "OHS_BRIDGE_PARTITIONS": "3",
            "OHS_BRIDGE_METRICS_PORT": "0",
            "OHS_BRIDGE_BRIDGE_ID": f"bridge-{self.tag}",
        }
        env.update(extra or {})
        return env

    def start(self, name: str, args: list[str], extra_env: dict[str, str] | None = None) -> None:
        # Each process runs in its own directory (Faust keeps its data dir in its cwd). The child
        # gets its own copy of the log descriptor; ours is closed at once.
        cwd = self.workdir / name
        cwd.mkdir(exist_ok=True)
        with (self.workdir / f"{name}.log").open("ab") as log:
            self.procs[name] = subprocess.Popen(
                [sys.executable, "-m", "ohs.cli", *args], env=self.env(extra_env), stdout=log, stderr=log, cwd=cwd
            )

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        proc = self.procs.pop(name)
        proc.send_signal(sig)
        proc.wait(60)

    def stop_all(self) -> None:
        for client in self._clients:
            client.close()  # idempotent: zmq ignores a second close
        self._clients.clear()
        for name in list(self.procs):
            proc = self.procs[name]
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            del self.procs[name]

    def stacks(self, name: str) -> str:
        """Every thread's stack of a running process (py-spy, a dev dependency): what a process that
        stopped making progress is waiting on, for the message of the test that found it."""
        proc = self.procs.get(name)
        if proc is None or proc.poll() is not None:
            return f"{name} is not running"
        spy = Path(sys.executable).with_name("py-spy")
        try:
            out = subprocess.run([str(spy), "dump", "--pid", str(proc.pid)], capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"py-spy failed: {exc!r}"
        return (out.stdout + out.stderr)[-6000:]

    def log(self, name: str) -> str:
        path = self.workdir / f"{name}.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""

    # ----------------------------------------------------------------- engine
    def engine_info(self) -> tuple[int, int]:
        """(epoch, last seq) from the engine's replay service."""
        import struct

        import zmq

        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.connect(self.replay)
        try:
            sock.send_multipart([b"INFO"])
            if not sock.poll(10_000):
                raise AssertionError("engine replay service did not answer INFO")
            _, body = sock.recv_multipart()
            epoch, last = struct.unpack(">QQ", body)
            return int(epoch), int(last)
        finally:
            sock.close(linger=0)

    def settle(self) -> int:
        """Wait out the flow's GTT orders (they expire within 3 s), return the final last seq."""
        time.sleep(3.5)
        return self.engine_info()[1]

    def client(self) -> EngineClient:
        deadline = time.monotonic() + 30
        while True:
            client = EngineClient(self.gateway, timeout_ms=2000)
            try:
                client.deposit(1, "USD", 1)  # a real command: proves the gateway is serving
                client.close()
                self._clients.append(EngineClient(self.gateway, timeout_ms=60_000))
                return self._clients[-1]
            except EngineClientError:
                client.close()
                if time.monotonic() > deadline:
                    raise AssertionError(f"engine did not answer:\n{self.log('engine')}") from None
                time.sleep(0.2)

    def drive(self, client: EngineClient, commands: int, seed: int, batch: int = 500, users: int = 50) -> int:
        """Send a realistic seeded flow through the gateway; returns the engine's last seq."""
        specs = EngineSettings(_env_file=None).symbol_specs()  # type: ignore[call-arg]
        gen = FlowGenerator(specs, users, seed)
        last = 0
        deposits = [command_to_dict(c) for c in gen.deposits()]
        for i in range(0, len(deposits), batch):
            last = max(last, *(r.last_seq for r in client.batch(deposits[i : i + batch])))
        sent = 0
        while sent < commands:
            cmds = [command_to_dict(replace(gen.next(time.time_ns()), ts_ns=0)) for _ in range(batch)]
            for cmd, result in zip(cmds, client.batch(cmds), strict=True):
                if cmd["type"] == "place" and result.accepted:
                    gen.record(cmd["user_id"], result.order_id)
                last = max(last, result.last_seq)
            sent += batch
        return last


def read_topics(bootstrap: str, topics: list[str], until: callable | None = None, timeout: float = 60.0) -> Iterator:  # type: ignore[valid-type]
    """Every record of ``topics`` from the beginning, until ``until(records)`` or the timeout."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"reader-{uuid.uuid4().hex[:8]}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    consumer.subscribe(topics)
    records = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is None:
                if until is not None and until(records):
                    break
                continue
            if msg.error():
                if msg.error().code() != KafkaError._PARTITION_EOF:
                    raise AssertionError(str(msg.error()))
                continue
            records.append(msg)
            if until is not None and len(records) % 500 == 0 and until(records):
                break
    finally:
        consumer.close()
    return records


def seqs_of(records) -> list[int]:  # type: ignore[no-untyped-def]
    return [int(dict(r.headers())["seq"]) for r in records]


__all__ = ["Pipeline", "TopicPartition", "free_port", "read_topics", "seqs_of"]
