"""What ``streams/faust_adapter.py`` relies on in Faust, mode and aiokafka, checked without a server.

The adapter reaches past Faust's public API (the consumer's drain loop, the transport, the app's
start-up hooks, the consumer's commit, the producer's aiokafka client, the table's store and
changelog, the channel queues). Each group below pins one of those: the private names exist with
the kind and parameters the adapter calls them with (a rename or reshape fails with a message naming
what changed), and, where an in-memory twin is cheap, the adapter's behaviour on top of them.

Real Faust objects are built against ``kafka://127.0.0.1:1`` (nothing listens there and nothing here
connects to it, except ``kafka_reachable``'s refused connection).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import importlib.metadata
import inspect
import re
import tomllib
import types
import weakref
from collections.abc import Callable, Iterator, Mapping
from contextvars import ContextVar
from pathlib import Path
from typing import Any

import aiokafka
import aiokafka.producer.message_accumulator
import faust
import faust.exceptions
import faust.streams
import faust.topics
import faust.transport.conductor
import mode
import pytest
from aiokafka.errors import ConsumerStoppedError, KafkaConnectionError
from aiokafka.structs import RecordMetadata, TopicPartition
from faust.stores import rocksdb as faust_rocksdb
from faust.transport import base as transport_base
from faust.transport import consumer as transport_consumer
from faust.transport.drivers import aiokafka as aiokafka_driver
from faust.types import TP, Message
from mode.utils.queues import ThrowableQueue

from streams import faust_adapter as fa

REPO = Path(__file__).resolve().parents[3]
BROKER = "kafka://127.0.0.1:1"


# --------------------------------------------------------------------------------------------
# helpers


def _shape(fn: Callable[..., Any]) -> list[str]:
    """Parameter names as Python spells them: a bare ``*`` before keyword-only ones, ``*args``, ``**kw``."""
    out: list[str] = []
    star = False
    for p in inspect.signature(fn).parameters.values():
        if p.kind is p.VAR_POSITIONAL:
            out.append("*" + p.name)
            star = True
        elif p.kind is p.VAR_KEYWORD:
            out.append("**" + p.name)
        else:
            if p.kind is p.KEYWORD_ONLY and not star:
                out.append("*")
                star = True
            out.append(p.name)
    return out


def _member(owner: Any, name: str) -> Any:
    where = getattr(owner, "__qualname__", None) or type(owner).__qualname__
    assert hasattr(owner, name), f"{where}.{name} is gone (renamed or removed by an upgrade?)"
    return getattr(owner, name)


def _check_callable(owner: Any, name: str, shape: list[str], *, coroutine: bool) -> None:
    where = getattr(owner, "__qualname__", None) or type(owner).__qualname__
    fn = _member(owner, name)
    assert callable(fn), f"{where}.{name} is no longer callable: {fn!r}"
    is_coro = inspect.iscoroutinefunction(fn) or inspect.isasyncgenfunction(fn)
    assert is_coro == coroutine, (
        f"{where}.{name} is {'no longer' if coroutine else 'now'} async (the adapter "
        f"{'awaits' if coroutine else 'calls'} it)"
    )
    got = _shape(fn)
    assert got == shape, f"{where}.{name} parameters changed: {got}, the adapter expects {shape}"


def _msg(
    topic: str = "updates",
    partition: int = 0,
    offset: int = 0,
    key: bytes | None = b"k",
    value: Any = b"v",
    generation: int | None = 0,
):
    """A message as the consumer fetches it: stamped with the generation it was fetched in (an
    app's ``consumer_generation_id`` starts at 0)."""
    return Message(topic, partition, offset, 0.0, 0, [], key, value, None, generation_id=generation)


class _Ev:
    """The two attributes the adapter reads from an event."""

    def __init__(self, message: Any) -> None:
        self.message = message


def _ev(topic: str = "updates", partition: int = 0, offset: int = 0) -> _Ev:
    return _Ev(_msg(topic, partition, offset))


@contextlib.contextmanager
def _app(tmp_path: Path, **kwargs: Any) -> Iterator[fa.App]:
    """A real adapter App (call inside the running loop); its consumer's thread loop is closed after."""
    app = fa.App(
        "t",
        broker=BROKER,
        datadir=str(tmp_path / "data"),
        key_serializer="raw",
        value_serializer="raw",
        **kwargs,
    )
    # As after the first assignment's recovery: the flow on (Faust starts it suspended).
    app.flow_control.resume()
    try:
        yield app
    finally:
        consumer = app._consumer
        if consumer is not None:
            consumer._thread.thread_loop.close()


def _put(stream: Any, *events: Any) -> None:
    """Deliver events to a stream's channel exactly as Faust's conductor does."""
    for e in events:
        stream.channel.queue.put_nowait_enhanced(e, on_pressure_high=lambda: None, on_pressure_drop=lambda: None)


# --------------------------------------------------------------------------------------------
# the pin


@pytest.mark.parametrize("dist", ["faust-streaming", "mode-streaming", "aiokafka"])
def test_installed_version_is_the_one_pinned_in_pyproject(dist: str) -> None:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    found = [d for d in deps if re.match(rf"{re.escape(dist)}\b", d)]
    assert len(found) == 1, f"expected one {dist} dependency, found {found}"
    m = re.fullmatch(rf"{re.escape(dist)}\s*==\s*([0-9][^\s,;]*)", found[0].strip())
    assert m, f"{dist} must be pinned to one version (==X.Y.Z), pyproject says {found[0]!r}"
    installed = importlib.metadata.version(dist)
    assert installed == m.group(1), (
        f"{dist} {installed} is installed but pyproject pins {m.group(1)}: rerun this test against "
        "the pinned version, or re-check the adapter against the new one and move the pin"
    )


# --------------------------------------------------------------------------------------------
# names and signatures the adapter uses


SIGNATURES = [
    # the drain loop FastConsumer replaces, and what it calls
    (transport_consumer.Consumer, "_drain_messages", ["self", "fetcher"], True),
    (transport_consumer.Consumer, "_add_gap", ["self", "tp", "offset_from", "offset_to"], True),
    (aiokafka_driver.Consumer, "getmany", ["self", "timeout"], True),
    (mode.Service, "sleep", ["self", "n"], True),
    (mode.Service, "wait_first", ["self", "*coros", "timeout"], True),
    (faust.transport.conductor.Conductor, "acks_enabled_for", ["self", "topic"], False),
    # commits, assignment
    (transport_consumer.Consumer, "_commit_offsets", ["self", "offsets", "start_new_transaction"], True),
    (aiokafka_driver.Consumer, "assignment", ["self"], False),
    # the transport and the app's start-up
    (transport_base.Transport, "__init__", ["self", "url", "app", "loop"], False),
    (transport_base.Transport, "create_consumer", ["self", "callback", "**kwargs"], False),
    (faust.App, "_new_transport", ["self"], False),
    (faust.App, "on_first_start", ["self"], True),
    (mode.Service, "_actually_start", ["self"], True),
    (mode.Service, "on_init_dependencies", ["self"], False),
    # the producer and its aiokafka client
    (aiokafka_driver.Producer, "_ensure_producer", ["self"], False),
    (aiokafka.AIOKafkaProducer, "create_batch", ["self"], False),
    (aiokafka.AIOKafkaProducer, "send_batch", ["self", "batch", "topic", "*", "partition"], True),
    (
        aiokafka.producer.message_accumulator.BatchBuilder,
        "append",
        ["self", "*", "timestamp", "key", "value", "headers"],
        False,
    ),
    (aiokafka.AIOKafkaClient, "bootstrap", ["self"], True),
    (aiokafka.AIOKafkaClient, "close", ["self"], True),
    # the table's store
    (faust_rocksdb.Store, "set_persisted_offset", ["self", "tp", "offset"], False),
    (faust_rocksdb.Store, "persisted_offset", ["self", "tp"], False),
    (faust_rocksdb.Store, "__getitem__", ["self", "key"], False),
    (faust_rocksdb.Store, "__setitem__", ["self", "key", "value"], False),
    (faust.topics.Topic, "get_topic_name", ["self"], False),
    # channel queues
    (ThrowableQueue, "get", ["self"], True),
    (ThrowableQueue, "get_nowait", ["self"], False),
    (ThrowableQueue, "empty", ["self"], False),
    (ThrowableQueue, "put_nowait_enhanced", ["self", "value", "*", "on_pressure_high", "on_pressure_drop"], False),
    # RawSchema's overrides match the methods Faust calls
    (faust.Schema, "loads_key", ["self", "app", "message", "*", "loads", "serializer"], False),
    (faust.Schema, "loads_value", ["self", "app", "message", "*", "loads", "serializer"], False),
    (fa.RawSchema, "loads_key", ["self", "app", "message", "*", "loads", "serializer"], False),
    (fa.RawSchema, "loads_value", ["self", "app", "message", "*", "loads", "serializer"], False),
    (fa.FastConsumer, "_drain_messages", ["self", "fetcher"], True),
]


@pytest.mark.parametrize(
    ("owner", "name", "shape", "coroutine"),
    SIGNATURES,
    ids=[f"{o.__qualname__}.{n}" for o, n, _, _ in SIGNATURES],
)
def test_signature(owner: Any, name: str, shape: list[str], coroutine: bool) -> None:
    _check_callable(owner, name, shape, coroutine=coroutine)


def test_aiokafka_client_takes_the_arguments_kafka_reachable_passes() -> None:
    params = inspect.signature(aiokafka.AIOKafkaClient.__init__).parameters
    for name in ("bootstrap_servers", "request_timeout_ms"):
        assert name in params, f"AIOKafkaClient() no longer takes {name}="
        kind = params[name].kind
        assert kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD), (
            f"AIOKafkaClient({name}=) is now {kind.description}"
        )


def test_current_event_is_a_context_var_faust_reads_through_a_weakref() -> None:
    assert isinstance(faust.streams._current_event, ContextVar), "faust.streams._current_event is no ContextVar"
    assert fa._current_event is faust.streams._current_event
    # faust.streams.current_event() is what the RocksDB store calls: it dereferences the weakref.
    assert faust_rocksdb.current_event is faust.streams.current_event, (
        "faust.stores.rocksdb no longer files values by faust.streams.current_event"
    )
    ev = _ev(partition=3)
    fa.current_event(ev)
    try:
        assert isinstance(faust.streams._current_event.get(), weakref.ref)
        assert faust.streams.current_event() is ev
    finally:
        fa.current_event(None)
    assert faust.streams.current_event() is None


def test_aiokafka_transport_and_consumer_are_what_the_adapter_subclasses() -> None:
    assert inspect.isclass(aiokafka_driver.Consumer) and inspect.isclass(aiokafka_driver.Transport)
    assert issubclass(aiokafka_driver.Transport, transport_base.Transport)
    assert aiokafka_driver.Transport.Consumer is aiokafka_driver.Consumer, (
        "faust's aiokafka Transport no longer builds its consumer from the Consumer class attribute"
    )
    assert issubclass(aiokafka_driver.Consumer, transport_consumer.Consumer)
    assert fa._FastTransport.Consumer is fa.FastConsumer
    assert fa.FastConsumer.__mro__[1] is aiokafka_driver.Consumer
    errors = aiokafka_driver.Consumer.consumer_stopped_errors
    assert isinstance(errors, tuple) and ConsumerStoppedError in errors, (
        f"Consumer.consumer_stopped_errors changed: {errors!r}"
    )
    assert all(isinstance(e, type) and issubclass(e, BaseException) for e in errors)
    assert isinstance(inspect.getattr_static(transport_consumer.Consumer, "unacked"), property), (
        "Consumer.unacked is no longer a property"
    )
    assert isinstance(inspect.getattr_static(mode.Service, "should_stop"), property)


DRAIN_MESSAGES_SHA256 = "44a2500309e83c630493f6828af50166ec8d96a0b3e4fb2bab735f704ae93417"


def test_faust_drain_loop_is_the_one_fast_consumer_was_derived_from() -> None:
    """FastConsumer._drain_messages is a rewrite of Faust's: any change there (a new step per message,
    a renamed attribute) must be carried over by hand, so a different source text fails here."""
    src = inspect.getsource(transport_consumer.Consumer._drain_messages)
    digest = hashlib.sha256(src.encode()).hexdigest()
    assert digest == DRAIN_MESSAGES_SHA256, (
        "faust.transport.consumer.Consumer._drain_messages changed: compare it with "
        "FastConsumer._drain_messages, carry the change over, then update DRAIN_MESSAGES_SHA256 to " + digest
    )
    for name in ("_stopped", "_read_offset", "_add_gap", "suspend_flow", "acks_enabled_for", "callback", "getmany"):
        assert name in src, f"Faust's drain loop no longer uses {name}"


def test_faust_fetcher_drives_the_consumers_drain_loop() -> None:
    task = transport_consumer.Fetcher._fetcher
    src = inspect.getsource(getattr(task, "fun", task))
    assert "_drain_messages(self)" in src, "Fetcher no longer calls consumer._drain_messages(fetcher)"


def test_app_start_is_modes_and_app_stream_iterates_its_channel() -> None:
    assert issubclass(faust.App, mode.Service)
    assert faust.App._actually_start is mode.Service._actually_start, (
        "faust.App overrides Service._actually_start: re-check that on_first_start still runs before its services"
    )
    assert "aiter(channel)" in inspect.getsource(faust.App.stream), (
        "App.stream no longer wraps its channel in an iterator (whose queue the conductor fills)"
    )


def test_faust_commit_flushes_the_producer_and_drops_revoked_partitions() -> None:
    src = inspect.getsource(transport_consumer.Consumer._commit_offsets)
    for needle in ("self.assignment()", "self.app.producer.flush()", "self._commit("):
        assert needle in src, f"Consumer._commit_offsets no longer does {needle}"
    assert src.index("self.app.producer.flush()") < src.index("self._commit("), (
        "the flush no longer precedes the commit"
    )


# --------------------------------------------------------------------------------------------
# a real FastConsumer: the attributes its drain loop reads


@pytest.mark.parametrize("wait", [None, 50])
def test_the_worker_consumer_fetches_with_the_apps_fetch_wait(tmp_path: Path, wait: int | None) -> None:
    """Faust builds its worker consumer with a fixed 1,500 ms fetch wait; the adapter's thread
    replaces it with ``App.fetch_max_wait_ms``, and aiokafka must still read that attribute when
    the consumer starts (it hands it to its fetcher): otherwise the setting silently does nothing."""
    import aiokafka

    start_source = inspect.getsource(aiokafka.AIOKafkaConsumer.start).replace(" ", "")
    assert "fetch_max_wait_ms=self._fetch_max_wait_ms" in start_source, "aiokafka no longer starts its fetcher so"

    async def run() -> None:
        with _app(tmp_path) as app:
            app.fetch_max_wait_ms = wait
            thread = app.consumer._thread
            assert isinstance(thread, fa._FastConsumerThread), f"the consumer thread is a {type(thread)}"
            created = thread._create_worker_consumer(app.transport)
            assert isinstance(created, aiokafka.AIOKafkaConsumer)
            assert created._fetch_max_wait_ms == (1500 if wait is None else wait)
            await created.stop()

    asyncio.run(run())


def test_real_consumer_has_what_the_drain_loop_reads(tmp_path: Path) -> None:
    async def run() -> None:
        with _app(tmp_path) as app:
            assert isinstance(app.transport, fa._FastTransport), "App._new_transport is no longer used"
            assert app.transport.url == app.conf.broker_consumer
            consumer = app.consumer
            assert isinstance(consumer, fa.FastConsumer), f"the app's consumer is a {type(consumer)}"
            assert consumer.transport.app is app and consumer.app is app
            assert isinstance(app.should_stop, bool)
            assert callable(consumer.callback)
            for event_name in ("_stopped", "suspend_flow"):
                event = _member(consumer, event_name)
                assert callable(event.is_set) and event.is_set() is False, f"consumer.{event_name} is no event"
            assert inspect.iscoroutinefunction(type(consumer.suspend_flow).wait)
            tp = TP("updates", 0)
            assert isinstance(consumer._read_offset, Mapping)
            assert consumer._read_offset[tp] is None, "consumer._read_offset no longer defaults to None"
            consumer._read_offset[tp] = 4
            assert consumer._read_offset[tp] == 4
            assert consumer.should_stop is False
            assert callable(app.topics.acks_enabled_for)
            fetcher = transport_consumer.Fetcher(app)
            assert callable(fetcher._stopped.is_set) and fetcher._stopped.is_set() is False
            unacked = consumer.unacked
            m = _msg()
            unacked.add(m)
            assert m in consumer.unacked, "consumer.unacked.add no longer registers a message"
            # Faust's own stream iterator registers its events the same way.
            assert "consumer.unacked" in inspect.getsource(faust.Stream._py_aiter)
            # The producer and the consumer are the app's dependencies: mode starts them after on_first_start.
            deps = list(app.on_init_dependencies())
            assert app.producer in deps and consumer in deps

    asyncio.run(run())


class _DrainRig:
    """A real FastConsumer whose fetch, callback and gap bookkeeping are recorded."""

    def __init__(self, consumer: Any, batches: list[list[tuple[TP, Any]]], acks: bool) -> None:
        self.consumer = consumer
        self.delivered: list[int] = []
        self.gaps: list[tuple[TP, int, int]] = []
        self.waited: list[int] = []
        self.timeouts: list[float] = []
        self.fetcher = types.SimpleNamespace(_stopped=asyncio.Event())

        async def getmany(timeout: float):  # noqa: ASYNC109 - Faust's parameter name
            self.timeouts.append(timeout)
            for item in batches.pop(0):
                yield item
            if not batches:
                consumer._stopped.set()

        async def callback(message: Any) -> None:
            self.delivered.append(message.offset)

        async def add_gap(tp: TP, offset_from: int, offset_to: int) -> None:
            self.gaps.append((tp, offset_from, offset_to))

        async def wait_first(*coros: Any) -> None:
            self.waited.append(len(coros))
            await coros[0]
            for c in coros[1:]:
                c.close()

        consumer.getmany = getmany
        consumer.callback = callback
        consumer._add_gap = add_gap
        consumer.wait_first = wait_first
        consumer.app.topics.acks_enabled_for = lambda topic: acks


@pytest.mark.parametrize("acks", [True, False])
def test_fast_drain_loop_delivers_every_fetched_message_and_records_read_offsets(tmp_path: Path, acks: bool) -> None:
    """Even a message below the read offset (a re-fetch after a seek): Faust would drop it as
    already read, which lost records when a stale fetch had moved that offset past a seek's
    target; ``Contiguity`` decides what is taken. No gap bookkeeping: commits never come from acks."""

    async def run() -> None:
        with _app(tmp_path) as app:
            tp, other = TP("updates", 0), TP("updates", 1)
            batches = [
                [(tp, _msg(offset=5)), (tp, _msg(offset=6)), (other, _msg(partition=1, offset=0))],
                [(tp, _msg(offset=9)), (tp, _msg(offset=4)), (tp, _msg(offset=10))],
            ]
            rig = _DrainRig(app.consumer, batches, acks)
            await asyncio.wait_for(rig.consumer._drain_messages(rig.fetcher), 5)
            assert rig.delivered == [5, 6, 0, 9, 4, 10]
            assert rig.gaps == []
            assert rig.consumer._read_offset[tp] == 10 and rig.consumer._read_offset[other] == 0
            assert rig.waited == [], "no rebalance under way: messages must not be raced against it"
            assert rig.timeouts == [1.0, 1.0]

    asyncio.run(run())


def test_fast_drain_loop_takes_fausts_racing_path_while_the_flow_is_suspended(tmp_path: Path) -> None:
    async def run() -> None:
        with _app(tmp_path) as app:
            tp = TP("updates", 0)
            rig = _DrainRig(app.consumer, [[(tp, _msg(offset=1)), (tp, _msg(offset=2))]], acks=False)
            rig.consumer.suspend_flow.set()
            await asyncio.wait_for(rig.consumer._drain_messages(rig.fetcher), 5)
            assert rig.waited == [2, 2] and rig.delivered == [1, 2]

    asyncio.run(run())


def test_fast_drain_loop_records_no_read_offset_for_a_message_delivered_across_a_rebalance(tmp_path: Path) -> None:
    """The conductor's put waits while a stream's queue is full; a rebalance that completes
    meanwhile seeks the consumer back to the committed offsets. Recording the late message's
    offset as read then would drop every record between the two as already read (the CI run of
    2026-12-06 lost 2,687 updates so): the loop leaves the read offset to the seek and drops the
    rest of that stale fetch."""

    async def run() -> None:
        with _app(tmp_path) as app:
            tp = TP("updates", 0)
            stale = [(tp, _msg(offset=o)) for o in (10, 11, 12)]
            fresh = [(tp, _msg(offset=o, generation=1)) for o in (5, 6)]
            rig = _DrainRig(app.consumer, [stale, fresh], acks=False)
            deliver = rig.consumer.callback

            async def callback(message: Any) -> None:
                await deliver(message)
                if message.offset == 11:  # the put waited out a rebalance, which sought to offset 5
                    app.consumer_generation_id = 1
                    rig.consumer._read_offset[tp] = 5

            rig.consumer.callback = callback
            await asyncio.wait_for(rig.consumer._drain_messages(rig.fetcher), 5)
            assert rig.delivered == [10, 11, 5, 6], "the stale fetch must stop at the rebalance, the re-fetch go on"
            assert rig.consumer._read_offset[tp] == 6, "the late delivery must not have recorded offset 11"

    asyncio.run(run())


@pytest.mark.parametrize("error", [ConsumerStoppedError, asyncio.CancelledError])
def test_fast_drain_loop_ends_quietly_only_when_the_app_is_stopping(tmp_path: Path, error: type) -> None:
    async def run() -> None:
        with _app(tmp_path) as app:
            consumer = app.consumer
            fetcher = types.SimpleNamespace(_stopped=asyncio.Event())

            async def getmany(timeout: float):  # noqa: ASYNC109 - Faust's parameter name
                raise error()
                yield  # an async generator, as the real one

            consumer.getmany = getmany
            consumer.transport = types.SimpleNamespace(app=types.SimpleNamespace(should_stop=False))
            with pytest.raises(error):
                await consumer._drain_messages(fetcher)
            consumer.transport = types.SimpleNamespace(app=types.SimpleNamespace(should_stop=True))
            await consumer._drain_messages(fetcher)  # returns

    asyncio.run(run())


# --------------------------------------------------------------------------------------------
# App: the transport and before_start


def test_app_builds_without_a_server_and_awaits_before_start_first(tmp_path: Path) -> None:
    async def run() -> None:
        app = fa.App("t", broker=BROKER, datadir=str(tmp_path / "data"))
        calls: list[bool] = []

        async def before_start() -> None:
            await asyncio.sleep(0)
            calls.append(app.conf.datadir.exists())

        app.before_start = before_start
        await app.on_first_start()
        assert calls == [False], "before_start must be awaited once, before Faust's own on_first_start"
        assert app.conf.datadir.exists() and app.conf.tabledir.exists(), "Faust's on_first_start no longer ran"

    asyncio.run(run())


def test_app_without_before_start_starts_as_faust_does(tmp_path: Path) -> None:
    async def run() -> None:
        app = fa.App("t", broker=BROKER, datadir=str(tmp_path / "data"))
        assert app.before_start is None
        await app.on_first_start()
        assert app.conf.datadir.exists()

    asyncio.run(run())


def test_a_failing_before_start_stops_the_start(tmp_path: Path) -> None:
    async def run() -> None:
        app = fa.App("t", broker=BROKER, datadir=str(tmp_path / "data"))

        async def before_start() -> None:
            raise KafkaConnectionError("down")

        app.before_start = before_start
        with pytest.raises(KafkaConnectionError):
            await app.on_first_start()
        assert not app.conf.datadir.exists()

    asyncio.run(run())


def test_mode_awaits_on_first_start_before_it_starts_the_dependencies() -> None:
    """What lets before_start wait for Kafka: mode starts a service's dependencies (Faust's producer,
    consumer, tables) only once on_first_start has returned."""
    events: list[str] = []

    class Dependency(mode.Service):
        async def on_start(self) -> None:
            events.append("dependency started")

    class Parent(mode.Service):
        def __init__(self) -> None:
            self.dependency = Dependency()
            super().__init__()

        def on_init_dependencies(self) -> list[mode.Service]:
            return [self.dependency]

        async def on_first_start(self) -> None:
            events.append("on_first_start entered")
            await asyncio.sleep(0.02)  # the broker wait
            events.append("on_first_start returned")

        async def on_start(self) -> None:
            events.append("parent on_start")

    async def run() -> None:
        parent = Parent()
        await parent.start()
        await parent.stop()

    asyncio.run(run())
    assert events == ["on_first_start entered", "on_first_start returned", "parent on_start", "dependency started"]


# --------------------------------------------------------------------------------------------
# kafka_reachable


def test_kafka_reachable_raises_when_no_broker_answers() -> None:
    async def run() -> None:
        await fa.kafka_reachable("127.0.0.1:1", timeout_s=5.0)

    with pytest.raises(KafkaConnectionError):
        asyncio.run(run())


# --------------------------------------------------------------------------------------------
# take_available / take_queued on a real stream's channel queue


def test_stream_channel_queue_is_the_queue_the_adapter_reads(tmp_path: Path) -> None:
    async def run() -> None:
        with _app(tmp_path) as app:
            stream = app.stream(app.channel())
            queue = stream.channel.queue
            assert isinstance(queue, ThrowableQueue), f"stream.channel.queue is a {type(queue)}"
            assert stream.channel.is_iterator and stream.channel.queue is queue
            assert stream.app is app

    asyncio.run(run())


def test_take_available_waits_for_one_then_takes_what_is_queued(tmp_path: Path) -> None:
    async def run() -> None:
        with _app(tmp_path) as app:
            stream = app.stream(app.channel())
            task = asyncio.get_running_loop().create_task(fa.take_available(stream, 3))
            await asyncio.sleep(0.01)
            assert not task.done(), "take_available must wait for a first event"
            events = [faust.Event(app, b"k", b"v", [], _msg(offset=i)) for i in range(5)]
            _put(stream, *events)
            batch = await asyncio.wait_for(task, 5)
            assert batch == events[:3]
            assert {e.message for e in batch} <= set(app.consumer.unacked)
            assert events[3].message not in app.consumer.unacked
            assert await fa.take_available(stream, 10) == events[3:], "the rest stays queued for the next batch"

    asyncio.run(run())


def test_take_available_and_take_queued_skip_what_was_fetched_before_a_rebalance(tmp_path: Path) -> None:
    """An event fetched in an earlier generation (or taken while the flow is suspended) is fetched
    again after the rebalance's seek, in order: taken now it would be processed ahead of the
    records before it. Faust's own stream iterator skips it the same way."""

    async def run() -> None:
        with _app(tmp_path) as app:
            app.consumer_generation_id = 2
            stream = app.stream(app.channel())
            old = [faust.Event(app, b"k", b"v", [], _msg(offset=i, generation=1)) for i in range(3)]
            new = [faust.Event(app, b"k", b"v", [], _msg(offset=i, generation=2)) for i in range(2)]
            left_out: list[Any] = []
            _put(stream, old[0], new[0], old[1])
            assert await asyncio.wait_for(fa.take_available(stream, 10, skipped=left_out.append), 5) == [new[0]]
            _put(stream, old[2], new[1])
            assert fa.take_queued(stream, 10, left_out.append) == [new[1]]
            assert left_out == [old[0].message, old[1].message, old[2].message], "each one left out is reported"
            assert not {e.message for e in old} & set(app.consumer.unacked), "a skipped event is never awaited"
            app.flow_control.suspend()  # a rebalance under way: even a current event waits for its re-fetch
            _put(stream, faust.Event(app, b"k", b"v", [], _msg(offset=9, generation=2)))
            assert fa.take_queued(stream, 10) == []
            task = asyncio.get_running_loop().create_task(fa.take_available(stream, 10))
            await asyncio.sleep(0.01)
            assert not task.done()
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    asyncio.run(run())


@pytest.mark.parametrize("callback", ["kept", "lost"])
def test_a_partition_a_full_buffer_left_out_is_fetched_again_once_the_queue_is_empty(
    tmp_path: Path, callback: str
) -> None:
    """Faust's conductor puts a whole fetch at once; a put over the queue's high mark removes the
    partition from the fetch set, and only the queue's get() adds it back. Here the reader already
    waits in get() and a rebalance clears the queue before it runs: nothing is queued to wake it,
    so nothing of the partition was ever fetched again (the worker then waits forever with the
    partition lagging). ``kept``: the queue still holds Faust's pressure-drop callback; ``lost``:
    it does not (the adapter must not depend on it)."""

    async def run() -> None:
        with _app(tmp_path, stream_buffer_maxsize=8) as app:
            stream = app.stream(app.topic("updates"))
            assert set(stream.channel.topics) == {"updates"}, "an agent's stream channel no longer names its topics"
            queue, consumer = stream.channel.queue, app.consumer
            tps = {TP("updates", 0), TP("updates", 1)}
            consumer.assignment = lambda: frozenset(tps)  # type: ignore[method-assign]
            consumer._set_active_tps(tps)
            full = TP("updates", 1)
            take = asyncio.get_running_loop().create_task(fa.take_available(stream, 100, idle_s=0.05))
            await asyncio.sleep(0.01)  # the reader waits in get()
            for i in range(queue.pressure_high_size + 1):
                queue.put_nowait_enhanced(
                    faust.Event(app, b"k", b"v", [], _msg(partition=1, offset=i, generation=-1)),
                    on_pressure_high=lambda: consumer.on_buffer_full(full),
                    on_pressure_drop=lambda: consumer.on_buffer_drop(full),
                )
            queue.clear()  # the rebalance: flow control clears the queue before the reader runs
            if callback == "lost":
                queue._pending_pressure_drop_callbacks.clear()
            assert fa.fetch_state(app) == {"updates:1": "buffer_full"}
            await asyncio.sleep(0.5)
            assert fa.fetch_state(app) == {}, "the partition is still left out of fetching"
            assert not take.done()
            _put(stream, faust.Event(app, b"k", b"v", [], _msg(partition=1, offset=0)))
            assert len(await asyncio.wait_for(take, 5)) == 1

    asyncio.run(run())


def test_resume_drained_leaves_a_partition_out_while_its_queue_holds_records(tmp_path: Path) -> None:
    async def run() -> None:
        with _app(tmp_path) as app:
            stream = app.stream(app.topic("updates"))
            consumer = app.consumer
            tp = TP("updates", 1)
            consumer.assignment = lambda: frozenset({tp})  # type: ignore[method-assign]
            consumer._set_active_tps({tp})
            consumer.on_buffer_full(tp)
            _put(stream, faust.Event(app, b"k", b"v", [], _msg(partition=1)))
            assert fa.resume_drained(stream) == []
            assert fa.fetch_state(app) == {"updates:1": "buffer_full"}
            fa.take_queued(stream, 10)
            assert fa.resume_drained(stream) == [tp]
            assert fa.fetch_state(app) == {}

    asyncio.run(run())


def test_take_available_raises_what_the_channel_throws(tmp_path: Path) -> None:
    async def run() -> None:
        with _app(tmp_path) as app:
            stream = app.stream(app.channel())
            stream.channel.queue._throw(StopAsyncIteration())
            with pytest.raises(StopAsyncIteration):
                await fa.take_available(stream, 10)

    asyncio.run(run())


def test_take_queued_takes_only_what_is_queued_without_waiting(tmp_path: Path) -> None:
    async def run() -> None:
        with _app(tmp_path) as app:
            stream = app.stream(app.channel())
            assert fa.take_queued(stream, 10) == []
            events = [faust.Event(app, b"k", b"v", [], _msg(offset=i)) for i in range(4)]
            _put(stream, *events)
            assert fa.take_queued(stream, 3) == events[:3]
            assert fa.take_queued(stream, 0) == []
            assert fa.take_queued(stream, 3) == events[3:]
            assert {e.message for e in events} <= set(app.consumer.unacked)

    asyncio.run(run())


# --------------------------------------------------------------------------------------------
# RawSchema, assignment, batch_offsets


def test_raw_schema_decodes_to_the_received_bytes(tmp_path: Path) -> None:
    async def run() -> None:
        app = fa.App("t", broker=BROKER, datadir=str(tmp_path / "data"))  # JSON serializers by default
        message = _msg(key=b"\xffnot json", value=b"\x00\x01")
        event = await fa.RawSchema().decode(app, message, propagate=True)
        assert event.key == b"\xffnot json" and event.value == b"\x00\x01" and event.message is message

    asyncio.run(run())


def test_assignment_is_a_copy_of_the_consumers() -> None:
    owned = {TP("updates", 0), TP("updates", 2)}
    app = types.SimpleNamespace(consumer=types.SimpleNamespace(assignment=lambda: frozenset(owned)))
    got = fa.assignment(app)
    assert got == owned and isinstance(got, set)
    got.add(TP("updates", 9))
    assert fa.assignment(app) == owned


def test_batch_offsets_is_one_past_the_highest_offset_per_partition() -> None:
    a, b = TP("updates", 0), TP("updates", 1)
    events = [_ev(partition=0, offset=7), _ev(partition=1, offset=3), _ev(partition=0, offset=5)]
    events.append(_ev(partition=0, offset=9))
    assert fa.batch_offsets(events) == {a: 10, b: 4}
    assert fa.batch_offsets([_ev("other", 0, 0)]) == {TP("other", 0): 1}
    assert fa.batch_offsets([]) == {}


# --------------------------------------------------------------------------------------------
# commit_offsets against Faust's real _commit_offsets


def test_commit_offsets_flushes_then_commits_the_owned_partitions(tmp_path: Path) -> None:
    async def run() -> None:
        with _app(tmp_path) as app:
            consumer = app.consumer
            owned, revoked = TP("updates", 0), TP("updates", 1)
            log: list[Any] = []

            async def flush() -> None:
                log.append("flush")

            async def commit(offsets: Mapping[TP, int]) -> bool:
                log.append(dict(offsets))
                return True

            consumer.assignment = lambda: {owned}
            consumer._commit = commit
            app.producer.flush = flush
            assert await fa.commit_offsets(app, {owned: 11, revoked: 4}) is True
            assert log == ["flush", {owned: 11}]
            log.clear()
            assert await fa.commit_offsets(app, {revoked: 5}) is False, "nothing owned: nothing committed"
            assert log == []

    asyncio.run(run())


# --------------------------------------------------------------------------------------------
# Committer


class _CommitApp:
    """An app whose consumer records ``_commit_offsets`` calls; ``failures`` of them raise first."""

    def __init__(self, failures: int = 0) -> None:
        self.commits: list[dict[Any, int]] = []
        self.failures = failures
        outer = self

        class _Consumer:
            async def _commit_offsets(self, offsets: Mapping[Any, int], start_new_transaction: bool = True) -> bool:
                if outer.failures:
                    outer.failures -= 1
                    raise RuntimeError("broker away")
                outer.commits.append(dict(offsets))
                return True

        self.consumer = _Consumer()


async def _settle(ticks: int = 20) -> None:
    for _ in range(ticks):
        await asyncio.sleep(0)


def test_committer_commits_only_after_the_deliveries_resolve() -> None:
    async def run() -> None:
        app, commits = _CommitApp(), []
        committer = fa.Committer(app, on_commit=lambda: commits.append(len(app.commits)))
        loop = asyncio.get_running_loop()
        first, second = loop.create_future(), loop.create_future()
        committer.request({TP("u", 0): 5}, [first, second])
        await _settle()
        assert app.commits == []
        first.set_result(None)
        await _settle()
        assert app.commits == [], "one delivery still pending: no commit yet"
        second.set_result(None)
        await _settle()
        assert app.commits == [{TP("u", 0): 5}] and commits == [1]
        committer._task.cancel()

    asyncio.run(run())


def test_committer_merges_pending_requests_keeping_the_highest_offset() -> None:
    async def run() -> None:
        app = _CommitApp()
        committer = fa.Committer(app)
        a, b = TP("u", 0), TP("u", 1)
        committer.request({a: 5})
        committer.request({a: 3, b: 2})  # before the task ran: merged, a stays at 5
        await _settle()
        assert app.commits == [{a: 5, b: 2}]
        committer.request({a: 4})
        await _settle()
        assert app.commits[-1] == {a: 4}, "each commit carries the requests made since the last one"
        committer.request({})
        await _settle()
        assert len(app.commits) == 2, "an empty request commits nothing"
        committer._task.cancel()

    asyncio.run(run())


def test_committer_retries_a_failed_commit_with_newer_offsets_merged() -> None:
    async def run() -> None:
        app, called = _CommitApp(failures=1), []
        committer = fa.Committer(app, on_commit=lambda: called.append(True), retry_s=0.05)
        a, b = TP("u", 0), TP("u", 1)
        committer.request({a: 5, b: 1})
        await _settle()
        assert app.commits == [] and called == [] and app.failures == 0
        committer.request({a: 7})
        await asyncio.sleep(0.2)
        assert app.commits == [{a: 7, b: 1}] and called == [True]
        assert not committer._task.done(), "a failed commit must not end the committer"
        committer._task.cancel()

    asyncio.run(run())


def test_committer_retries_a_failed_commit_by_itself_after_the_pause() -> None:
    async def run() -> None:
        app = _CommitApp(failures=2)
        committer = fa.Committer(app, retry_s=0.02)
        committer.request({TP("u", 0): 3})
        await asyncio.sleep(0.3)  # no further request: the committer retries on its own
        assert app.failures == 0 and app.commits == [{TP("u", 0): 3}]
        assert not committer._task.done(), "a failed commit must not end the committer"
        committer._task.cancel()

    asyncio.run(run())


def test_committer_exits_without_committing_when_a_delivery_failed(monkeypatch: pytest.MonkeyPatch) -> None:
    class Exited(BaseException):
        pass

    codes: list[int] = []

    def fake_exit(code: int) -> None:
        codes.append(code)
        raise Exited

    monkeypatch.setattr(fa.os, "_exit", fake_exit)

    async def run() -> None:
        app = _CommitApp()
        committer = fa.Committer(app)
        failed = asyncio.get_running_loop().create_future()
        failed.set_exception(aiokafka.errors.KafkaTimeoutError())
        committer.request({TP("u", 0): 5}, [failed])
        with pytest.raises(Exited):
            await asyncio.wait_for(committer._task, 5)
        assert app.commits == []

    asyncio.run(run())
    assert codes == [75]


# --------------------------------------------------------------------------------------------
# TableWriter on a real RocksDB table, its changelog sent to a recording producer


class _Producer:
    """aiokafka's real batches; send_batch recorded, its futures resolved by the test."""

    def __init__(self, real: aiokafka.AIOKafkaProducer) -> None:
        self.real = real
        self.sent: list[tuple[str, int, int]] = []
        self.futures: list[asyncio.Future[Any]] = []

    def create_batch(self) -> Any:
        return self.real.create_batch()

    async def send_batch(self, batch: Any, topic: str, *, partition: int) -> asyncio.Future[Any]:
        self.sent.append((topic, partition, batch.record_count()))
        fut = asyncio.get_running_loop().create_future()
        self.futures.append(fut)
        return fut


def _meta(topic: str, partition: int, offset: int) -> RecordMetadata:
    """What aiokafka resolves a batch's future with; the writer reads topic_partition and offset."""
    blank = RecordMetadata(*[None] * len(RecordMetadata._fields))
    return blank._replace(
        topic=topic, partition=partition, topic_partition=TopicPartition(topic, partition), offset=offset
    )


@contextlib.contextmanager
def _table(tmp_path: Path, use_partitioner: bool = True) -> Iterator[tuple[fa.App, Any]]:
    with _app(tmp_path, store="rocksdb://") as app:
        table = app.Table(
            "users", default=None, partitions=4, key_type=bytes, value_type=bytes, use_partitioner=use_partitioner
        )
        yield app, table


def test_table_has_the_store_and_changelog_the_writer_uses(tmp_path: Path) -> None:
    async def run() -> None:
        with _table(tmp_path) as (app, table):
            assert isinstance(table.data, faust_rocksdb.Store), f"table.data is a {type(table.data)}"
            assert table.changelog_topic.get_topic_name() == "t-users-changelog"
            with pytest.raises(faust.exceptions.NotReady):
                app.producer._ensure_producer()  # not started: no aiokafka producer yet
            app.producer._producer = sentinel = object()
            assert app.producer._ensure_producer() is sentinel
            fields = RecordMetadata._fields
            assert "topic_partition" in fields and "offset" in fields, f"RecordMetadata fields: {fields}"

    asyncio.run(run())


def test_table_writer_stores_in_the_events_partition_and_sends_one_batch_per_partition(tmp_path: Path) -> None:
    async def run() -> None:
        with _table(tmp_path) as (app, table):
            real = aiokafka.AIOKafkaProducer(bootstrap_servers="127.0.0.1:1")
            try:
                producer = _Producer(real)
                app.producer._producer = producer
                writer = fa.TableWriter(app, table)
                e2, e3 = _ev(partition=2, offset=10), _ev(partition=3, offset=11)
                futures = await writer.write([(e2, b"a", b"A"), (e3, b"b", b"B"), (e2, b"c", b"C")])
                assert faust.streams.current_event() is None
                topic = "t-users-changelog"
                assert producer.sent == [(topic, 2, 2), (topic, 3, 1)]
                assert futures == producer.futures
                store = table.data
                assert store._dbs[2].get(b"a") == b"A" and store._dbs[2].get(b"c") == b"C"
                assert store._dbs[3].get(b"b") == b"B" and store._dbs[2].get(b"b") is None
                assert writer.read(e2, b"a") == b"A" and writer.read(e3, b"b") == b"B"
                assert writer.read(e2, b"missing") is None
                assert faust.streams.current_event() is None
                # Acknowledged: the store records the last changelog offset of each batch as persisted.
                futures[0].set_result(_meta(topic, 2, 100))
                futures[1].set_exception(aiokafka.errors.KafkaTimeoutError())
                await asyncio.sleep(0)
                assert store.persisted_offset(TP(topic, 2)) == 101
                assert store.persisted_offset(TP(topic, 3)) is None, "a failed batch must not count as persisted"
                futures[1].exception()  # retrieved: no "never retrieved" warning
            finally:
                await real.stop()

    asyncio.run(run())


def test_table_writer_splits_a_partition_into_batches_when_one_is_full(tmp_path: Path) -> None:
    async def run() -> None:
        with _table(tmp_path) as (app, table):
            real = aiokafka.AIOKafkaProducer(bootstrap_servers="127.0.0.1:1", max_batch_size=300)
            try:
                producer = _Producer(real)
                app.producer._producer = producer
                writer = fa.TableWriter(app, table)
                ev = _ev(partition=1, offset=0)
                items = [(ev, b"key%d" % i, bytes([i]) * 100) for i in range(5)]
                futures = await writer.write(items)
                counts = [n for _, _, n in producer.sent]
                assert len(counts) > 1 and sum(counts) == 5, f"batches: {producer.sent}"
                assert all(p == 1 for _, p, _ in producer.sent)
                topic = "t-users-changelog"
                base = 0
                for fut, n in zip(futures, counts, strict=True):
                    fut.set_result(_meta(topic, 1, base))
                    await asyncio.sleep(0)
                    assert table.data.persisted_offset(TP(topic, 1)) == base + n - 1
                    base += n
                for key, value in ((k, v) for _, k, v in items):
                    assert writer.read(ev, key) == value
            finally:
                await real.stop()

    asyncio.run(run())


def test_table_writer_reads_from_the_store_partition_of_the_event(tmp_path: Path) -> None:
    """A table without ``use_partitioner`` keeps one value per partition: the event picks which."""

    async def run() -> None:
        with _table(tmp_path, use_partitioner=False) as (app, table):
            real = aiokafka.AIOKafkaProducer(bootstrap_servers="127.0.0.1:1")
            try:
                app.producer._producer = _Producer(real)
                writer = fa.TableWriter(app, table)
                e1, e2 = _ev(partition=1, offset=0), _ev(partition=2, offset=0)
                futures = await writer.write([(e1, b"k", b"one"), (e2, b"k", b"two")])
                assert writer.read(e1, b"k") == b"one" and writer.read(e2, b"k") == b"two"
                for fut in futures:
                    fut.cancel()
            finally:
                await real.stop()

    asyncio.run(run())


# --------------------------------------------------------------------------------------------
# Contiguity, seek_back and the consumer's own commit


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _offsets(events: list[Any]) -> list[tuple[int, int]]:
    return [(e.message.partition, e.message.offset) for e in events]


def test_contiguity_takes_each_partition_in_order_from_its_committed_offset() -> None:
    guard = fa.Contiguity()
    committed = {TP("updates", 0): 5, TP("updates", 1): None}
    events = [_ev(offset=5), _ev(partition=1, offset=40), _ev(offset=6), _ev(partition=1, offset=41)]
    taken, dropped, gaps = guard.admit(events, committed.get)
    assert _offsets(taken) == [(0, 5), (1, 40), (0, 6), (1, 41)], "no committed offset: the first record starts"
    assert dropped == [] and gaps == {}
    # A re-fetch after a rebalance's seek to the committed offset: what was taken is not taken again.
    taken, dropped, gaps = guard.admit([_ev(offset=5), _ev(offset=6), _ev(offset=7)], committed.get)
    assert _offsets(taken) == [(0, 7)] and _offsets(dropped) == [(0, 5), (0, 6)] and gaps == {}


def test_contiguity_never_takes_past_a_skipped_record_and_asks_for_it_once() -> None:
    clock = _Clock()
    guard = fa.Contiguity(retry_s=10.0, clock=clock)
    tp = TP("updates", 2)
    taken, _, _ = guard.admit([_ev(partition=2, offset=696)], {tp: 696}.get)
    assert _offsets(taken) == [(2, 696)]
    # 697 never reached the batch loop (the CI run's lost update): 698 must not be taken.
    taken, dropped, gaps = guard.admit([_ev(partition=2, offset=698), _ev(offset=3)], {}.get)
    assert _offsets(taken) == [(0, 3)], "other partitions go on"
    assert _offsets(dropped) == [(2, 698)] and gaps == {tp: 697}
    guard.sought(tp, 697)
    # Stale records fetched before the seek keep coming: dropped, without another seek.
    taken, dropped, gaps = guard.admit([_ev(partition=2, offset=699)], {}.get)
    assert taken == [] and gaps == {}
    clock.now += 10.0  # the seek did not bring 697 back in time: asked again
    assert guard.admit([_ev(partition=2, offset=700)], {}.get)[2] == {tp: 697}
    taken, dropped, gaps = guard.admit([_ev(partition=2, offset=o) for o in (697, 698, 699)], {}.get)
    assert _offsets(taken) == [(2, 697), (2, 698), (2, 699)] and dropped == [] and gaps == {}


def test_contiguity_seeks_back_a_quiet_partition_whose_records_were_left_out_as_not_current() -> None:
    """A restarted worker's whole backlog of one partition came before the flow was on and was
    left out; nothing later came, so no gap showed and the partition lagged for good (1 restart
    in ~50 of a scratch loop; the CI failure of ee54af2). Once ``retry_s`` has passed without
    them being taken, the partition is sought back to its next offset."""
    clock = _Clock()
    guard = fa.Contiguity(retry_s=10.0, clock=clock)
    quiet, busy, other = TP("updates", 1), TP("updates", 0), TP("updates", 2)
    committed = {quiet: 400, busy: 30, other: 7}.get
    assert not guard.awaiting()
    for offset in (400, 401, 402):
        guard.skipped(quiet, offset, committed)
    guard.skipped(busy, 30, committed)
    guard.skipped(other, 6, committed)  # below the committed offset: nothing missing
    assert guard.awaiting(), "the batch loop must wake up to check on them"
    assert guard.describe()["skipped"] == ["updates:0", "updates:1"]
    assert guard.overdue() == {}, "a rebalance's own seek normally fetches them again first"
    # The busy partition's records come again and are taken: its mark is gone.
    taken, _, gaps = guard.admit([_ev(offset=30), _ev(offset=31)], committed)
    assert _offsets(taken) == [(0, 30), (0, 31)] and gaps == {}
    clock.now += 10.0
    assert guard.overdue() == {quiet: 400}, "only the partition whose records never came back"
    guard.sought(quiet, 400)
    assert guard.overdue() == {}, "the seek is watched as any seek back"
    taken, _, _ = guard.admit([_ev(partition=1, offset=o) for o in (400, 401, 402)], committed)
    assert _offsets(taken) == [(1, 400), (1, 401), (1, 402)]
    assert not guard.awaiting() and guard.describe()["skipped"] == []


def test_contiguity_a_left_out_record_after_taken_ones_seeks_back_to_the_next_offset() -> None:
    clock = _Clock()
    guard = fa.Contiguity(retry_s=10.0, clock=clock)
    tp = TP("updates", 0)
    guard.admit([_ev(offset=5), _ev(offset=6)], {tp: 5}.get)
    guard.skipped(tp, 5, {}.get)  # a re-fetch of what was taken: nothing missing
    assert not guard.awaiting()
    guard.skipped(tp, 9, {}.get)
    guard.skipped(tp, 7, {}.get)
    assert guard.describe()["skipped"] == ["updates:0"]
    clock.now += 10.0
    assert guard.overdue() == {tp: 7}, "from the next offset to take, not from the record left out"
    guard.forget({TP("updates", 1)})  # revoked: no longer this worker's to seek
    assert guard.overdue() == {} and not guard.awaiting()


def test_contiguity_behind_names_partitions_fetched_to_their_end_but_not_taken() -> None:
    """The same stall when nothing left out was even seen (the records were lost between the
    fetch and the queue): once the queue has been idle, a partition whose log ends past the next
    offset to take, although the consumer fetched it to the end, is sought back."""
    guard = fa.Contiguity(retry_s=10.0, clock=lambda: 0.0)
    taken_to_end, lost, never_seen, never_committed, sought = (TP("updates", p) for p in range(5))
    committed = {never_seen: 400, never_committed: None, taken_to_end: 0, lost: 0}.get
    guard.admit([_ev(offset=o) for o in range(3)], committed)
    guard.admit([_ev(partition=1, offset=o) for o in range(3)], committed)
    guard.sought(sought, 9)
    ends = {taken_to_end: 3, lost: 5, never_seen: 600, never_committed: 50, sought: 20}
    assert guard.behind(ends, committed) == {lost: 3, never_seen: 400}, (
        "not one taken to its end, one never committed (its start is the reset policy's), or one "
        "already sought back (``overdue`` asks for it again)"
    )


def test_fetched_ends_are_the_owned_partitions_the_consumer_fetched_to_their_end(tmp_path: Path) -> None:
    """Read from aiokafka's own partition states (position, highwater of the last fetch): the
    test builds them as a fetch leaves them, so a renamed attribute fails here, not in a stall."""

    async def run() -> None:
        with _app(tmp_path) as app:
            stream = app.stream(app.topic("updates"))
            kafka = aiokafka.AIOKafkaConsumer(bootstrap_servers=BROKER)
            app.consumer._thread._consumer = kafka
            try:
                assert fa.fetched_ends(stream) == {}, "no assignment yet"
                kafka._subscription.subscribe(topics={"updates", "trades"})
                tps = [TopicPartition("updates", p) for p in range(4)] + [TopicPartition("trades", 0)]
                kafka._subscription.assign_from_subscribed(set(tps))
                states = kafka._subscription.subscription.assignment
                for tp, position, highwater in zip(tps, (10, 7, 5, None, 3), (10, 9, None, 4, 3), strict=True):
                    if position is not None:
                        states.state_value(tp).seek(position)
                    states.state_value(tp).highwater = highwater
                assert fa.fetched_ends(stream) == {TP("updates", 0): 10}, (
                    "not one still fetching its backlog, one not fetched yet, one without a position, "
                    "or another topic's"
                )
            finally:
                app.consumer._thread._consumer = None
                await kafka.stop()

    asyncio.run(run())


def test_contiguity_starts_over_from_the_committed_offset_of_a_partition_it_got_back() -> None:
    guard = fa.Contiguity()
    tp = TP("updates", 0)
    guard.admit([_ev(offset=10)], {tp: 10}.get)
    guard.forget({TP("updates", 1)})  # revoked: another worker went on from 11 to 50
    taken, dropped, gaps = guard.admit([_ev(offset=50)], {tp: 50}.get)
    assert _offsets(taken) == [(0, 50)] and dropped == [] and gaps == {}


def test_contiguity_moves_past_records_retention_deleted_once_sought_there() -> None:
    guard = fa.Contiguity()
    tp = TP("updates", 0)
    assert guard.admit([_ev(offset=30)], {tp: 20}.get)[2] == {tp: 20}
    guard.sought(tp, 25)  # seek_back found the partition starting at 25
    taken, _, gaps = guard.admit([_ev(offset=25)], {}.get)
    assert _offsets(taken) == [(0, 25)] and gaps == {}


class _SeekConsumer:
    """What ``seek_back`` uses of Faust's consumer; ``hang_*``: that broker call never answers."""

    def __init__(self, earliest: int = 0, *, hang_earliest: bool = False, hang_seek: bool = False) -> None:
        self.earliest, self.hang_earliest, self.hang_seek = earliest, hang_earliest, hang_seek
        self.sought: list[dict[TP, int]] = []
        self._read_offset: dict[TP, int] = {}

    async def earliest_offsets(self, *tps: TP) -> dict[TP, int]:
        if self.hang_earliest:
            await asyncio.sleep(3600)
        return {tp: self.earliest for tp in tps}

    async def seek_wait(self, partitions: dict[TP, int]) -> None:
        self.sought.append(dict(partitions))
        if self.hang_seek:
            await asyncio.sleep(3600)


def test_seek_back_seeks_the_consumer_and_its_read_offset_past_deleted_records_only() -> None:
    tp = TP("updates", 2)

    async def run(earliest: int) -> tuple[int, Any]:
        consumer = _SeekConsumer(earliest)
        return await fa.seek_back(types.SimpleNamespace(consumer=consumer), tp, 697), consumer

    target, consumer = asyncio.run(run(0))
    assert target == 697 and consumer.sought == [{tp: 697}] and consumer._read_offset[tp] == 697
    target, consumer = asyncio.run(run(900))
    assert target == 900 and consumer.sought == [{tp: 900}] and consumer._read_offset[tp] == 900


def test_seek_back_bounds_each_broker_call() -> None:
    """A broker that never answers: the earliest-offset read gives up and the seek still goes
    out; a seek that never completes raises (Contiguity asks again), neither waits for ever."""
    tp = TP("trades", 1)

    async def run(hang_seek: bool) -> tuple[Any, _SeekConsumer]:
        consumer = _SeekConsumer(hang_earliest=True, hang_seek=hang_seek)
        try:
            return await fa.seek_back(types.SimpleNamespace(consumer=consumer), tp, 40, timeout_s=0.05), consumer
        except TimeoutError as exc:
            return exc, consumer

    target, consumer = asyncio.run(run(False))
    assert target == 40 and consumer.sought == [{tp: 40}] and consumer._read_offset[tp] == 40
    outcome, consumer = asyncio.run(run(True))
    assert isinstance(outcome, TimeoutError) and consumer.sought == [{tp: 40}] and tp not in consumer._read_offset


def test_the_real_consumer_seeks_and_reads_earliest_offsets_as_seek_back_calls_them(tmp_path: Path) -> None:
    async def run() -> None:
        with _app(tmp_path) as app:
            consumer = app.consumer
            assert inspect.iscoroutinefunction(consumer.seek_wait) and _shape(consumer.seek_wait) == ["partitions"]
            assert inspect.iscoroutinefunction(consumer.earliest_offsets)
            assert _shape(consumer.earliest_offsets) == ["*partitions"]
            assert isinstance(consumer._committed_offset, Mapping)
            assert consumer._committed_offset.get(TP("updates", 0)) is None
            assert fa.committed_offset(app)(TP("updates", 0)) is None

    asyncio.run(run())


def test_fast_consumer_never_commits_from_acks(tmp_path: Path) -> None:
    """Faust's own commit counts acked offsets that start one past the committed offset as
    contiguous: it would commit past a record whose event never reached the batch loop."""

    async def run() -> None:
        with _app(tmp_path) as app:
            consumer = app.consumer
            tp = TP("updates", 0)
            consumer._committed_offset[tp] = 697
            consumer._acked[tp] = [698, 699]
            consumer._acked_index[tp] = {698, 699}
            assert transport_consumer.Consumer._new_offset(consumer, tp) == 700, (
                "Faust's commit no longer skips the record at the committed offset: the override may go"
            )
            assert await consumer.commit() is False
            assert _shape(transport_consumer.Consumer.commit) == ["self", "topics", "start_new_transaction"]

    asyncio.run(run())


def test_contiguity_says_which_sought_partitions_are_overdue_until_their_record_comes() -> None:
    clock = _Clock()
    guard = fa.Contiguity(retry_s=10.0, clock=clock)
    tp = TP("updates", 0)
    assert not guard.awaiting() and guard.overdue() == {}
    guard.admit([_ev(offset=3)], {tp: 3}.get)
    assert guard.admit([_ev(offset=9)], {}.get)[2] == {tp: 4}
    guard.sought(tp, 4)
    assert guard.awaiting() and guard.overdue() == {}
    clock.now += 10.0
    assert guard.overdue() == {tp: 4}, "nothing came: the worker must seek again by itself"
    guard.admit([_ev(offset=4)], {}.get)
    assert not guard.awaiting() and guard.overdue() == {}


def test_fetch_state_names_the_assigned_partitions_faust_does_not_fetch_and_why(tmp_path: Path) -> None:
    """Through Faust's own bookkeeping (pause, buffer full, rebalance): if Faust renames or
    reshapes it, this fails rather than /health going blind."""

    async def run() -> None:
        with _app(tmp_path) as app:
            table = app.Table("t-state", partitions=3)
            consumer = app.consumer
            tps = {TP("updates", p) for p in range(3)}
            changelog = TP(table.changelog_topic.get_topic_name(), 0)
            consumer.assignment = lambda: frozenset(tps | {changelog})  # type: ignore[method-assign]
            consumer._set_active_tps(tps | {changelog})
            assert fa.fetch_state(app) == {}
            consumer.pause_partitions({TP("updates", 0), changelog})
            consumer.on_buffer_full(TP("updates", 1))
            assert fa.fetch_state(app) == {"updates:0": "paused", "updates:1": "buffer_full"}
            consumer.on_buffer_drop(TP("updates", 1))
            consumer.resume_partitions({TP("updates", 0)})
            assert fa.fetch_state(app) == {}
            consumer._active_partitions.discard(TP("updates", 2))
            assert fa.fetch_state(app) == {"updates:2": "inactive"}

    asyncio.run(run())


def test_contiguity_describes_its_next_offsets_and_seeks() -> None:
    guard = fa.Contiguity(retry_s=10.0, clock=lambda: 0.0)
    e = [types.SimpleNamespace(message=types.SimpleNamespace(tp=TP("u", 0), offset=o)) for o in (5, 6)]
    guard.admit(e, lambda tp: 5)
    guard.sought(TP("u", 1), 3)
    assert guard.describe() == {"next": {"u:0": 7, "u:1": 3}, "sought": ["u:1"], "skipped": []}
