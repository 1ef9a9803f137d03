from __future__ import annotations

import math

from harness.text import clip, num, table


def test_table_pads_columns_rules_the_header_and_strips_trailing_space() -> None:
    assert table([("cell", "AP"), ("r50", "37.4"), ("x101-64x4d", "")]) == [
        "cell        AP", "----------  ----", "r50         37.4", "x101-64x4d",
    ]  # fmt: skip


def test_num_formats_what_is_finite_and_dashes_the_rest() -> None:
    assert [num(37.44), num(-0.5, 2, signed=True), num(16959.8, 1, grouped=True), num(3)] == ["37.4", "-0.50", "16,959.8", "3.0"]
    assert [num(None), num(math.nan), num(math.inf), num(True), num("37.4")] == ["-"] * 5


def test_clip_ellipsis_and_missing_text() -> None:
    assert clip("a" * 10, 5) == "aaaa…" and clip("short", 5) == "short"
    assert clip(None, 5) == clip(math.nan, 5) == ""
