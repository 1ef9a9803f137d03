"""Generated COCO roots with one fault each: the bad-input catalogue of issue 14.

`make_root(tmp, case)` writes a 2-image synthetic root (`detector.data.synth`) and breaks it as `case`
says; `CASES` maps each case to the words its one-line error must contain ("" for cases that are
repaired, not refused). Used by tests/harness/execute/test_data_checks.py.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from detector.data.synth import make_synthetic_coco

ANN = Path("annotations/instances_train2017.json")


def _edit(root: Path, fn: Callable[[dict[str, Any]], None], ann: Path = ANN) -> None:
    data = json.loads((root / ann).read_text())
    fn(data)
    (root / ann).write_text(json.dumps(data))


def _own_categories(data: dict[str, Any]) -> None:
    """Three non-COCO categories with ids from 0, every annotation remapped to them."""
    data["categories"] = [{"id": 0, "name": "widget"}, {"id": 1, "name": "gadget"}, {"id": 2, "name": "gizmo"}]
    for i, ann in enumerate(data["annotations"]):
        ann["category_id"] = i % 3


def _truncate_first_image(root: Path) -> None:
    first = sorted((root / "train2017").iterdir())[0]
    first.write_bytes(first.read_bytes()[:40])


BREAKS: dict[str, Callable[[Path], None]] = {
    "unknown-category": lambda r: _edit(r, lambda d: d["annotations"][0].update(category_id=999)),
    "missing-image": lambda r: sorted((r / "train2017").iterdir())[0].unlink(),
    "truncated-jpeg": _truncate_first_image,
    "empty-annotations": lambda r: _edit(r, lambda d: d.update(annotations=[])),
    "duplicate-annotation-id": lambda r: _edit(r, lambda d: d["annotations"][1].update(id=d["annotations"][0]["id"])),
    "bad-bbox": lambda r: _edit(r, lambda d: d["annotations"][0].update(bbox=[1, 2, 3])),
    "own-categories": lambda r: (_edit(r, _own_categories), _edit(r, _own_categories, Path("annotations/instances_val2017.json"))),
    "no-iscrowd-no-area": lambda r: _edit(r, lambda d: [a.pop(k, None) for a in d["annotations"] for k in ("iscrowd", "area")]),
    "degenerate-box": lambda r: _edit(r, lambda d: d["annotations"][0].update(bbox=[5, 5, -3, 10])),
}

# case -> words its one-line error must contain ("" = not an error: repaired or dropped, with a note)
CASES: dict[str, str] = {
    "unknown-category": "field 'category_id' 999 is not an id in 'categories'",
    "missing-image": "not found",
    "truncated-jpeg": "cannot be decoded",
    "empty-annotations": "'annotations' is empty",
    "duplicate-annotation-id": "duplicate annotation id",
    "bad-bbox": "field 'bbox' must be [x, y, width, height]",
    "own-categories": "pass --classes dataset",
    "no-iscrowd-no-area": "",
    "degenerate-box": "",
}


def make_root(tmp: Path, case: str, *, images: int = 2) -> Path:
    root = make_synthetic_coco(Path(tmp) / case, images=images, seed=0, size=(96, 64), val_images=2)
    BREAKS[case](root)
    return root


__all__ = ["BREAKS", "CASES", "make_root"]
