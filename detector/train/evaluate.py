"""The evaluation pipeline, written once: predict a dataset with a model and score it like mmdet.

Used by a cell's run (`detector.run`, after training; every rank predicts its share) and by
`harness verify` (`detector.model.weights.verify`, a published checkpoint without training).
Reference 1.3 / 1.7: the test pipeline at `cfg.data.scale`, no flip, batch 1, FP32, scored with
pycocotools as mmdet's `CocoMetric` over the images that were run.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from detector.data import coco as data
from detector.data.coco_eval import detections_to_coco, evaluate
from detector.train import engine


def evaluate_model(
    model: nn.Module,
    dataset: data.CocoDetection,
    *,
    device: torch.device,
    workers: int,
    source: str,
    seed: int | None = None,
    rank: int = 0,
    world: int = 1,
    progress: bool = False,
) -> dict[str, float] | None:
    """The 12 COCO box stats (`coco_eval.METRIC_KEYS`, fractions) of `model` on `dataset`.

    With `world` > 1 each rank predicts its share and rank 0 gathers and scores them all; the other
    ranks get None. `source` names the detections in error messages; `seed` seeds the loader.
    """
    loader = data.build_test_loader(dataset, workers, rank, world)
    if seed is not None:
        loader.generator = torch.Generator().manual_seed(seed)
    outputs, metas = engine.predict(model, loader, device=device, progress=progress, total=len(loader))
    if world > 1:
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, (outputs, metas))
        outputs = [o for part, _ in gathered for o in part]
        metas = [m for _, part in gathered for m in part]
    if rank != 0:
        return None
    detections = detections_to_coco(outputs, metas, dataset.label_to_cat_id)
    return evaluate(dataset.coco, detections, cat_ids=dataset.cat_ids, img_ids=dataset.image_ids, source=source)


__all__ = ["evaluate_model"]
