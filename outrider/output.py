"""How a command prints its result: as text for a person, as JSON or YAML for a program.

Every command that prints a result (`policy check`, `proxy-status`, `check`,
`ca mint`) builds it once as plain data and hands it to `emit` with its text
rendering, so `-o json` and `-o yaml` show the same facts as the text, and a
script never has to parse the table a person reads.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, TextIO

Format = Literal["text", "json", "yaml"]
FORMATS: tuple[Format, ...] = ("text", "json", "yaml")

Result = Mapping[str, Any] | Sequence[Any]


def add_output_flag(parser: argparse.ArgumentParser) -> None:
    """`-o/--output text|json|yaml` (default text), as kubectl spells it."""
    parser.add_argument(
        "-o",
        "--output",
        choices=FORMATS,
        default="text",
        help="text (default), or json or yaml for scripts",
    )


def render(result: Result, fmt: Format, text: Callable[[Any], str]) -> str:
    """The result as `fmt`, ending in a newline (text: what `text(result)` says)."""
    if fmt == "json":
        return json.dumps(result, indent=2, default=str) + "\n"
    if fmt == "yaml":
        import yaml

        plain = json.loads(json.dumps(result, default=str))  # tuples, dates: as JSON has them
        dumped: str = yaml.safe_dump(plain, sort_keys=False, allow_unicode=True)
        return dumped
    shown = text(result)
    return shown if shown.endswith("\n") or not shown else shown + "\n"


def emit(
    result: Result, fmt: Format, text: Callable[[Any], str], stream: TextIO | None = None
) -> None:
    """Print `result` on stdout (or `stream`) as `fmt`."""
    (stream or sys.stdout).write(render(result, fmt, text))
