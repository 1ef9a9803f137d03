"""`harness verify CELL --checkpoint FILE --data ROOT`: a published checkpoint scored without training.

The detector's half of `harness verify` (the harness judges the AP against the cell's published row):
the cell's model, the file loaded strictly with its class order checked against the dataset's, and the
same evaluation loop as a cell's run (`detector.train.evaluate`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from detector.config import DetectorConfig, RunConfig
from detector.data import coco as data
from detector.errors import WeightsError
from detector.model import weights
from detector.model.faster_rcnn import build_detector, match_weight_layout_
from detector.train.evaluate import evaluate_model


def verify(
    cfg: DetectorConfig,
    *,
    checkpoint: str | Path,
    data_root: str | Path,
    device: str = "cpu",
    max_images: int | None = None,
    workers: int = 2,
    progress: bool = False,
) -> dict[str, Any]:
    """Evaluate a published checkpoint without training: build the cell's model, load the file
    (class order checked against the dataset's), run the test pipeline (reference 1.3: resize to
    `cfg.data.scale`, no flip, batch 1, FP32) on val2017, or on train2017 in test mode when the root
    has no val split, and score it with pycocotools as mmdet's `CocoMetric`.

    Returns:
        The 12 COCO box stats (`detector.data.coco_eval.METRIC_KEYS`, fractions), `box_ap` (percentage
        points, one decimal), `eval_split`, `images`, `checkpoint`, `classes_checked` (whether
        the file recorded class names that were compared) and `per_category` (category name ->
        `coco_eval.CATEGORY_KEYS` -> fraction or None: mmdet's classwise table).
    """
    run = RunConfig(data_root=str(data_root), device=device, eval_max_images=max_images, workers=workers)
    dataset = data.build_dataset(cfg, run, train=False)
    if dataset.num_classes != cfg.num_classes:
        raise WeightsError(
            f"{dataset.ann_file}: {dataset.num_classes} categories selected, but {cfg.name} has {cfg.num_classes} classes"
        )
    obj = weights.read_checkpoint(checkpoint)
    file_classes = weights.checkpoint_classes(weights.split_checkpoint(obj, checkpoint)[1])
    if file_classes is not None:  # fail before building the model
        weights.check_checkpoint_classes(checkpoint, file_classes, cfg.num_classes, dataset.class_names)
    model = build_detector(cfg)
    report = weights.load_detector(model, checkpoint, cfg=cfg, classes=dataset.class_names, contents=obj)
    dev = torch.device(device)
    match_weight_layout_(model.to(dev)).eval()
    # Only the images that were run count (all of them unless max_images), as mmdet scores its whole split.
    scores = evaluate_model(model, dataset, device=dev, workers=workers, source=f"detections of {checkpoint}", progress=progress)
    assert scores is not None  # one process: rank 0
    return {
        **scores.stats,
        "box_ap": round(scores.stats["bbox_mAP"] * 100, 1),
        "eval_split": dataset.split,
        "images": len(dataset),
        "checkpoint": str(checkpoint),
        "classes_checked": report.classes is not None,
        "per_category": scores.per_category,
    }


__all__ = ["verify"]
