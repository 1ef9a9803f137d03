"""The evaluation loop, written once: predict a dataset with a model and score it like mmdet.

Used by a cell's run (`detector.run`, after training; every rank predicts its share) and by
`harness verify` (`detector.verify`, a published checkpoint without training).
Reference 1.3 / 1.7: the test pipeline at `cfg.data.scale`, no flip, batch 1, FP32, scored with
pycocotools as mmdet's `CocoMetric` over the images that were run.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from detector.data import coco as data
from detector.data.coco_eval import Scores, detections_to_coco, score
from detector.train.engine import Batch, Progress, unwrap
from detector.train.solver import Amp


# --------------------------------------------------------------------------------------------------
# Prediction: the model over a loader, detections in original pixels
# --------------------------------------------------------------------------------------------------
@torch.no_grad()
def predict(
    model: nn.Module,
    loader: Iterable[Batch],
    *,
    device: torch.device,
    amp: Amp | None = None,
    progress: bool = False,
    total: int | None = None,
) -> tuple[list[dict[str, Tensor]], list[dict[str, Any]]]:
    """Run the model over `loader` in eval mode.

    Returns:
        outputs: per image `{"boxes": (K, 4), "scores": (K,), "labels": (K,)}` on the CPU, boxes in
            the original image's pixels (the model rescales to `original_sizes`).
        metas: the matching per-image metas.
    """
    bare = unwrap(model)
    was_training = bare.training
    bare.eval()
    outputs: list[dict[str, Tensor]] = []
    metas_out: list[dict[str, Any]] = []
    bar = Progress(total or 0, "eval", enabled=progress and total is not None)
    for images, _targets, metas in loader:
        images = [img.to(device, non_blocking=True) for img in images]
        with amp.autocast() if amp is not None else contextlib.nullcontext():
            dets = bare(images, original_sizes=[original_size(m) for m in metas])
        outputs.extend({k: v.float().cpu() if v.is_floating_point() else v.cpu() for k, v in d.items()} for d in dets)
        metas_out.extend(metas)
        bar.update(len(images))
    bar.close()
    bare.train(was_training)
    return outputs, metas_out


def original_size(meta: dict[str, Any]) -> tuple[int, int]:
    """(h, w) of the image before resizing, from a `detector.data.coco` meta dict."""
    size = meta.get("orig_size", meta.get("original_size"))
    if size is None:
        raise KeyError(f"image meta without 'orig_size': keys {sorted(meta)}")
    return int(size[0]), int(size[1])




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
) -> Scores | None:
    """The COCO box scores of `model` on `dataset`: the 12 stats (`coco_eval.METRIC_KEYS`, fractions)
    and the per-category APs.

    With `world` > 1 each rank predicts its share and rank 0 gathers and scores them all; the other
    ranks get None. `source` names the detections in error messages; `seed` seeds the loader.
    """
    loader = data.build_test_loader(dataset, workers, rank, world)
    if seed is not None:
        loader.generator = torch.Generator().manual_seed(seed)
    outputs, metas = predict(model, loader, device=device, progress=progress, total=len(loader))
    if world > 1:
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, (outputs, metas))
        outputs = [o for part, _ in gathered for o in part]
        metas = [m for _, part in gathered for m in part]
    if rank != 0:
        return None
    detections = detections_to_coco(outputs, metas, dataset.label_to_cat_id)
    return score(dataset.coco, detections, cat_ids=dataset.cat_ids, img_ids=dataset.image_ids, source=source)


__all__ = ["evaluate_model", "original_size", "predict"]
