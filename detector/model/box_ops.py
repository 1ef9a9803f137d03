"""Box arithmetic: MMDetection's `DeltaXYWHBBoxCoder` and its `bbox_overlaps` (with eps).

Shorthand: boxes are `Tensor[..., 4]` in x1y1x2y2 absolute pixels of the resized image (no "+1",
mmdet v2 convention, reference 1.8); deltas are `Tensor[..., 4]` (dx, dy, dw, dh) normalised by the
coder's stds (means are always 0 in every Faster R-CNN recipe).

All arithmetic here runs in float32: callers under autocast get float32 results, because bf16 /
fp16 box coordinates lose whole pixels at COCO scales.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

# mmdet `DeltaXYWHBBoxCoder(wh_ratio_clip=16/1000)`: |dw|, |dh| <= log(1000/16) after denormalising.
WH_RATIO_CLIP = 16 / 1000
MAX_DWH = abs(math.log(WH_RATIO_CLIP))
# Smallest width/height used as a divisor when encoding: zero-size boxes (not in COCO after the data
# pipeline's filtering, but possible from user data) must not give inf / nan targets.
_MIN_WH = 1e-6


class BoxCoder:
    """mmdet `DeltaXYWHBBoxCoder(target_means=0, target_stds=stds, clip_border=True)`.

    `encode(priors[N,4], gts[N,4]) -> deltas[N,4]`, `decode(priors[N,4], deltas[N,4], max_shape)
    -> boxes[N,4]`, where `max_shape` is `(h, w)` or a `Tensor[N, 2]` of per-row (h, w) for batches.
    """

    def __init__(self, stds: tuple[float, float, float, float]) -> None:
        self.stds = tuple(float(s) for s in stds)
        self._on: dict[torch.device, Tensor] = {}

    def _stds(self, ref: Tensor) -> Tensor:
        # Made once per device: `torch.tensor(..., device=cuda)` waits for its copy (a host sync).
        if ref.device not in self._on:
            self._on[ref.device] = torch.tensor(self.stds, dtype=torch.float32).to(ref.device)
        return self._on[ref.device]

    def encode(self, priors: Tensor, gts: Tensor) -> Tensor:
        priors, gts = priors.float(), gts.float()
        pxy = (priors[..., :2] + priors[..., 2:]) * 0.5
        pwh = (priors[..., 2:] - priors[..., :2]).clamp(min=_MIN_WH)
        gxy = (gts[..., :2] + gts[..., 2:]) * 0.5
        gwh = (gts[..., 2:] - gts[..., :2]).clamp(min=_MIN_WH)
        deltas = torch.cat([(gxy - pxy) / pwh, torch.log(gwh / pwh)], dim=-1)
        return deltas / self._stds(deltas)

    def decode(self, priors: Tensor, deltas: Tensor, max_shape: tuple[int, int] | Tensor | None = None) -> Tensor:
        priors, deltas = priors.float(), deltas.float() * self._stds(deltas)
        pxy = (priors[..., :2] + priors[..., 2:]) * 0.5
        pwh = priors[..., 2:] - priors[..., :2]
        gxy = pxy + pwh * deltas[..., :2]
        gwh = pwh * deltas[..., 2:].clamp(min=-MAX_DWH, max=MAX_DWH).exp()
        boxes = torch.cat([gxy - gwh * 0.5, gxy + gwh * 0.5], dim=-1)
        if max_shape is not None:
            boxes = clip_boxes(boxes, max_shape)
        return boxes


def clip_boxes(boxes: Tensor, max_shape: tuple[int, int] | Tensor) -> Tensor:
    """Clamp x to [0, w] and y to [0, h] (mmdet clips to w, not w - 1).

    `max_shape`: `(h, w)`, or `Tensor[..., 2]` broadcastable against `boxes[..., :1]` per row.
    """
    if isinstance(max_shape, Tensor):
        hw = max_shape.to(device=boxes.device, dtype=boxes.dtype)
        wh = hw.flip(-1)
        upper = torch.cat([wh, wh], dim=-1)
        return torch.minimum(boxes.clamp(min=0), upper)
    h, w = max_shape
    x = boxes[..., 0::2].clamp(min=0, max=w)
    y = boxes[..., 1::2].clamp(min=0, max=h)
    return torch.stack([x[..., 0], y[..., 0], x[..., 1], y[..., 1]], dim=-1)


def box_area(boxes: Tensor) -> Tensor:
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def stack_padded(rows: list[Tensor], width: int | None = None) -> Tensor:
    """Per-image rows `[G_i, ...]` (boxes `[G_i, 4]`, labels `[G_i]`) as one `Tensor[N, width, ...]`,
    zeros after each image's own; `width` defaults to `max(max_i G_i, 1)` (at least one row, so
    gathers stay in range). The G_i are shapes, known on the host: no sync."""
    if width is None:
        width = max([r.shape[0] for r in rows] + [1])
    out = rows[0].new_zeros((len(rows), width, *rows[0].shape[1:]))
    for i, r in enumerate(rows):
        out[i, : r.shape[0]] = r
    return out


def count_ids(ids: Tensor, num_ids: int) -> Tensor:
    """How many rows carry each id in [0, num_ids) (an image, an FPN level): `Tensor[num_ids]`
    int64. Not `torch.bincount`: on CUDA it reads the ids' min and max back to the host (a sync)."""
    return torch.zeros(num_ids, dtype=torch.long, device=ids.device).scatter_add_(0, ids, torch.ones_like(ids))


def pad_per_image(rois: Tensor, num_images: int, width: int) -> tuple[Tensor, Tensor]:
    """RoIs `[R, 5]` (batch index, box) grouped by image, at most `width` each, as boxes
    `Tensor[N, width, 4]` and `valid` `Tensor[N, width]`, each image's rows first, in their order.
    Ranks within an image are computed on the device: no sync."""
    image_ids = rois[:, 0].long()
    counts = count_ids(image_ids, num_images)
    rank = torch.arange(rois.shape[0], device=rois.device) - (torch.cumsum(counts, 0) - counts)[image_ids]
    boxes = rois.new_zeros((num_images, width, 4))
    valid = torch.zeros((num_images, width), dtype=torch.bool, device=rois.device)
    boxes[image_ids, rank] = rois[:, 1:]
    valid[image_ids, rank] = True
    return boxes, valid


def box_iou(boxes1: Tensor, boxes2: Tensor, eps: float = 1e-6) -> Tensor:
    """Pairwise IoU `Tensor[N, M]` as mmdet `bbox_overlaps(mode='iou')`: union clamped at `eps`, so
    zero-area boxes give 0 rather than torchvision's nan."""
    boxes1, boxes2 = boxes1.float(), boxes2.float()
    lt = torch.maximum(boxes1[:, None, :2], boxes2[None, :, :2])
    rb = torch.minimum(boxes1[:, None, 2:], boxes2[None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    overlap = wh[..., 0] * wh[..., 1]
    union = box_area(boxes1)[:, None] + box_area(boxes2)[None, :] - overlap
    return overlap / union.clamp(min=eps)


def aligned_iou(pred: Tensor, target: Tensor, *, mode: str = "iou", eps: float = 1e-6) -> Tensor:
    """Row-wise IoU or GIoU `Tensor[N]` of `pred[N,4]` and `target[N,4]` (mmdet `bbox_overlaps(...,
    is_aligned=True)`): union and enclosing area are clamped at `eps`."""
    pred, target = pred.float(), target.float()
    lt = torch.maximum(pred[:, :2], target[:, :2])
    rb = torch.minimum(pred[:, 2:], target[:, 2:])
    wh = (rb - lt).clamp(min=0)
    overlap = wh[:, 0] * wh[:, 1]
    union = (box_area(pred) + box_area(target) - overlap).clamp(min=eps)
    ious = overlap / union
    if mode == "iou":
        return ious
    enclosed = (torch.maximum(pred[:, 2:], target[:, 2:]) - torch.minimum(pred[:, :2], target[:, :2])).clamp(min=0)
    enclose_area = (enclosed[:, 0] * enclosed[:, 1]).clamp(min=eps)
    return ious - (enclose_area - union) / enclose_area


__all__ = ["BoxCoder", "MAX_DWH", "aligned_iou", "box_area", "box_iou", "clip_boxes", "count_ids", "pad_per_image", "stack_padded"]
