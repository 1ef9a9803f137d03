"""GitHub markdown tables, as the published README writes them."""

from __future__ import annotations

import re
from collections.abc import Sequence


def markdown_table(columns: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A padded, centred GitHub markdown table; a `|` inside a cell is escaped unless it already is."""
    cells = [[_escape(c) for c in columns]] + [[_escape(c) for c in row] for row in rows]
    widths = [max(3, *(len(r[i]) for r in cells)) for i in range(len(columns))]
    lines = ["| " + " | ".join(c.center(w) for c, w in zip(r, widths)) + " |" for r in cells]
    lines.insert(1, "| " + " | ".join(":" + "-" * (w - 2) + ":" for w in widths) + " |")
    return "\n".join(lines)


def _escape(text: str) -> str:
    return re.sub(r"(?<!\\)\|", r"\\|", str(text))


__all__ = ["markdown_table"]
