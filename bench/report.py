"""The table (plain text for the terminal, Markdown for docs/performance.md) and the JSON."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.common import Row

HEADERS = ("bench", "metric", "value", "limit, same run", "ratio", "target", "met", "note")


def number(value: float | None, unit: str = "") -> str:
    """A figure with its unit, rounded for reading."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if unit in ("tasks/s", "B"):
        text = f"{value:,.0f}"
    elif unit in ("ms", "s", "us/task"):
        text = f"{value:.2f}"
    elif unit.startswith("%") or unit == "x":
        text = f"{value:.1f}"
    else:
        text = f"{value:g}"
    return f"{text} {unit}".strip()


def cells(row: Row) -> list[str]:
    met = "" if row.met is None else ("yes" if row.met else "NO")
    ratio = (
        ""
        if row.ratio is None
        else f"{row.ratio:.0%}"
        if row.unit == "tasks/s"
        else f"{row.ratio:.2f}x"
    )
    return [
        row.bench,
        row.metric,
        number(row.value, row.unit),
        number(row.reference, row.unit),
        ratio,
        row.target,
        met,
        row.note,
    ]


def text_table(rows: Sequence[Row]) -> str:
    """Columns padded for a terminal."""
    table = [list(HEADERS), *(cells(r) for r in rows)]
    widths = [max(len(line[i]) for line in table) for i in range(len(HEADERS))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in table
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(rows: Sequence[Row]) -> str:
    """The same table in Markdown."""
    lines = ["| " + " | ".join(HEADERS) + " |", "|" + "---|" * len(HEADERS)]
    lines += ["| " + " | ".join(cells(r)) + " |" for r in rows]
    return "\n".join(lines)


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")
