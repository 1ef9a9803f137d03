"""Validate a COCO-format dataset once, before any cell starts (`harness run` calls this at planning).

Every problem is a `DataError` of one line naming the file, the entry and the field; what is repaired
on load (`detector.data.coco.load_coco`) or dropped by the training pipeline is counted and returned as
notes, so that a user sees it before training and `result.json` records it:

- a missing `iscrowd` is read as 0 and a missing `area` as the box's area (pycocotools' evaluation
  needs both; COCO files exported by other tools often lack them);
- boxes with a width or height under 1 pixel, or outside their image, are dropped (as mmdet's
  `CocoDataset.parse_data_info` drops them).

Image files are checked to exist and to have a decodable header (PIL opens the header only; a
full decode of every image is optional: `decode=True`).
"""

from __future__ import annotations

import numbers
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from detector.errors import DataError
from detector.jsonio import read_json


@dataclass(frozen=True, kw_only=True)
class DatasetReport:
    """What a valid split holds and what loading it repairs or drops."""

    ann_file: Path
    images: int
    annotations: int
    categories: tuple[tuple[int, str], ...]  # (id, name) in the file's order
    notes: tuple[str, ...] = field(default_factory=tuple)  # repairs and drops, one line each

    @property
    def category_names(self) -> tuple[str, ...]:
        return tuple(name for _id, name in self.categories)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_num(x: Any) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def validate_split(ann_file: Path, image_dir: Path, *, decode: bool = False) -> DatasetReport:
    """Check one split (annotation file + image folder); return its report or raise `DataError`."""
    ann_file, image_dir = Path(ann_file), Path(image_dir)
    data = read_json(ann_file, "annotation file")
    if not isinstance(data, dict):
        raise DataError(f"annotation file {ann_file}: expected a COCO object, got {type(data).__name__}")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise DataError(f"annotation file {ann_file}: field '{key}' must be a list (COCO format), "
                            f"got {type(data.get(key)).__name__ if key in data else 'nothing'}")  # fmt: skip
    if not data["annotations"]:
        raise DataError(f"annotation file {ann_file}: 'annotations' is empty; a detector cannot train without boxes")
    if not image_dir.is_dir():
        raise DataError(f"image folder {image_dir}: not found (annotations: {ann_file})")

    categories = _categories(ann_file, data["categories"])
    sizes = _images(ann_file, image_dir, data["images"], decode=decode)
    counts: Counter[str] = Counter()
    seen: set[Any] = set()
    for i, ann in enumerate(data["annotations"]):
        where = f"annotation file {ann_file}: annotations[{i}]"
        if not isinstance(ann, dict):
            raise DataError(f"{where}: expected an object, got {ann!r}")
        if not _is_int(ann.get("id")):
            raise DataError(f"{where}: field 'id' must be an integer, got {ann.get('id')!r}")
        where = f"annotation file {ann_file}: annotation id {ann['id']}"
        if ann["id"] in seen:
            raise DataError(f"{where}: duplicate annotation id")
        seen.add(ann["id"])
        if ann["id"] == 0:
            raise DataError(f"{where}: id 0 cannot be matched by pycocotools' evaluation; number annotations from 1")
        if ann.get("image_id") not in sizes:
            raise DataError(f"{where}: field 'image_id' {ann.get('image_id')!r} is not an id in 'images'")
        if ann.get("category_id") not in categories:
            raise DataError(f"{where}: field 'category_id' {ann.get('category_id')!r} is not an id in 'categories'; "
                            f"allowed: {', '.join(map(str, list(categories)[:20]))}")  # fmt: skip
        bbox = ann.get("bbox")
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(_is_num(v) for v in bbox)):
            raise DataError(f"{where}: field 'bbox' must be [x, y, width, height] numbers, got {bbox!r}")
        if "iscrowd" not in ann:
            counts["iscrowd"] += 1
        elif ann["iscrowd"] not in (0, 1, True, False):
            raise DataError(f"{where}: field 'iscrowd' must be 0 or 1, got {ann['iscrowd']!r}")
        if "area" not in ann:
            counts["area"] += 1
        elif not _is_num(ann["area"]):
            raise DataError(f"{where}: field 'area' must be a number, got {ann['area']!r}")
        x, y, w, h = (float(v) for v in bbox)
        width, height = sizes[ann["image_id"]]
        inside = min(x + w, width) - max(x, 0.0) > 0 and min(y + h, height) - max(y, 0.0) > 0
        if w < 1 or h < 1 or not inside:
            counts["degenerate"] += 1
    notes = []
    if counts["iscrowd"]:
        notes.append(f"{ann_file.name}: {counts['iscrowd']} annotation(s) without 'iscrowd', read as 0 (not crowd)")
    if counts["area"]:
        notes.append(f"{ann_file.name}: {counts['area']} annotation(s) without 'area', read as the box's area")
    if counts["degenerate"]:
        notes.append(f"{ann_file.name}: {counts['degenerate']} box(es) under 1 px wide or high, or outside their "
                     "image, are not trained on (mmdet drops them too)")  # fmt: skip
    return DatasetReport(ann_file=ann_file, images=len(sizes), annotations=len(data["annotations"]),
                         categories=tuple(categories.items()), notes=tuple(notes))  # fmt: skip


def _categories(ann_file: Path, raw: list[Any]) -> dict[int, str]:
    out: dict[int, str] = {}
    names: set[str] = set()
    for i, cat in enumerate(raw):
        where = f"annotation file {ann_file}: categories[{i}]"
        if not isinstance(cat, dict) or not _is_int(cat.get("id")):
            raise DataError(f"{where}: field 'id' must be an integer, got {cat.get('id') if isinstance(cat, dict) else cat!r}")
        if not isinstance(cat.get("name"), str) or not cat["name"]:
            raise DataError(f"{where} (id {cat['id']}): field 'name' must be a non-empty string, got {cat.get('name')!r}")
        if cat["id"] in out:
            raise DataError(f"{where}: duplicate category id {cat['id']}")
        if cat["name"] in names:
            raise DataError(f"{where}: duplicate category name {cat['name']!r}")
        out[cat["id"]] = cat["name"]
        names.add(cat["name"])
    if not out:
        raise DataError(f"annotation file {ann_file}: 'categories' is empty")
    return out


def _images(ann_file: Path, image_dir: Path, raw: list[Any], *, decode: bool) -> dict[Any, tuple[int, int]]:
    sizes: dict[Any, tuple[int, int]] = {}
    for i, im in enumerate(raw):
        where = f"annotation file {ann_file}: images[{i}]"
        if not isinstance(im, dict):
            raise DataError(f"{where}: expected an object, got {im!r}")
        if not _is_int(im.get("id")):
            raise DataError(f"{where}: field 'id' must be an integer, got {im.get('id')!r}")
        where = f"annotation file {ann_file}: image id {im['id']}"
        if im["id"] in sizes:
            raise DataError(f"{where}: duplicate image id")
        for key in ("width", "height"):
            if not _is_int(im.get(key)) or im[key] <= 0:
                raise DataError(f"{where}: field '{key}' must be a positive integer, got {im.get(key)!r}")
        name = im.get("file_name")
        if not isinstance(name, str) or not name or Path(name).is_absolute() or ".." in Path(name).parts:
            raise DataError(f"{where}: field 'file_name' must be a relative path inside {image_dir}, got {name!r}")
        _check_image(image_dir / name, where, decode=decode)
        sizes[im["id"]] = (im["width"], im["height"])
    if not sizes:
        raise DataError(f"annotation file {ann_file}: 'images' is empty")
    return sizes


def _check_image(path: Path, where: str, *, decode: bool) -> None:
    try:
        with Image.open(path) as img:  # reads the header only
            if decode:
                img.load()
    except FileNotFoundError:
        raise DataError(f"{where}: image file {path} not found") from None
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise DataError(f"{where}: image file {path} cannot be decoded ({exc})") from None


def check_classes(report: DatasetReport, *, cell: str, classes: Sequence[str], num_classes: int) -> None:
    """The categories a cell trains against the split's: a `DataError` naming `--classes dataset` if they differ.

    `classes` empty means "every category of the file" with a head of `num_classes` (COCO's 80).
    """
    names = report.category_names
    if classes:
        missing = [c for c in classes if c not in names]
        if missing:
            raise DataError(f"annotation file {report.ann_file}: cell {cell} trains {', '.join(classes)}, but the file "
                            f"has no category {missing[0]!r} ({len(names)} categories: {_few(names)}); "
                            "to train this dataset's own categories, pass --classes dataset")  # fmt: skip
        return
    if len(names) != num_classes:
        raise DataError(f"annotation file {report.ann_file}: {len(names)} categories ({_few(names)}), but cell {cell} "
                        f"trains {num_classes} (COCO's); to train this dataset's own categories, pass --classes dataset")  # fmt: skip


def _few(names: Sequence[str], n: int = 5) -> str:
    return ", ".join(names[:n]) + (f", ... ({len(names) - n} more)" if len(names) > n else "")


__all__ = ["DatasetReport", "check_classes", "validate_split"]
