"""The bench package's exception root.

A benchmark is run from the command line, so the root is a ``click.ClickException``: what cannot
be measured ends the command with one line saying why. Nothing here is retried (``retriable``).
"""

from __future__ import annotations

import click

__all__ = ["BenchError"]


class BenchError(click.ClickException):
    """A benchmark that cannot finish: says what never arrived, or what could not be measured."""

    retriable: bool = False
