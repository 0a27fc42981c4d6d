"""Every command line the docs show is one the CLI accepts (none is run).

Sources: README.md and docs/*.md, the lines of fenced code blocks that start with ``ohs``,
``.venv/bin/ohs`` or ``make`` (a ``$ `` prompt allowed, ``$(...)`` substitutions included), and
inline code spans that start with ``ohs``. For each ``ohs`` line: every subcommand exists, every
option exists on the command it is given to (with its value when it takes one), there are no
more positional arguments than the command has, ``ohs <command> --help`` exits 0, and, when the
line has arguments and no placeholder (``<group>``, ``N``), click parses it for real (types, ranges, choices)
without invoking the command. For ``make``: the target exists in the Makefile.
"""

from __future__ import annotations

import math
import re
import shlex
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from ohs.cli import main

ROOT = Path(__file__).resolve().parents[3]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
_PROMPT = re.compile(r"^\$ ")
_SUBST = re.compile(r"\$\(((?:\.venv/bin/)?ohs\b[^)]*)\)")
_INLINE = re.compile(r"`((?:\.venv/bin/)?ohs(?: [^`]*)?)`")
_STOP = re.compile(r"\s(?:\||>|2>|&&|;)\s?")
_PLACEHOLDER = re.compile(r"<[^>]*>|^[A-Z][A-Z_]*$|\.\.\.|^\[.*\]$")


@dataclass(frozen=True)
class Line:
    where: str
    text: str

    def __str__(self) -> str:
        return f"{self.where}: {self.text}"


def _clean(text: str) -> str:
    text = re.split(r"\s+#", text, maxsplit=1)[0]  # a trailing comment
    return _STOP.split(text, maxsplit=1)[0].strip()  # a pipe, a redirection, a second command


@cache
def documented() -> tuple[list[Line], list[Line]]:
    """(ohs command lines, make command lines) of the docs."""
    ohs: list[Line] = []
    make: list[Line] = []
    for path in DOCS:
        name = path.relative_to(ROOT)
        in_block = False
        pending = ""
        for n, raw in enumerate(path.read_text().splitlines(), 1):
            if raw.startswith("```"):
                in_block = not in_block
                continue
            if not in_block:
                for span in _INLINE.findall(raw):
                    ohs.append(Line(f"{name}:{n} (inline)", span))
                continue
            line = pending + _PROMPT.sub("", raw)
            if line.endswith("\\"):
                pending = line[:-1] + " "
                continue
            pending = ""
            for sub in _SUBST.findall(line):
                ohs.append(Line(f"{name}:{n}", _clean(sub)))
            if re.match(r"(\.venv/bin/)?ohs(\s|$)", line):
                ohs.append(Line(f"{name}:{n}", _clean(line)))
            elif re.match(r"make(\s|$)", line):
                make.append(Line(f"{name}:{n}", _clean(line)))
    return ohs, make


def _variants(tokens: list[str]) -> list[list[str]]:
    """``ohs stack up/down/status`` stands for three commands."""
    for i, t in enumerate(tokens):
        if "/" in t and not t.startswith(("-", ".", "/")) and "://" not in t:
            return [v for alt in t.split("/") for v in _variants([*tokens[:i], alt, *tokens[i + 1 :]])]
    return [tokens]


def _options(cmd: click.Command) -> dict[str, click.Option]:
    out = {"--help": click.Option(["--help"], is_flag=True)}
    for p in cmd.params:
        if isinstance(p, click.Option):
            out.update({o: p for o in (*p.opts, *p.secondary_opts)})
    return out


def _takes_value(p: click.Option) -> bool:
    return not (p.is_flag or p.count)


def _consume_options(cmd: click.Command, tokens: list[str], line: Line) -> list[str]:
    """Check the options of ``cmd`` in ``tokens``; return the positional tokens (in order)."""
    opts = _options(cmd)
    positional: list[str] = []
    loose = bool(cmd.context_settings.get("ignore_unknown_options"))
    j = 0
    while j < len(tokens):
        t = tokens[j]
        if t.startswith("-") and len(t) > 1 and not t[1:].replace(".", "").isdigit():
            name, eq, _ = t.partition("=")
            if name not in opts:
                assert loose, f"{line}: `{cmd.name}` has no option {name} (it has {sorted(opts)})"
                j += 1
                continue
            p = opts[name]
            j += 1
            if _takes_value(p) and not eq:
                optional = getattr(p, "_flag_needs_value", False)
                if j < len(tokens) and not (optional and tokens[j].startswith("-")):
                    j += 1
                else:
                    assert optional, f"{line}: {name} needs a value"
            continue
        positional.append(t)
        j += 1
    return positional


def _resolve(tokens: list[str], line: Line) -> tuple[list[str], click.Command, list[str]]:
    """(the command path, the command, its own arguments) of ``ohs`` + ``tokens``."""
    path: list[str] = []
    cmd: click.Command = main
    ctx = click.Context(main, info_name="ohs")
    i = 0
    while isinstance(cmd, click.Group):
        while i < len(tokens) and tokens[i].startswith("-"):
            p = _options(cmd).get(tokens[i].split("=")[0])
            assert p is not None, f"{line}: `ohs {' '.join(path)}` has no option {tokens[i]}"
            i += 2 if _takes_value(p) and "=" not in tokens[i] else 1
        if i >= len(tokens):
            break
        sub = cmd.get_command(ctx, tokens[i])
        assert sub is not None, f"{line}: `ohs {' '.join(path)}` has no subcommand {tokens[i]!r}"
        path.append(tokens[i])
        ctx = click.Context(sub, info_name=tokens[i], parent=ctx)
        cmd = sub
        i += 1
    return path, cmd, tokens[i:]


def _check(line: Line) -> None:
    words = shlex.split(line.text)
    assert words and words[0].endswith("ohs"), line
    for tokens in _variants(words[1:]):
        path, cmd, rest = _resolve(tokens, line)
        if not path:  # `ohs --version`, `ohs --help`
            _consume_options(main, tokens, line)
            continue
        positional = _consume_options(cmd, rest, line)
        arguments = [p for p in cmd.params if isinstance(p, click.Argument)]
        most = math.inf if any(a.nargs == -1 for a in arguments) else sum(a.nargs for a in arguments)
        if not isinstance(cmd, click.Group):
            assert len(positional) <= most, f"{line}: `ohs {' '.join(path)}` takes {most} argument(s): {positional}"
        result = CliRunner().invoke(main, [*path, "--help"])
        assert result.exit_code == 0, f"{line}: `ohs {' '.join(path)} --help` exited {result.exit_code}"
        if not rest or any(_PLACEHOLDER.search(t) for t in rest) or isinstance(cmd, click.Group):
            continue  # a mention of the command, a placeholder, or a group: checked above
        # A real parse of the whole line (types, ranges, choices); the command is not invoked.
        try:
            main.make_context("ohs", [*path, *rest], resilient_parsing=False)
            _leaf_context(path, rest)
        except click.exceptions.Exit:
            pass
        except click.BadParameter as exc:
            if not isinstance(exc.param.type if exc.param else None, click.Path | click.File):
                raise AssertionError(f"{line}: {exc.format_message()}") from None
        except click.UsageError as exc:
            raise AssertionError(f"{line}: {exc.format_message()}") from None


def _leaf_context(path: list[str], rest: list[str]) -> None:
    ctx = main.make_context("ohs", list(path), resilient_parsing=True)
    cmd: click.Command = main
    for name in path:
        assert isinstance(cmd, click.Group)
        sub = cmd.get_command(ctx, name)
        assert sub is not None
        cmd = sub
        if name != path[-1]:
            ctx = click.Context(cmd, info_name=name, parent=ctx)
    cmd.make_context(path[-1], list(rest), parent=ctx)


@cache
def make_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text()
    return set(re.findall(r"^([A-Za-z][\w.-]*)\s*:(?!=)", text, re.M))


def test_the_docs_show_commands():
    ohs, make = documented()
    assert len(ohs) > 40 and len(make) > 3, (len(ohs), len(make))
    texts = " ".join(line.text for line in ohs)
    for command in ("ohs lag", "ohs dlq", "ohs orders", "ohs --version"):
        assert command in texts, f"no doc shows `{command}`"


@pytest.mark.parametrize("line", documented()[0], ids=str)
def test_every_documented_ohs_command_parses(line):
    _check(line)


@pytest.mark.parametrize("line", documented()[1], ids=str)
def test_every_documented_make_target_exists(line):
    words = shlex.split(line.text)[1:]
    targets = [w for w in words if not w.startswith("-") and "=" not in w]
    assert targets, f"{line}: no target"
    for target in targets:
        assert target in make_targets(), f"{line}: the Makefile has no target {target!r}"


def test_the_checker_rejects_what_the_cli_does_not_accept():
    for bad in (
        "ohs lag --no-such-option",
        "ohs no-such-command",
        "ohs stack up/sideways",
        "ohs lag --max-lag many",
        "ohs lag --group",
        "ohs dlq show 1 2",
        "ohs orders --user 1 --colour",
    ):
        with pytest.raises(AssertionError):
            _check(Line("test", bad))
    _check(Line("test", "ohs lag --watch --json --max-lag 3"))
    _check(Line("test", "ohs worker --web-bind 0.0.0.0 -l info"))  # the worker passes options through to Faust
