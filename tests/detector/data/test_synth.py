from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from detector.data.synth import COCO_CATEGORIES, SYNTH_CLASSES, make_synthetic_coco

COCO128 = Path("/work/shared/data/coco128/annotations/instances_train2017.json")


def _pixels(root: Path, split: str) -> dict[str, np.ndarray]:
    return {p.name: np.asarray(Image.open(p)) for p in sorted((root / split).glob("*.jpg"))}


def test_deterministic_bytes_and_pixels(tmp_path: Path) -> None:
    a = make_synthetic_coco(tmp_path / "a", images=12, seed=3)
    b = make_synthetic_coco(tmp_path / "b", images=12, seed=3)
    c = make_synthetic_coco(tmp_path / "c", images=12, seed=4)
    for split in ("train2017", "val2017"):
        ann = f"annotations/instances_{split}.json"
        assert (a / ann).read_bytes() == (b / ann).read_bytes()
        pa, pb = _pixels(a, split), _pixels(b, split)
        assert pa.keys() == pb.keys() and all(np.array_equal(pa[k], pb[k]) for k in pa)
    assert (a / "annotations/instances_train2017.json").read_bytes() != (c / "annotations/instances_train2017.json").read_bytes()


def test_layout_and_contents(tmp_path: Path) -> None:
    root = make_synthetic_coco(tmp_path, images=20, seed=0, val_images=6)
    train = json.loads((root / "annotations/instances_train2017.json").read_text())
    val = json.loads((root / "annotations/instances_val2017.json").read_text())
    assert len(train["images"]) == 20 and len(val["images"]) == 6
    assert 0 in {im["id"] for im in train["images"]} and 0 in {im["id"] for im in val["images"]}
    cat_ids = [c["id"] for c in train["categories"]]
    assert len(cat_ids) == 80 and max(cat_ids) == 90 and cat_ids != list(range(1, 81))
    drawn = {c["id"] for c in train["categories"] if c["name"] in SYNTH_CLASSES}
    assert {c["name"] for c in train["categories"] if c["id"] in drawn} >= {"person", "bicycle", "car"}
    used = {a["category_id"] for a in train["annotations"]}
    assert used <= drawn and len(used) >= 3
    assert min(a["id"] for a in train["annotations"]) == 1
    sizes = {im["id"]: (im["width"], im["height"]) for im in train["images"]}
    per_image: dict[int, int] = {}
    for ann in train["annotations"]:
        x, y, w, h = ann["bbox"]
        iw, ih = sizes[ann["image_id"]]
        assert 0 <= x and 0 <= y and x + w <= iw and y + h <= ih
        assert 20 <= (w * h) ** 0.5 <= 125 and 0 < ann["area"] <= w * h and ann["iscrowd"] == 0
        per_image[ann["image_id"]] = per_image.get(ann["image_id"], 0) + 1
    assert set(per_image) == set(sizes) and max(per_image.values()) <= 4
    assert any(w < h for w, h in sizes.values()) and any(w > h for w, h in sizes.values())
    modes = {Image.open(root / "train2017" / im["file_name"]).mode for im in train["images"]}
    assert modes == {"RGB", "L"}
    for im in train["images"]:
        assert Image.open(root / "train2017" / im["file_name"]).size == (im["width"], im["height"])


@pytest.mark.skipif(not COCO128.is_file(), reason="coco128 not available")
def test_categories_equal_real_coco() -> None:
    real = json.loads(COCO128.read_text())["categories"]
    assert [(c["id"], c["name"], c["supercategory"]) for c in real] == list(COCO_CATEGORIES)


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="images"):
        make_synthetic_coco(tmp_path, images=0)
    with pytest.raises(ValueError, match="size"):
        make_synthetic_coco(tmp_path, size=(32, 32))
