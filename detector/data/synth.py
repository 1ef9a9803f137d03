"""A deterministic, tiny, learnable COCO-2017-style dataset for smoke runs and tests.

Layout written under `out` (the same as a real COCO root, so every code path is exercised):

    out/annotations/instances_train2017.json   out/train2017/<id:012d>.jpg
    out/annotations/instances_val2017.json     out/val2017/<id:012d>.jpg

`categories` holds the real 80 COCO categories (ids 1..90, non-contiguous), but objects are drawn
from a handful of easy classes (`SYNTH_CLASSES`: person, bicycle, car, dog, sports ball), each a
distinct solid colour and shape with a little noise, on a smooth textured background. A Faster
R-CNN from random init learns them at ~320 px in a few hundred CPU iterations.

Corner cases it covers on purpose: image id 0 (ids are `3 * i` in train, `5 * i` in val), portrait
images (every 4th image is H > W, so aspect-ratio grouping has two groups), grayscale JPEGs (every
10th image is saved as mode "L"), and annotation ids starting at 1 (pycocotools treats a gt id of 0
as "unmatched", see `coco_eval`).

Boxes are COCO `[x, y, w, h]` in pixels; `area` is the drawn mask's pixel count (as COCO's `area`
is the mask area, not the box area).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

# The 80 COCO 2017 detection categories: (id, name, supercategory). Ids skip 12, 26, 29, 30, 45, 66,
# 68, 69, 71, 83 as in the official instances_*.json.
COCO_CATEGORIES: tuple[tuple[int, str, str], ...] = (
    (1, "person", "person"), (2, "bicycle", "vehicle"), (3, "car", "vehicle"),
    (4, "motorcycle", "vehicle"), (5, "airplane", "vehicle"), (6, "bus", "vehicle"),
    (7, "train", "vehicle"), (8, "truck", "vehicle"), (9, "boat", "vehicle"),
    (10, "traffic light", "outdoor"), (11, "fire hydrant", "outdoor"), (13, "stop sign", "outdoor"),
    (14, "parking meter", "outdoor"), (15, "bench", "outdoor"), (16, "bird", "animal"),
    (17, "cat", "animal"), (18, "dog", "animal"), (19, "horse", "animal"), (20, "sheep", "animal"),
    (21, "cow", "animal"), (22, "elephant", "animal"), (23, "bear", "animal"), (24, "zebra", "animal"),
    (25, "giraffe", "animal"), (27, "backpack", "accessory"), (28, "umbrella", "accessory"),
    (31, "handbag", "accessory"), (32, "tie", "accessory"), (33, "suitcase", "accessory"),
    (34, "frisbee", "sports"), (35, "skis", "sports"), (36, "snowboard", "sports"),
    (37, "sports ball", "sports"), (38, "kite", "sports"), (39, "baseball bat", "sports"),
    (40, "baseball glove", "sports"), (41, "skateboard", "sports"), (42, "surfboard", "sports"),
    (43, "tennis racket", "sports"), (44, "bottle", "kitchen"), (46, "wine glass", "kitchen"),
    (47, "cup", "kitchen"), (48, "fork", "kitchen"), (49, "knife", "kitchen"), (50, "spoon", "kitchen"),
    (51, "bowl", "kitchen"), (52, "banana", "food"), (53, "apple", "food"), (54, "sandwich", "food"),
    (55, "orange", "food"), (56, "broccoli", "food"), (57, "carrot", "food"), (58, "hot dog", "food"),
    (59, "pizza", "food"), (60, "donut", "food"), (61, "cake", "food"), (62, "chair", "furniture"),
    (63, "couch", "furniture"), (64, "potted plant", "furniture"), (65, "bed", "furniture"),
    (67, "dining table", "furniture"), (70, "toilet", "furniture"), (72, "tv", "electronic"),
    (73, "laptop", "electronic"), (74, "mouse", "electronic"), (75, "remote", "electronic"),
    (76, "keyboard", "electronic"), (77, "cell phone", "electronic"), (78, "microwave", "appliance"),
    (79, "oven", "appliance"), (80, "toaster", "appliance"), (81, "sink", "appliance"),
    (82, "refrigerator", "appliance"), (84, "book", "indoor"), (85, "clock", "indoor"),
    (86, "vase", "indoor"), (87, "scissors", "indoor"), (88, "teddy bear", "indoor"),
    (89, "hair drier", "indoor"), (90, "toothbrush", "indoor"),
)

# Drawn classes: name -> (RGB colour, shape, (min, max) aspect w / h). Colours are saturated and far
# apart; shapes differ too, so grayscale images stay separable (tall vs wide vs round vs triangle).
SYNTH_CLASSES: dict[str, tuple[tuple[int, int, int], str, tuple[float, float]]] = {
    "person": ((210, 45, 45), "rect", (0.35, 0.55)),
    "bicycle": ((40, 190, 70), "ellipse", (1.3, 1.8)),
    "car": ((45, 85, 225), "rect", (1.5, 2.2)),
    "dog": ((235, 200, 40), "triangle", (0.9, 1.3)),
    "sports ball": ((200, 60, 200), "ellipse", (0.9, 1.1)),
}

_NAME_TO_ID = {name: cid for cid, name, _ in COCO_CATEGORIES}
_SIZE_RANGE = (24.0, 120.0)  # sqrt(box area) in pixels
_JPEG_QUALITY = 92


def make_synthetic_coco(
    out: Path,
    *,
    images: int = 64,
    seed: int = 0,
    size: tuple[int, int] = (320, 240),
    val_images: int | None = None,
) -> Path:
    """Write the synthetic COCO root and return `out`.

    Args:
        out: root folder (created; existing files of the same names are overwritten).
        images: number of train images (>= 1).
        seed: the only source of randomness; same seed -> byte-identical JSON and identical pixels.
        size: (width, height) of landscape images; portrait ones are (height, width).
        val_images: number of val images; default max(8, images // 4).

    Returns:
        `out`, a COCO-2017-style root usable as `RunConfig.data_root`.
    """
    if images < 1:
        raise ValueError(f"images must be >= 1, got {images}")
    width, height = size
    if min(width, height) < 64:
        raise ValueError(f"size must be at least 64 x 64 to hold 24..120 px objects, got {size}")
    n_val = max(8, images // 4) if val_images is None else val_images
    if n_val < 0:
        raise ValueError(f"val_images must be >= 0, got {val_images}")
    out = Path(out)
    for split, count, id_step, stream in (("train2017", images, 3, 0), ("val2017", n_val, 5, 1)):
        _write_split(out, split, count=count, id_step=id_step, seed=seed, stream=stream, size=size)
    return out


def _write_split(out: Path, split: str, *, count: int, id_step: int, seed: int, stream: int,
                 size: tuple[int, int]) -> None:
    img_dir = out / split
    img_dir.mkdir(parents=True, exist_ok=True)
    (out / "annotations").mkdir(parents=True, exist_ok=True)
    image_infos: list[dict[str, Any]] = []
    anns: list[dict[str, Any]] = []
    for i in range(count):
        # One independent stream per (seed, split, image): changing `count` keeps earlier images.
        rng = np.random.default_rng([seed, stream, i])
        image_id = id_step * i
        w, h = size if i % 4 != 3 else (size[1], size[0])
        pixels, objects = _draw_image(rng, w, h)
        file_name = f"{image_id:012d}.jpg"
        img = Image.fromarray(pixels)  # uint8 [h, w, 3] -> RGB
        if i % 10 == 9:
            img = img.convert("L")
        img.save(img_dir / file_name, format="JPEG", quality=_JPEG_QUALITY)
        image_infos.append({"id": image_id, "file_name": file_name, "width": w, "height": h, "license": 0})
        for name, (x1, y1, x2, y2), area in objects:
            bw, bh = float(x2 - x1), float(y2 - y1)
            anns.append({
                "id": len(anns) + 1,  # ids start at 1: pycocotools reads a gt id of 0 as "unmatched"
                "image_id": image_id,
                "category_id": _NAME_TO_ID[name],
                "bbox": [float(x1), float(y1), bw, bh],
                "area": float(area),
                "iscrowd": 0,
                "segmentation": [[float(x1), float(y1), float(x2), float(y1), float(x2), float(y2),
                                  float(x1), float(y2)]],
            })
    dataset = {
        "info": {"description": "detector.synth synthetic COCO-style set", "version": "1.0", "year": 2017,
                 "seed": seed},
        "licenses": [{"id": 0, "name": "generated", "url": ""}],
        "images": image_infos,
        "annotations": anns,
        "categories": [{"id": cid, "name": name, "supercategory": sup} for cid, name, sup in COCO_CATEGORIES],
    }
    path = out / "annotations" / f"instances_{split}.json"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(dataset, separators=(",", ":")))
    os.replace(tmp, path)


def _draw_image(rng: np.random.Generator, w: int, h: int) -> tuple[np.ndarray, list[tuple[str, tuple[int, int, int, int], int]]]:
    """Return (uint8 [h, w, 3] RGB pixels, [(class name, (x1, y1, x2, y2), mask area)])."""
    canvas = _background(rng, w, h)
    names = list(SYNTH_CLASSES)
    boxes: list[tuple[int, int, int, int]] = []
    objects: list[tuple[str, tuple[int, int, int, int], int]] = []
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    for _ in range(int(rng.integers(1, 5))):
        name = names[int(rng.integers(len(names)))]
        colour, shape, (amin, amax) = SYNTH_CLASSES[name]
        box = _place(rng, w, h, boxes, amin, amax)
        if box is None:
            continue
        x1, y1, x2, y2 = box
        mask = _shape_mask(shape, xx, yy, box)
        noise = rng.normal(0.0, 6.0, size=(int(mask.sum()), 3))
        shade = rng.uniform(0.85, 1.1)
        canvas[mask] = np.clip(np.asarray(colour, dtype=np.float32) * shade + noise, 0, 255)
        boxes.append(box)
        objects.append((name, box, int(mask.sum())))
    if not objects:  # cannot happen for sizes >= 64 (the first placement always fits), kept for safety
        raise RuntimeError("synthetic image without objects")
    return canvas.round().astype(np.uint8), objects


def _background(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """A desaturated low-frequency colour field + faint stripes + pixel noise, float32 [h, w, 3]."""
    coarse = rng.uniform(80, 170, size=(3, 4, 3)).astype(np.float32)
    grey = coarse.mean(axis=2, keepdims=True)
    coarse = 0.35 * coarse + 0.65 * grey  # keep the background far from the saturated object colours
    ys = np.linspace(0, coarse.shape[0] - 1, h, dtype=np.float32)
    xs = np.linspace(0, coarse.shape[1] - 1, w, dtype=np.float32)
    y0 = np.minimum(ys.astype(int), coarse.shape[0] - 2)
    x0 = np.minimum(xs.astype(int), coarse.shape[1] - 2)
    fy, fx = (ys - y0)[:, None, None], (xs - x0)[None, :, None]
    top = coarse[y0][:, x0] * (1 - fx) + coarse[y0][:, x0 + 1] * fx
    bottom = coarse[y0 + 1][:, x0] * (1 - fx) + coarse[y0 + 1][:, x0 + 1] * fx
    field = top * (1 - fy) + bottom * fy
    freq, phase = rng.uniform(0.05, 0.2), rng.uniform(0, 2 * np.pi)
    stripes = 8.0 * np.sin(freq * (np.arange(w)[None, :] + 0.5 * np.arange(h)[:, None]) + phase)
    return field + stripes[:, :, None].astype(np.float32) + rng.normal(0, 5, size=(h, w, 3)).astype(np.float32)


def _place(rng: np.random.Generator, w: int, h: int, taken: list[tuple[int, int, int, int]],
           amin: float, amax: float) -> tuple[int, int, int, int] | None:
    """A box of sqrt-area in `_SIZE_RANGE` and aspect in [amin, amax] not touching `taken` (2 px gap)."""
    for _ in range(30):
        s = rng.uniform(*_SIZE_RANGE)
        a = rng.uniform(amin, amax)
        bw = int(round(min(s * np.sqrt(a), 0.9 * w)))
        bh = int(round(min(s / np.sqrt(a), 0.9 * h)))
        x1 = int(rng.integers(0, w - bw + 1))
        y1 = int(rng.integers(0, h - bh + 1))
        box = (x1, y1, x1 + bw, y1 + bh)
        if all(box[2] + 2 <= t[0] or t[2] + 2 <= box[0] or box[3] + 2 <= t[1] or t[3] + 2 <= box[1] for t in taken):
            return box
    return None


def _shape_mask(shape: str, xx: np.ndarray, yy: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    """Boolean [h, w] mask of `shape` inscribed in `box` (pixel centres at +0.5)."""
    x1, y1, x2, y2 = box
    cx, cy = xx + 0.5, yy + 0.5
    inside = (cx >= x1) & (cx < x2) & (cy >= y1) & (cy < y2)
    if shape == "rect":
        return inside
    if shape == "ellipse":
        rx, ry = (x2 - x1) / 2, (y2 - y1) / 2
        return inside & (((cx - x1 - rx) / rx) ** 2 + ((cy - y1 - ry) / ry) ** 2 <= 1.0)
    if shape == "triangle":  # apex at the top centre, base at the bottom edge
        t = (cy - y1) / (y2 - y1)
        half = 0.5 * (x2 - x1) * t
        return inside & (np.abs(cx - (x1 + x2) / 2) <= half + 0.5)
    raise ValueError(f"unknown shape {shape!r}; allowed: rect, ellipse, triangle")


__all__ = ["COCO_CATEGORIES", "SYNTH_CLASSES", "make_synthetic_coco"]
