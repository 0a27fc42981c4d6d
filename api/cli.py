"""``ohs api``: serve the query API and live stream with uvicorn."""

from __future__ import annotations

import logging
import logging.config
import re
from typing import Any

import click

__all__ = ["TokenRedactor", "api"]

_TOKEN_PARAM = re.compile(r"(?i)([?&]token=)[^&\s\"]*")


class TokenRedactor(logging.Filter):
    """Blanks ``token=`` query parameters: uvicorn logs every WebSocket path with its query string,
    and browsers can only authenticate a WebSocket that way."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str) and "token=" in record.msg.lower():
            record.msg = _TOKEN_PARAM.sub(r"\1***", record.msg)
        if isinstance(record.args, tuple):
            record.args = tuple(
                _TOKEN_PARAM.sub(r"\1***", a) if isinstance(a, str) and "token=" in a.lower() else a
                for a in record.args
            )
        return True


def log_config(level: str, fmt: str = "text") -> dict[str, Any]:
    """One line per record for ours and uvicorn's loggers, tokens redacted: time, level, logger and
    message as text, or one JSON object (``OHS_LOG_FORMAT=json``, ``kit.logs.JsonFormatter``)."""
    line: dict[str, Any] = (
        {"()": "kit.logs.JsonFormatter"}
        if fmt == "json"
        else {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"}
    )
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"redact": {"()": TokenRedactor}},
        "formatters": {"line": line},
        "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "line", "filters": ["redact"]}},
        "loggers": {
            "ohs": {"handlers": ["stderr"], "level": level, "propagate": False},
            "uvicorn": {"handlers": ["stderr"], "level": level, "propagate": False},
            "uvicorn.access": {"handlers": ["stderr"], "level": level, "propagate": False},
        },
        "root": {"handlers": ["stderr"], "level": "WARNING"},
    }


@click.command("api")
@click.option("--host", default=None, help="Bind address (default: OHS_API_HOST).")
@click.option("--port", type=int, default=None, help="Bind port (default: OHS_API_PORT).")
@click.option("--log-level", default="INFO", show_default=True, help="Log level of the API and uvicorn.")
def api(host: str | None, port: int | None, log_level: str) -> None:
    """Serve the order-history query API and live stream (FastAPI on uvicorn)."""
    import uvicorn
    from pydantic import ValidationError

    from api.app import create_app
    from api.auth import TokenError
    from api.settings import ApiSettings

    config = log_config(log_level.upper())
    logging.config.dictConfig(config)
    overrides: dict[str, Any] = {k: v for k, v in (("host", host), ("port", port)) if v is not None}
    try:
        s = ApiSettings(**overrides)
        if s.log_format != "text":
            config = log_config(log_level.upper(), s.log_format)
            logging.config.dictConfig(config)
        app = create_app(s)
    except ValidationError as exc:
        # Never str(exc): pydantic quotes the input, and the input includes the tokens.
        problems = [
            f"{'.'.join(map(str, e['loc'])) or 'settings'}: {e['msg']}" for e in exc.errors(include_input=False)
        ]
        raise click.ClickException("invalid API settings: " + "; ".join(problems)) from None
    except TokenError as exc:
        raise click.ClickException(str(exc)) from exc
    logging.getLogger("ohs.api").info("serving on http://%s:%d (docs: /docs, OpenAPI: /openapi.json)", s.host, s.port)
    uvicorn.run(
        app,
        host=s.host,
        port=s.port,
        log_config=config,
        server_header=False,
        # Open WebSockets would otherwise hold a SIGTERM forever; clients resume with from_seq.
        timeout_graceful_shutdown=10,
    )
