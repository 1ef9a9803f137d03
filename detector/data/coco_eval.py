"""COCO box evaluation: a thin pycocotools wrapper set up as MMDetection's `CocoMetric` (reference 1.3).

Shorthand: a detection is a COCO result dict {"image_id": int, "category_id": int,
"bbox": [x, y, w, h] in original-image pixels, "score": float}.

mmdet `CocoMetric(metric="bbox")` sets `params.maxDets = list(proposal_nums) = [100, 300, 1000]`,
`params.catIds` to the dataset's (possibly subset) category ids and `params.imgIds` to every image
of the ground truth. pycocotools' stats then mean (mmdet names in brackets):

    0 AP@[.5:.95] maxDets 100 (mAP)      6 AR maxDets 100 (AR@100)
    1 AP@.5 maxDets 1000 (mAP_50)        7 AR maxDets 300 (AR@300)
    2 AP@.75 maxDets 1000 (mAP_75)       8 AR maxDets 1000 (AR@1000)
    3-5 AP small/medium/large, 1000      9-11 AR small/medium/large maxDets 1000 (AR_s@1000 ...)

Keys are `bbox_` + the mmdet name (`METRIC_KEYS`). Values are fractions exactly as pycocotools
computes them (mmdet additionally rounds to 3 decimals when logging; we keep full precision, the
README "box AP" is `round(bbox_mAP * 100, 1)`). pycocotools' -1 ("no ground truth in this area
range") is kept as -1. Because at most 100 detections per image are kept by the model, the
maxDets=1000 entries equal maxDets=100 ones in practice.

Per category (mmdet `CocoMetric(classwise=True)`, `score(...).per_category`): for each evaluated
category, the mean of pycocotools' accumulated precision over IoU thresholds and recall points at
area "all" and the last maxDets (1000), entries of -1 left out; its AP@.5, AP@.75 and small /
medium / large likewise. A category without ground truth among the evaluated images has no AP
(None here; mmdet's NaN). Because each category is matched on its own, a category's AP is the
`bbox_mAP` of evaluating that category alone, and over categories that have ground truth their
mean is `bbox_mAP` itself (tested).
"""

from __future__ import annotations

import contextlib
import copy
import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import Tensor

from detector.data.coco import load_coco, select_categories
from detector.errors import DataError
from detector.jsonio import read_json

PROPOSAL_NUMS = (100, 300, 1000)  # mmdet CocoMetric default, written into params.maxDets
METRIC_KEYS: tuple[str, ...] = (
    "bbox_mAP", "bbox_mAP_50", "bbox_mAP_75", "bbox_mAP_s", "bbox_mAP_m", "bbox_mAP_l",
    "bbox_AR@100", "bbox_AR@300", "bbox_AR@1000", "bbox_AR_s@1000", "bbox_AR_m@1000", "bbox_AR_l@1000",
)


# Per-category columns (mmdet's classwise table) and the (IoU threshold, area range) each reads: all IoUs or one
# index (0: .5, 5: .75), area 0 all, 1-3 small, medium, large.
CATEGORY_KEYS: tuple[str, ...] = ("mAP", "mAP_50", "mAP_75", "mAP_s", "mAP_m", "mAP_l")
_CATEGORY_SLICES = ((slice(None), 0), (0, 0), (5, 0), (slice(None), 1), (slice(None), 2), (slice(None), 3))


@dataclass(frozen=True, kw_only=True)
class Scores:
    """One COCO box evaluation: the 12 stats (`METRIC_KEYS`, fractions) and, per evaluated category
    name (the ground truth's category order), `CATEGORY_KEYS` -> fraction, None without ground truth."""

    stats: dict[str, float]
    per_category: dict[str, dict[str, float | None]]

    def category_ap(self) -> dict[str, float | None]:
        """Category name -> AP@[.5:.95] (mmdet's `<name>_precision`), what metrics.json keeps."""
        return {name: row["mAP"] for name, row in self.per_category.items()}


def score(coco_gt: COCO, detections: list[dict[str, Any]], *, cat_ids: Sequence[int] | None = None,
          img_ids: Sequence[int] | None = None, source: str = "detections") -> Scores:
    """`detections` scored against `coco_gt`: the 12 COCO box stats and the per-category APs.

    Args:
        coco_gt: ground truth (e.g. `detector.data.coco.load_coco(path)` or a dataset's `.coco`).
        detections: COCO result dicts (not modified). Empty -> every stat with ground truth is 0.
        cat_ids: categories to evaluate (a class subset, as mmdet with metainfo classes); default all.
        img_ids: images to evaluate; default every image of `coco_gt` (as mmdet CocoMetric).
        source: what to call the detections in error messages (e.g. their file name).

    Raises:
        DataError: malformed detections, or ids that `coco_gt` does not know.
    """
    _check_detections(coco_gt, detections, source)
    if 0 in coco_gt.anns:
        # COCOeval stores the matched gt id in `dtm` and reads 0 as "unmatched": a gt with id 0
        # would silently turn its true positives into false positives.
        raise DataError("ground truth has an annotation with id 0, which pycocotools cannot match; renumber from 1")
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt = coco_gt.loadRes(copy.deepcopy(detections)) if detections else _empty_results(coco_gt)
        coco_eval = COCOeval(coco_gt, coco_dt, "bbox")
        coco_eval.params.catIds = list(cat_ids) if cat_ids is not None else sorted(coco_gt.getCatIds())
        coco_eval.params.imgIds = list(img_ids) if img_ids is not None else sorted(coco_gt.getImgIds())
        coco_eval.params.maxDets = list(PROPOSAL_NUMS)
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    stats = {key: float(value) for key, value in zip(METRIC_KEYS, coco_eval.stats)}
    # precision: [IoU thresholds, recall points, categories (params.catIds order), area ranges, maxDets]
    precision = coco_eval.eval["precision"]
    per_category = {}
    for k, cat_id in enumerate(coco_eval.params.catIds):
        row = {}
        for key, (iou, area) in zip(CATEGORY_KEYS, _CATEGORY_SLICES):
            values = precision[iou, :, k, area, -1]
            values = values[values > -1]
            row[key] = float(np.mean(values)) if values.size else None
        name = str(coco_gt.cats[cat_id]["name"])
        per_category[name if name not in per_category else f"{name} (id {cat_id})"] = row  # a repeated name stays apart
    return Scores(stats=stats, per_category=per_category)


def evaluate(coco_gt: COCO, detections: list[dict[str, Any]], *, cat_ids: Sequence[int] | None = None,
             img_ids: Sequence[int] | None = None, source: str = "detections") -> dict[str, float]:
    """The 12 COCO box stats of `detections` against `coco_gt`, keyed by `METRIC_KEYS` (`score`'s `stats`)."""
    return score(coco_gt, detections, cat_ids=cat_ids, img_ids=img_ids, source=source).stats


def evaluate_files(ann: Path, dets: Path, *, categories: Sequence[str] | None = None) -> Scores:
    """`harness eval --ann GT --dets DETS`: score a COCO results file (a JSON list) against `ann`.

    `categories` (names) restricts the evaluation to those categories, as the COCO-subset
    finetunes are evaluated. Errors name the file at fault.
    """
    coco_gt = load_coco(ann)
    detections = read_json(dets, "detections file")
    if not isinstance(detections, list):
        raise DataError(f"detections file {dets}: expected a JSON list of COCO results, got {type(detections).__name__}")
    cat_ids = select_categories(coco_gt, categories, ann) if categories else None
    return score(coco_gt, detections, cat_ids=cat_ids, source=f"detections file {dets}")


def detections_to_coco(outputs: Sequence[dict[str, Tensor]], metas: Sequence[dict[str, Any]],
                       label_to_cat_id: Sequence[int]) -> list[dict[str, Any]]:
    """Model outputs -> COCO results (mmdet `CocoMetric.results2json` / `xyxy2xywh`).

    Args:
        outputs: per image {"boxes": [K, 4] x1y1x2y2 in original-image pixels, "scores": [K],
            "labels": [K] contiguous labels}.
        metas: per image, at least {"image_id"} (the dataset's meta dicts).
        label_to_cat_id: `dataset.label_to_cat_id` (label -> COCO category id).
    """
    if len(outputs) != len(metas):
        raise ValueError(f"{len(outputs)} outputs for {len(metas)} metas")
    results: list[dict[str, Any]] = []
    for out, meta in zip(outputs, metas):
        boxes = out["boxes"].detach().float().cpu().numpy().reshape(-1, 4)
        scores = out["scores"].detach().float().cpu().numpy().reshape(-1)
        labels = out["labels"].detach().cpu().numpy().reshape(-1)
        image_id = int(meta["image_id"])
        for (x1, y1, x2, y2), score, label in zip(boxes.tolist(), scores.tolist(), labels.tolist()):
            results.append({"image_id": image_id, "category_id": int(label_to_cat_id[int(label)]),
                            "bbox": [x1, y1, x2 - x1, y2 - y1], "score": score})
    return results


def _check_detections(coco_gt: COCO, detections: list[dict[str, Any]], source: str) -> None:
    images, cats = set(coco_gt.getImgIds()), set(coco_gt.getCatIds())
    for i, det in enumerate(detections):
        where = f"{source}: entry {i}"
        if not isinstance(det, dict) or not {"image_id", "category_id", "bbox", "score"} <= det.keys():
            raise DataError(f"{where}: expected an object with image_id, category_id, bbox, score; got {det!r}")
        bbox = det["bbox"]
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(isinstance(v, (int, float)) for v in bbox)):
            raise DataError(f"{where}: 'bbox' must be [x, y, w, h], got {bbox!r}")
        if not isinstance(det["score"], (int, float)) or not np.isfinite(det["score"]):
            raise DataError(f"{where}: 'score' must be a finite number, got {det['score']!r}")
        if det["image_id"] not in images:
            raise DataError(f"{where}: image_id {det['image_id']!r} is not in the ground truth")
        if det["category_id"] not in cats:
            raise DataError(f"{where}: category_id {det['category_id']!r} is not in the ground truth")


def _empty_results(coco_gt: COCO) -> COCO:
    # `COCO.loadRes([])` fails on `anns[0]`; an empty result set is a COCO index without annotations.
    empty = COCO()
    empty.dataset = {"images": list(coco_gt.dataset["images"]), "categories": copy.deepcopy(coco_gt.dataset["categories"]),
                     "annotations": []}
    empty.createIndex()
    return empty


__all__ = ["CATEGORY_KEYS", "METRIC_KEYS", "PROPOSAL_NUMS", "Scores", "detections_to_coco", "evaluate", "evaluate_files", "score"]
