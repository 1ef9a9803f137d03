"""Plain-text output shared by the terminal commands: fixed-width tables and the numbers in them."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from harness.metrics import finite


def table(rows: Sequence[Sequence[Any]]) -> list[str]:
    """Rows of cells, the first the header, as left-aligned fixed-width lines with a dashed rule under the header."""
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(str(cell).ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return lines


def num(x: Any, digits: int = 1, *, signed: bool = False, grouped: bool = False) -> str:
    """`x` with `digits` decimals ("-" when it is missing or not finite); `signed` always shows the sign,
    `grouped` separates thousands."""
    if not finite(x):
        return "-"
    return format(float(x), f"{'+' if signed else ''}{',' if grouped else ''}.{digits}f")


def clip(text: Any, n: int) -> str:
    """`text` cut to `n` characters with an ellipsis ("" for a missing one, None or NaN)."""
    s = "" if text is None or (isinstance(text, float) and math.isnan(text)) else str(text)
    return s if len(s) <= n else s[: n - 1] + "…"


__all__ = ["clip", "num", "table"]
