"""``ohs bridge``: run the bridge until SIGTERM (then flush and checkpoint)."""

from __future__ import annotations

import signal

import click

__all__ = ["bridge"]


@click.command()
def bridge() -> None:
    """Relay the engine's ZeroMQ feed into Kafka (Avro, keyed by user_id), with no seq lost."""
    from bridge.errors import BridgeError
    from bridge.http import serve
    from bridge.service import Bridge
    from bridge.settings import BridgeSettings
    from kit.logs import setup_logging
    from kit.runtime import tune_gc

    settings = BridgeSettings()
    setup_logging(settings.log_format)
    stop = {"requested": False}

    def on_signal(signum: int, frame: object) -> None:
        stop["requested"] = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    b = Bridge(settings)  # no I/O yet
    tune_gc(settings.gc_threshold0)  # kit/runtime.py says why
    # /health answers (503 "starting") before the first attempt to reach Kafka, which may take
    # as long as Kafka is away.
    if settings.metrics_port:
        serve(settings.metrics_port, b.status, host=settings.metrics_host)
    click.echo(f"bridge: {settings.feed_endpoint} -> {settings.kafka_bootstrap}", err=True)
    try:
        started = b.start(lambda: stop["requested"])
    except BridgeError as exc:  # a refusal waiting cannot fix (a setting the broker rejects)
        raise click.ClickException(str(exc)) from exc
    if started:
        b.run(lambda: stop["requested"])
